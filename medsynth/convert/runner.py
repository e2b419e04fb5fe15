"""Per-study conversion and the batch around it.

A study is converted by one function call (:func:`convert_study`) that never raises for a problem
with the data: it returns a :class:`StudyResult` saying ``failed`` and why, so one bad study never
stops a batch of thousands. The batch (:func:`run_convert`) discovers the export, keeps this shard's
studies, runs them serially or in a process pool, and writes the report; :func:`merge_shard_reports`
joins the reports of ``--shard K/N`` runs into one.

Workers die with the batch: each asks the kernel for SIGTERM when its parent dies (Linux), and an
interrupted batch (KeyboardInterrupt, or the CLI's SIGTERM handler) terminates the pool before the
exception goes on. Temporary outputs of a killed run are removed by the next one
(:func:`medsynth.io.atomic.remove_stale_partials`).
"""

from __future__ import annotations

import getpass
import json
import logging
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from contextlib import contextmanager, suppress
from multiprocessing import get_context
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pydicom
import torch
from tqdm import tqdm

from .. import __version__
from ..errors import ConfigError, DataError, MedsynthError
from ..io.atomic import atomic_write_text, partial_name, remove_stale_partials
from ..io.dicom import write_dicom_series
from ..io.geometry import align_subject, grid_mismatch
from ..io.readers import read_volume
from ..io.volume import Volume
from ..io.writers import write_volume
from ..modalities import DISPLAY_NAMES, canonical_modality
from ..model.checkpoint import file_digest, resolve_checkpoint
from ..model.ood import ood_block
from .classify import SeriesMapping
from .discovery import SeriesRecord, discover
from .naming import patient_key, study_folder
from .plan import Plan, plan_study
from .report import (
    ALREADY_CONVERTED,
    FORMATS,
    ConvertReport,
    StudyResult,
    merge_reports,
    now_iso,
    read_shard_reports,
    report_suffix,
)
from .shard import Shard

log = logging.getLogger("medsynth")

__all__ = ["FORMATS", "NoStudiesError", "merge_shard_reports", "run_convert", "worker_devices"]


class NoStudiesError(DataError):
    """The input folder holds no DICOM study at all (empty, wrong folder, or not DICOM)."""


class PredictorLike(Protocol):
    """What conversion needs from :class:`medsynth.inference.predictor.Predictor`.

    ``predict`` returns the synthetic :class:`Volume`, or an object holding it as ``.volume`` (the
    predictor's ``Prediction``, which also carries intermediate arrays for evaluation).
    """

    @property
    def required_modalities(self) -> tuple[str, ...]: ...

    @property
    def target(self) -> str | None: ...

    def predict(self, inputs: dict[str, Volume], target: str | None = None) -> Any: ...


def convert_study(
    plan: Plan,
    predictor: PredictorLike,
    out: Path,
    *,
    target: str,
    fmt: str,
    overwrite: bool,
    checkpoint_id: str,
) -> StudyResult:
    """Convert one planned study; any data problem becomes a ``failed`` row, never an exception."""
    study = plan.study
    start = time.perf_counter()
    result = StudyResult(study.study_uid, patient_key(study.patient_id), "skipped")
    result.inputs = {m: s.series_uid for m, s in plan.inputs.items()}
    folder = study_folder(out, study.patient_id, study.study_uid)
    sidecar = folder / f"{target}.json"
    done = None if overwrite else _done_record(sidecar, fmt)
    if done is not None:  # before the plan: the record stands even if the export changed since
        result.reason = ALREADY_CONVERTED
        _carry_over(result, done, sidecar, out)
        return result
    if plan.problem:
        result.reason = plan.problem
        return result
    try:
        reference_modality = next(iter(plan.inputs))
        volumes = {m: _read_series(s) for m, s in plan.inputs.items()}
        if len(volumes) > 1:
            volumes = align_subject(volumes, reference_modality)
        names = {m: f"study {study.study_uid}, {m} series {s.series_uid}" for m, s in plan.inputs.items()}
        result.ood = ood_block(predictor, volumes, names)  # recorded per study (docs/trust.md)
        synthetic = _synthetic_volume(predictor.predict(volumes, target=target))
        result.precision = _precision_record(predictor)
        reference = volumes[reference_modality]
        _check_grid(synthetic, reference)
        outputs = _write_outputs(synthetic, reference, plan, folder, target=target, fmt=fmt)
        sidecar_data = {
            "medsynth_version": __version__,
            "target": target,
            "study_uid": study.study_uid,
            "patient_key": result.patient_key,
            "inputs": result.inputs,
            "checkpoint": checkpoint_id,
            "formats": _formats(fmt),
            "outputs": [p.name for p in outputs],
            "shape": list(synthetic.shape),
            "affine": np.asarray(synthetic.affine).tolist(),
            "ood": result.ood,
            "precision": result.precision,
        }
        atomic_write_text(sidecar, json.dumps(sidecar_data, indent=2) + "\n")  # written last: marks "done"
    except (MedsynthError, OSError, ValueError, RuntimeError, pydicom.errors.InvalidDicomError) as exc:
        result.status, result.reason = "failed", _one_line(exc)
        log.warning("study %s failed: %s", study.study_uid, result.reason)
    else:
        result.status = "converted"
        result.outputs = [str(p.relative_to(out)) for p in [*outputs, sidecar]]
        result.checkpoint = checkpoint_id
    result.seconds = time.perf_counter() - start
    return result


def _formats(fmt: str) -> list[str]:
    return ["nifti", "dicom"] if fmt == "both" else [fmt]


def _already_done(sidecar: Path, fmt: str) -> bool:
    """A study is done when its sidecar (written last) lists every requested format and every output it
    names still exists (an overwrite killed between moving the old series out and the new one in must
    not leave a study marked done without its DICOM folder)."""
    return _done_record(sidecar, fmt) is not None


def _done_record(sidecar: Path, fmt: str) -> dict[str, Any] | None:
    """The sidecar of a done study (see :func:`_already_done`), or ``None`` when it is not done."""
    try:
        record = json.loads(sidecar.read_text(encoding="utf-8"))
        outputs = [sidecar.parent / str(name) for name in record.get("outputs", [])]
        formats = set(record.get("formats", []))
    except (OSError, ValueError, TypeError, AttributeError):
        return None
    return record if set(_formats(fmt)) <= formats and all(p.exists() for p in outputs) else None


def _carry_over(result: StudyResult, record: dict[str, Any], sidecar: Path, out: Path) -> None:
    """Fill a skipped row of a done study with what its sidecar records: inputs, outputs, model, check.

    A re-run thus writes a report that still says what each study was converted from and into, not a
    list of bare "skipped" rows.
    """
    inputs = record.get("inputs")
    if isinstance(inputs, dict):
        result.inputs = {str(m): str(uid) for m, uid in inputs.items()}
    names = [sidecar.parent / str(name) for name in record.get("outputs", [])]
    result.outputs = [str(p.relative_to(out)) for p in [*names, sidecar]]
    result.checkpoint = str(record.get("checkpoint") or "")
    ood = record.get("ood")
    result.ood = ood if isinstance(ood, dict) else {}
    precision = record.get("precision")
    result.precision = precision if isinstance(precision, dict) else {}


def _precision_record(predictor: PredictorLike) -> dict[str, Any]:
    """What the predictor computed in (:meth:`SynthesisModel.precision_record`), for the sidecar and the
    report; empty for a predictor that does not say (a stand-in without a network)."""
    record = getattr(predictor, "precision_record", None)
    return dict(record()) if callable(record) else {}


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or exc.__class__.__name__
    return text[:300]


def link_folders_root() -> Path:
    """Where the per-series link folders live: one folder per user in the system's temporary folder.

    A worker killed mid-read (SIGKILL, or terminated by its batch's SIGTERM) cannot remove its link
    folder, so each is named by :func:`~medsynth.io.atomic.partial_name` (process and machine) and
    every batch sweeps this folder for those whose process is gone (:func:`sweep_link_folders`).
    """
    return Path(tempfile.gettempdir()) / f"medsynth-series-links-{_user()}"


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # a container user without a passwd entry
        return str(os.getuid()) if hasattr(os, "getuid") else "user"


def sweep_link_folders() -> list[Path]:
    """Remove the link folders of batches that no longer run (never a live process's)."""
    return remove_stale_partials(link_folders_root())


@contextmanager
def _series_folder(series: SeriesRecord) -> Iterator[Path]:
    """A private folder of links to exactly this series' files.

    Exports scatter a series over several folders or mix many series in one; the reader takes one
    folder, so the files are linked (never copied, never written) into a temporary folder, and the
    reader lists only this series instead of re-reading every header of a crowded folder.
    """
    root = link_folders_root()
    root.mkdir(mode=0o700, exist_ok=True)
    folder = root / partial_name("series", keep_suffixes=False)
    folder.mkdir(mode=0o700)
    try:
        for number, path in enumerate(series.files):
            os.symlink(path.resolve(), folder / f"{number:06d}.dcm")
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _read_series(series: SeriesRecord) -> Volume:
    with _series_folder(series) as folder:
        return read_volume(folder, series_uid=series.series_uid)


def _synthetic_volume(output: Any) -> Volume:
    return output if isinstance(output, Volume) else output.volume


def _check_grid(synthetic: Volume, reference: Volume) -> None:
    """The geometry promise: the synthetic volume lies exactly on the reference series' grid."""
    problem = grid_mismatch(reference, synthetic)
    if problem:
        raise MedsynthError(
            f"the predictor returned a volume off the input grid ({problem}); this is a bug, report it"
        )


def _write_outputs(
    synthetic: Volume, reference: Volume, plan: Plan, folder: Path, *, target: str, fmt: str
) -> list[Path]:
    outputs: list[Path] = []
    if fmt in ("nifti", "both"):
        outputs.append(write_volume(synthetic.array, reference, folder / f"{target}.nii.gz"))
    if fmt in ("dicom", "both"):
        outputs.append(_write_derived_series(synthetic, plan.inputs[next(iter(plan.inputs))], folder, target))
    return outputs


def _write_derived_series(synthetic: Volume, source: SeriesRecord, folder: Path, target: str) -> Path:
    """Write the derived series next to the NIfTI; replace an older one only once the new one is complete.

    The series is built inside a hidden staging folder named by :func:`~medsynth.io.atomic.partial_name`
    and renamed into place; the old series (on ``--overwrite``) is swapped out afterwards, so a killed
    run never leaves half a series where a reader looks, and the next run removes the staging folder.
    """
    final = folder / f"dicom_{target}"
    staging = folder / partial_name(final.name, keep_suffixes=False)
    fresh = staging / final.name
    references = [pydicom.dcmread(path, stop_before_pixels=True) for path in source.files[:1]]
    write_dicom_series(
        synthetic,
        fresh,
        series_description=f"{DISPLAY_NAMES[target]} synthetic (medsynth)",
        series_number=1000 + (source.series_number or 0),
        modality="CT" if target == "ct" else "MR",
        reference_datasets=references,
        derived=True,
        derivation_description=f"{DISPLAY_NAMES[target]} synthesised by medsynth {__version__} from series {source.series_uid}",
    )
    old = staging / "old"
    if final.exists():
        os.replace(final, old)
    os.replace(fresh, final)
    shutil.rmtree(staging, ignore_errors=True)
    return final


# --- the batch ----------------------------------------------------------------------------------------

_worker_predictor: PredictorLike | None = None

_PR_SET_PDEATHSIG = 1  # linux/prctl.h


def _die_with_parent(parent_pid: int) -> None:
    """Ask the kernel to SIGTERM this worker when the batch process dies, however it dies (Linux).

    Without it a killed ``convert`` leaves its workers (and through them multiprocessing's resource
    tracker) waiting forever on a queue nobody writes to.
    """
    if sys.platform.startswith("linux"):
        import ctypes

        with suppress(OSError, AttributeError):  # no prctl in this libc: the parent's cleanup remains
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
    if os.getppid() != parent_pid:  # the parent died before the request took effect
        os._exit(1)


def _init_worker(
    predictor: PredictorLike | str | Path,
    threads: int,
    devices: Any,
    parent_pid: int,
    target: str | None = None,
    precision: str = "fp32",
) -> None:
    """Pool initializer: die with the parent, bound torch's threads, load the model on this worker's device.

    ``devices`` is a queue holding one device name per worker (:func:`worker_devices`); each worker
    takes one. Ctrl-C is left to the parent, which stops the whole pool.
    """
    global _worker_predictor
    _die_with_parent(parent_pid)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    torch.set_num_threads(threads)
    _worker_predictor = _load_predictor(predictor, devices.get(), target, precision)


def _run_in_worker(plan: Plan, out: Path, options: dict[str, Any]) -> StudyResult:
    assert _worker_predictor is not None, "worker used before its initializer ran"
    return convert_study(plan, _worker_predictor, out, **options)


def _load_predictor(
    checkpoint_or_predictor: PredictorLike | str | Path,
    device: str = "cpu",
    target: str | None = None,
    precision: str = "fp32",
) -> PredictorLike:
    """The model of a checkpoint (of its direction that makes ``target``, when it holds several).

    ``precision`` is ``--precision``: fp32 unless a faster one was asked for, so a study converted
    twice, or by another worker, gives the same voxels.
    """
    if isinstance(checkpoint_or_predictor, (str, Path)):
        from ..model.synthesis import SynthesisModel  # the model stack is only needed to convert

        return SynthesisModel.from_checkpoint(
            checkpoint_or_predictor, device=device, target=target, precision=precision
        )
    return checkpoint_or_predictor


def _checkpoint_id(checkpoint_or_predictor: PredictorLike | str | Path) -> str:
    """``name sha256:…`` of a checkpoint file, recorded in every sidecar for provenance."""
    if not isinstance(checkpoint_or_predictor, (str, Path)):
        return type(checkpoint_or_predictor).__name__
    path = resolve_checkpoint(checkpoint_or_predictor)
    return f"{path.name} sha256:{file_digest(path)}"


def _resolve_target(predictor: PredictorLike, target: str | None) -> tuple[str, bool]:
    """The target to synthesise and whether the sources are fixed (False for a unified model)."""
    known = tuple(predictor.required_modalities)
    if predictor.target is not None:
        if target is not None and canonical_modality(target) != predictor.target:
            raise ConfigError(f"this checkpoint synthesises {predictor.target}, not {target}; drop --target")
        return predictor.target, True
    if target is None:
        raise ConfigError(f"this unified checkpoint needs --target, one of {', '.join(known)}")
    target = canonical_modality(target)
    if target not in known:
        raise ConfigError(f"--target {target} is not one of the checkpoint's modalities {', '.join(known)}")
    return target, False


def worker_threads(workers: int, cpus: int | None = None) -> int:
    """Torch threads per worker so that ``workers * threads`` never exceeds the CPUs we may use.

    >>> worker_threads(4, cpus=16)
    4
    >>> worker_threads(8, cpus=2)
    1
    """
    if cpus is None:
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cpus // max(1, workers))


def worker_devices(workers: int, device: str = "auto", n_gpus: int = 0) -> list[str]:
    """The device each worker loads the model on: worker ``i`` on GPU ``i % n_gpus``.

    ``auto`` and ``cuda`` spread the workers over the node's GPUs; ``auto`` without a GPU, and
    ``cpu``, keep every worker on the CPU; a named device (``cuda:1``) pins them all to it.

    >>> worker_devices(3, "auto", n_gpus=2)
    ['cuda:0', 'cuda:1', 'cuda:0']
    >>> worker_devices(2, "auto", n_gpus=0)
    ['cpu', 'cpu']
    >>> worker_devices(2, "cuda:1", n_gpus=4)
    ['cuda:1', 'cuda:1']
    """
    if workers < 1:
        raise ConfigError(f"--workers must be at least 1, got {workers}")
    if device in ("auto", "cuda"):
        if n_gpus > 0:
            return [f"cuda:{i % n_gpus}" for i in range(workers)]
        if device == "cuda":
            raise MedsynthError("--device cuda asked for, but no CUDA device is available; use --device cpu")
        return ["cpu"] * workers
    return [device] * workers


def _gpu_count(device: str) -> int:
    if device == "cpu" or not torch.cuda.is_available():
        return 0
    return torch.cuda.device_count()


def run_convert(
    input: str | Path,
    checkpoint_or_predictor: PredictorLike | str | Path,
    out: str | Path,
    *,
    fmt: str = "nifti",
    mapping: SeriesMapping | str | Path | None = None,
    workers: int = 1,
    shard: Shard | str | None = None,
    overwrite: bool = False,
    dry_run: bool = False,
    target: str | None = None,
    device: str = "auto",
    precision: str = "fp32",
) -> ConvertReport:
    """Convert every study of a DICOM export and write ``report.csv``/``report.json`` into ``out``.

    Example::

        report = run_convert("export/", "run/checkpoint_best.pt", "synth/", fmt="both", workers=4)
        print(report.summary())

    ``target`` is needed for unified checkpoints, and picks the direction of a checkpoint that holds
    several (``--target t1`` converts T2w studies with a t1->t2 run's reverse generator). ``device`` is where a checkpoint is loaded:
    with several workers on a node with several GPUs, worker ``i`` uses GPU ``i % n_gpus``
    (:func:`worker_devices`). ``precision``: what the checkpoint's model computes in (``--precision``;
    recorded in every sidecar and report row). With ``dry_run`` nothing is read beyond DICOM headers and
    nothing is written; the report's rows say ``planned`` or ``skipped``. Problems found before any study is
    converted raise :class:`~medsynth.errors.MedsynthError` (:class:`NoStudiesError` for an input
    without DICOM). If the batch is interrupted, the report of the studies finished so far is written
    (``settings.interrupted``) before the exception goes on.
    """
    input, out = Path(input), Path(out)
    if fmt not in FORMATS:
        raise ConfigError(f"unknown --format {fmt!r}; use one of {', '.join(FORMATS)}")
    if workers < 1:
        raise ConfigError(f"--workers must be at least 1, got {workers}")
    if isinstance(mapping, (str, Path)):
        mapping = SeriesMapping.from_yaml(mapping)
    shard = Shard.parse(shard) if isinstance(shard, str) else shard or Shard()
    _refuse_output_inside_input(input, out)
    _prepare_output(out, create=not dry_run)
    from_checkpoint = isinstance(checkpoint_or_predictor, (str, Path))
    devices = worker_devices(workers, device, _gpu_count(device)) if from_checkpoint else ["cpu"] * workers
    # With a pool the workers hold the models; the parent's copy only answers what the model needs.
    predictor = _load_predictor(
        checkpoint_or_predictor, devices[0] if workers == 1 else "cpu", target, precision
    )
    target, fixed = _resolve_target(predictor, target)

    export = discover(input, mapping)
    if not export.studies:
        raise NoStudiesError(_no_studies_message(export), input)
    studies = [s for s in export.studies if shard.contains(s.study_uid)]
    plans = [plan_study(s, tuple(predictor.required_modalities), target, fixed) for s in studies]
    report = ConvertReport(
        notes=export.notes,
        settings={
            "target": target,
            "format": fmt,
            "shard": str(shard),
            "studies_in_other_shards": len(export.studies) - len(studies),
            "workers": workers,
            "devices": devices if from_checkpoint else None,
            "precision": precision if from_checkpoint else None,
            "medsynth_version": __version__,
        },
        plans=plans,
    )
    if dry_run:
        report.studies = [_dry_run_row(p, out, target, fmt, overwrite) for p in plans]
        return report

    removed = remove_stale_partials(out) + sweep_link_folders()
    for study in studies:  # only this shard's folders: other shards may be writing theirs right now
        removed += remove_stale_partials(study_folder(out, study.patient_id, study.study_uid))
    if removed:
        log.info("removed %d temporary outputs a killed run left behind", len(removed))
    options = {
        "target": target,
        "fmt": fmt,
        "overwrite": overwrite,
        "checkpoint_id": _checkpoint_id(checkpoint_or_predictor),
    }
    suffix = report_suffix(shard.index, shard.count)
    try:
        _run_plans(
            plans, checkpoint_or_predictor, predictor, out, options, devices, report.studies, precision
        )
    except BaseException:
        report.settings["interrupted"] = True
        _finish(report, out, suffix)
        raise
    _finish(report, out, suffix)
    return report


def _finish(report: ConvertReport, out: Path, suffix: str) -> None:
    report.studies.sort(key=lambda r: r.study_uid)
    report.settings["finished"] = now_iso()
    report.write(out, suffix=suffix)


def merge_shard_reports(input: str | Path, out: str | Path) -> ConvertReport:
    """Join the ``report-shard-K-of-N.*`` files in ``out`` into ``report.csv``/``report.json``.

    The export is discovered again (headers only) so that the merged report has one row per study
    of the export: a study no shard has reported yet is an ``unreported`` row naming its shard.

    Example::

        merged = merge_shard_reports("export/", "synth/")
        print(merged.summary(), merged.unreported)
    """
    input, out = Path(input), Path(out)
    if not input.is_dir():
        raise MedsynthError("input folder not found; pass the root of the DICOM export", input)
    if not out.is_dir():
        raise MedsynthError("output folder not found; pass the --out of the shard runs", out)
    reports, notes, unreadable = read_shard_reports(out)
    if not reports:
        damaged = "; ".join(f"{u.name} cannot be read ({u.reason})" for u in unreadable[:3])
        raise MedsynthError(
            f"no readable shard reports (report-shard-K-of-N.json) here{f' ({damaged})' if damaged else ''}; "
            "run convert --shard K/N first",
            out,
        )
    export = discover(input)
    counts = sorted({r.count for r in reports} | {u.count for u in unreadable})
    studies = [
        (s.study_uid, patient_key(s.patient_id), [str(Shard.owner(s.study_uid, n)) for n in counts])
        for s in export.studies
    ]
    merged = merge_reports(reports, studies, notes, unreadable)
    merged.write(out)
    return merged


def _no_studies_message(export: Any) -> str:
    """One line: nothing to convert here, and the first thing discovery set aside, if anything."""
    message = "no DICOM study found in this folder; pass the root of a DICOM export"
    if export.notes:
        message += f" ({len(export.notes)} notes, first: {export.notes[0]})"
    return message


def _prepare_output(out: Path, *, create: bool) -> None:
    """Fail before anything is read or synthesised when ``--out`` cannot be the output folder."""
    if out.exists() and not out.is_dir():
        raise MedsynthError("--out is an existing file, not a folder; choose a folder", out)
    if create:
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise MedsynthError(f"cannot create the output folder ({exc.strerror})", out) from exc


def _dry_run_row(plan: Plan, out: Path, target: str, fmt: str, overwrite: bool) -> StudyResult:
    row = StudyResult(plan.study.study_uid, patient_key(plan.study.patient_id), "planned")
    row.inputs = {m: s.series_uid for m, s in plan.inputs.items()}
    sidecar = study_folder(out, plan.study.patient_id, plan.study.study_uid) / f"{target}.json"
    if not overwrite and _already_done(sidecar, fmt):
        row.status, row.reason = "skipped", ALREADY_CONVERTED
    elif plan.problem:
        row.status, row.reason = "skipped", plan.problem
    return row


def _run_plans(
    plans: list[Plan],
    checkpoint_or_predictor: PredictorLike | str | Path,
    predictor: PredictorLike,
    out: Path,
    options: dict[str, Any],
    devices: list[str],
    results: list[StudyResult],
    precision: str = "fp32",
) -> None:
    """Convert the plans, appending to ``results`` as studies finish (kept if interrupted)."""
    workers = len(devices)
    progress = tqdm(total=len(plans), desc="studies", unit="study", disable=None)
    try:
        if workers == 1 or len(plans) <= 1:
            if workers > 1 and isinstance(checkpoint_or_predictor, (str, Path)) and devices[0] != "cpu":
                predictor = _load_predictor(
                    checkpoint_or_predictor, devices[0], options["target"], precision
                )  # the parent's copy is on CPU
            for plan in plans:
                results.append(convert_study(plan, predictor, out, **options))
                progress.update()
            return
        # Workers load the checkpoint themselves (a path pickles cheaply); an object is sent as is.
        shipped = checkpoint_or_predictor if isinstance(checkpoint_or_predictor, (str, Path)) else predictor
        context = get_context("spawn")  # fork after torch has started threads can deadlock
        slots = context.SimpleQueue()
        for device in devices:
            slots.put(device)
        pool = ProcessPoolExecutor(
            max_workers=workers,
            mp_context=context,
            initializer=_init_worker,
            initargs=(shipped, worker_threads(workers), slots, os.getpid(), options["target"], precision),
        )
        try:
            futures = {pool.submit(_run_in_worker, plan, out, options): plan for plan in plans}
            for future in as_completed(futures):
                results.append(_result_or_failure(future, futures[future]))
                progress.update()
        except BaseException:
            _stop_pool(pool)
            raise
        pool.shutdown()
        slots.close()
    finally:
        progress.close()


def _stop_pool(pool: ProcessPoolExecutor) -> None:
    """Cancel what has not started and terminate the workers now: an interrupted batch leaves no process.

    ``shutdown(wait=True)``, what leaving a ``with`` block does, would first finish every running
    study; on SIGTERM from a scheduler that is time the job does not have.
    """
    processes = list((getattr(pool, "_processes", None) or {}).values())  # before shutdown forgets them
    pool.shutdown(wait=False, cancel_futures=True)
    for process in processes:
        process.terminate()
    deadline = time.monotonic() + 5.0
    for process in processes:
        process.join(max(0.0, deadline - time.monotonic()))
        if process.is_alive():
            process.kill()
            process.join(1.0)


def _result_or_failure(future: Any, plan: Plan) -> StudyResult:
    """A worker that crashed (out of memory, segfault in a decoder) fails its study, not the batch."""
    try:
        return future.result()
    except Exception as exc:
        log.warning("study %s failed in a worker: %s", plan.study.study_uid, _one_line(exc))
        return StudyResult(plan.study.study_uid, patient_key(plan.study.patient_id), "failed", _one_line(exc))


def _refuse_output_inside_input(input: Path, out: Path) -> None:
    """Writing under the input tree would modify the export and be rediscovered as input next run."""
    if not input.exists():
        raise MedsynthError("input folder not found; pass the root of the DICOM export", input)
    resolved_in, resolved_out = input.resolve(), out.resolve()
    if resolved_out == resolved_in or resolved_in in resolved_out.parents:
        raise MedsynthError("the output folder is inside the input export; choose --out outside it", out)
