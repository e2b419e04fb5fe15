"""``medsynth infer``: map ``--volume`` arguments to the checkpoint's inputs, predict, write.

Every output is a float32 volume on the grid of its first input, written atomically, with a JSON
sidecar (arguments, checkpoint hash, medsynth version, runtime) beside it, as nnU-Net does for its
predictions. Several inputs in one call (``--inputs`` folder or list) reuse the loaded model.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
from collections import deque
from collections.abc import Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from .. import __version__
from ..errors import MedsynthError
from ..io.atomic import atomic_write_text
from ..io.readers import read_volume
from ..io.volume import Volume
from ..io.writers import write_volume
from ..modalities import canonical_modality
from ..model.synthesis import SynthesisModel
from ..model.uncertainty import UNCERTAINTY_SUFFIX, uncertainty_path
from .trust import load_model, screen_inputs, trust_outputs

log = logging.getLogger("medsynth")
VOLUME_SUFFIXES = (".nii.gz", ".nii", ".mha", ".mhd", ".nrrd", ".nhdr")
#: Default ``--batch-size`` (slices per forward pass) on a GPU and on the CPU.
CUDA_BATCH_SIZE, CPU_BATCH_SIZE = 64, 16
#: An ``--out`` ending like this names a file (``x.png``, ``x.json``), not a folder.
FILE_LIKE_SUFFIX = re.compile(r"^\.[A-Za-z][A-Za-z0-9]{0,4}$")
#: Finished volumes waiting for the writer thread before the next one is computed.
MAX_PENDING_WRITES = 2


def parse_volume_arguments(values: list[str], model: SynthesisModel) -> dict[str, str]:
    """``[t1=]path`` arguments -> {modality: path}; unnamed ones follow the checkpoint's input order."""
    named: dict[str, str] = {}
    unnamed: list[str] = []
    for value in values:
        key, sep, path = value.partition("=")
        if sep and not Path(value).exists():
            modality = canonical_modality(key)  # "t7=a.nii.gz" -> unknown modality, listing the known ones
            if modality in named:
                raise MedsynthError(f"--volume {modality}= given twice")
            named[modality] = path
        else:
            unnamed.append(value)
    if unnamed:
        if model.task.is_unified:
            raise MedsynthError(
                "a unified model needs named inputs, e.g. --volume t1=a.nii.gz --volume t2=b.nii.gz"
            )
        free = [m for m in model.sources if m not in named]
        if len(unnamed) > len(free):
            raise MedsynthError(
                f"{len(unnamed) + len(named)} volumes given; the checkpoint takes {len(model.sources)} "
                f"({', '.join(model.sources)})"
            )
        named.update(zip(free, unnamed, strict=False))
    return named


def output_path_for(out: Path, stem: str, target: str, batch: bool) -> Path:
    """``--out`` as a file for one volume; as a folder (``<stem>_<target>.nii.gz``) otherwise."""
    if not batch and out.name.endswith(VOLUME_SUFFIXES):
        return out
    return out / f"{stem}_{target}.nii.gz"


def volume_stem(path: str | Path) -> str:
    name = Path(path).name
    for suffix in VOLUME_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def list_batch_inputs(source: Path) -> list[Path]:
    """A folder's volumes (files and DICOM series folders), or the lines of a text file."""
    if source.is_dir():
        items = sorted(p for p in source.iterdir() if p.name.endswith(VOLUME_SUFFIXES) or p.is_dir())
    elif source.is_file():
        base = source.parent
        lines = [line.strip() for line in source.read_text(encoding="utf-8").splitlines()]
        items = [
            (base / line) if not Path(line).is_absolute() else Path(line)
            for line in lines
            if line and not line.startswith("#")
        ]
    else:
        raise MedsynthError("no such folder or list file", source)
    if not items:
        raise MedsynthError(
            "no volumes found (looked for .nii.gz, .nii, .mha, .nrrd and DICOM folders)", source
        )
    return items


def check_writable(path: Path) -> None:
    """Fail before computing anything when the output cannot be written."""
    folder = path.parent
    probe = folder
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not os.access(probe, os.W_OK):
        raise MedsynthError("output folder is not writable; choose another --out", folder)


def infer_from_args(args: argparse.Namespace) -> int:
    check_out_argument(args.out)
    model = load_model(
        args.checkpoint, device=args.device, precision=getattr(args, "precision", "fp32"), target=args.target
    )  # a checkpoint, or an ONNX/TorchScript export
    jobs = plan_jobs(args, model)
    refuse_overwriting_inputs(jobs, uncertainty=args.uncertainty)
    batch_size = resolve_batch_size(args.batch_size, model)
    return run_jobs(model, jobs, args, batch_size=batch_size, keep_going=bool(args.inputs))


def targets_for(
    model: SynthesisModel, inputs: Mapping[str, object], requested: str | None
) -> list[str | None]:
    """``--target missing`` on a unified model means every modality the inputs lack."""
    if requested == "missing":
        if not model.task.is_unified:
            return [model.target]
        return [m for m in model.task.modalities if m not in inputs]
    return [requested]


def write_prediction(
    volume: Volume,
    out: Path,
    model: SynthesisModel,
    inputs: dict[str, str],
    seconds: float,
    arguments: dict[str, Any],
    extra: Mapping[str, Any] | None = None,
) -> None:
    """The volume on its input's grid, then the sidecar (written last: its presence means complete).

    ``extra`` adds blocks to the sidecar (``ood``, ``uncertainty``: :mod:`.trust`).
    """
    write_volume(volume.array, volume, out, dtype=arguments.get("out_dtype") or "float32")
    sidecar = {
        "medsynth_version": __version__,
        "output": str(out),
        "target": volume.meta.get("modality"),
        "inputs": inputs,
        "checkpoint": model.describe(),
        "arguments": {
            k: str(v) if isinstance(v, Path) else v for k, v in arguments.items() if k != "handler"
        },
        "seconds": round(seconds, 3),
        "precision": model.precision_record(),
        "intensity_space": "target modality scale (inverse of the cohort-level normalisation)",
        **(extra or {}),
    }
    atomic_write_text(sidecar_path(out), json.dumps(sidecar, indent=2, default=str))


def sidecar_path(out: Path) -> Path:
    """``<stem>.json`` beside a ``.nii.gz`` output, ``<name>.json`` beside any other (``t2.mha.json``).

    NIfTI-gz outputs keep the plain name; every other format carries its ending, so ``t2.mha`` and
    ``t2.nii.gz`` written side by side each keep their own record.
    """
    if out.name.lower().endswith(".nii.gz"):
        return out.with_name(volume_stem(out) + ".json")
    return out.with_name(out.name + ".json")


# ------------------------------------------------------------------------ what to compute, where
@dataclass
class Job:
    """One input set (one volume of ``--inputs``) and the outputs it produces, one per target."""

    paths: dict[str, str]
    stem: str
    outputs: list[tuple[str | None, Path]] = field(default_factory=list)

    @property
    def label(self) -> str:
        return next(iter(self.paths.values()))


def plan_jobs(args: argparse.Namespace, model: SynthesisModel) -> list[Job]:
    """Input sets and output paths of the whole call, known before anything is computed."""
    if args.inputs:
        if len(model.required_modalities) != 1 or model.task.is_unified:
            raise MedsynthError(
                "--inputs works with one-source checkpoints; use --volume for several sources"
            )
        items = drop_own_outputs(list_batch_inputs(args.inputs), args.inputs, args.out, str(model.target))
        jobs = [Job({model.sources[0]: str(p)}, volume_stem(p)) for p in items]
    elif args.volume:
        paths = parse_volume_arguments(args.volume, model)
        jobs = [Job(paths, volume_stem(next(iter(paths.values()))))]
    else:
        raise MedsynthError("give --volume PATH (repeat for several sources) or --inputs DIR")
    several = len(jobs) > 1 or bool(args.inputs)
    for job in jobs:
        targets = targets_for(model, job.paths, args.target)
        for target in targets:
            model.plan.resolve_target(job.paths, target)  # a wrong modality fails before any reading
            name = target or str(model.target)
            job.outputs.append(
                (target, output_path_for(args.out, job.stem, name, several or len(targets) > 1))
            )
    if (several or any(len(job.outputs) > 1 for job in jobs)) and _volume_format(args.out) is not None:
        raise MedsynthError(
            "this call writes several volumes, so --out must be a folder (a name without a volume ending)",
            args.out,
        )
    return jobs


def resolve_batch_size(requested: int | None, model: SynthesisModel) -> int:
    """Slices per forward pass: as given, else large on a GPU (kept busy) and 16 on the CPU."""
    if requested is None:
        return CUDA_BATCH_SIZE if model.device.type == "cuda" else CPU_BATCH_SIZE
    if requested < 1:
        raise MedsynthError(f"--batch-size must be at least 1 (got {requested})")
    return requested


# ------------------------------------------------------------------------- never poison the data
def _volume_format(path: Path) -> Any:
    from ..io import formats

    return formats.format_for(path, writing=True)


def check_out_argument(out: Path) -> None:
    """Refuse an ``--out`` that names a file of another kind (``x.png``), before loading anything.

    Without this, ``--out x.png`` became a folder named ``x.png``. A name with a file-like ending
    (letters, up to 5 characters) that is not a writable volume format is an error; folders whose
    name holds a dot elsewhere (``results_2024.05``) and existing folders are accepted.
    """
    if out.is_dir() or _volume_format(out) is not None:
        return
    if FILE_LIKE_SUFFIX.match(out.suffix):
        from ..io import formats

        raise MedsynthError(
            f"--out ends in {out.suffix}, which is not a volume format medsynth writes; use "
            f"{formats.known_endings(writing=True)}, or a folder",
            out,
        )


class _InputFiles:
    """Every file an input stands for (a DICOM folder: every file inside), by path and by identity."""

    def __init__(self, paths: list[str]) -> None:
        self.by_real: dict[str, str] = {}
        self.by_inode: dict[tuple[int, int], str] = {}
        self.folders: dict[str, str] = {}
        for given in paths:
            real = os.path.realpath(given)
            self._add(real, given)
            if os.path.isdir(real):
                self.folders[real] = given
                for root, _dirs, files in os.walk(real):
                    for name in files:
                        self._add(os.path.join(root, name), given)

    def _add(self, path: str, given: str) -> None:
        self.by_real.setdefault(os.path.realpath(path), given)
        try:
            info = os.stat(path)
        except OSError:
            return
        self.by_inode.setdefault((info.st_dev, info.st_ino), given)

    def clash(self, path: Path) -> str | None:
        """Why writing ``path`` would change an input, or None."""
        if os.path.islink(path):
            return (
                "is a symbolic link; medsynth does not write through links (it could replace the file "
                "it points to): remove the link or choose another --out"
            )
        real = os.path.realpath(path)
        given = self.by_real.get(real)
        if given is None and os.path.exists(real):
            info = os.stat(real)
            given = self.by_inode.get((info.st_dev, info.st_ino))
        if given is not None:
            return f"is the input {given}; medsynth never writes over its inputs: choose another --out"
        for folder, given in self.folders.items():
            if os.path.commonpath([folder, real]) == folder:
                return f"is inside the input folder {given}, which must stay as it is: choose another --out"
        return None


def refuse_overwriting_inputs(jobs: list[Job], *, uncertainty: bool = False) -> None:
    """Refuse (one line) an output, its sidecar or (``uncertainty``) its uncertainty map that resolves to
    an input, or two jobs sharing an output.

    Paths are compared after resolving ``..``, ``.`` and links (``os.path.realpath``) and by file
    identity (device and inode, for hard links); a symbolic link at an output path is refused outright.
    """
    inputs = _InputFiles([path for job in jobs for path in job.paths.values()])
    claimed: dict[str, Job] = {}
    for job in jobs:
        for _target, out in job.outputs:
            written = (out, sidecar_path(out), *((uncertainty_path(out),) if uncertainty else ()))
            for path in written:
                problem = inputs.clash(path)
                if problem:
                    raise MedsynthError(problem, path)
            real = os.path.realpath(out)
            if real in claimed and claimed[real] is not job:
                raise MedsynthError(
                    f"{claimed[real].label} and {job.label} would both be written here; "
                    "rename one of them or run them separately",
                    out,
                )
            claimed[real] = job


def is_medsynth_output(path: Path) -> bool:
    """A volume with a medsynth sidecar (:func:`sidecar_path`, holding ``medsynth_version``) beside it.

    Outputs of earlier versions kept ``<stem>.json`` for every format; such a sidecar counts when its
    ``output`` names this file.
    """
    for sidecar in dict.fromkeys([sidecar_path(path), path.with_name(volume_stem(path) + ".json")]):
        try:
            data = json.loads(sidecar.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if not isinstance(data, dict) or "medsynth_version" not in data:
            continue
        if sidecar == sidecar_path(path) or Path(str(data.get("output", ""))).name == path.name:
            return True
    return False


def drop_own_outputs(items: list[Path], source: Path, out: Path, target: str) -> list[Path]:
    """Leave out earlier medsynth outputs, so ``--inputs D --out D`` run twice does not make ``a_t2_t2``.

    An output is recognised by its sidecar, and, when ``--out`` is the ``--inputs`` folder, by the
    ``<stem>_<target>`` and ``<stem>_uncertainty`` names this command gives its outputs (an uncertainty
    map has no sidecar of its own). Skipped files are named once.
    """
    same_folder = source.is_dir() and os.path.realpath(source) == os.path.realpath(out)
    suffixes = (f"_{target}", UNCERTAINTY_SUFFIX)
    kept = [
        p
        for p in items
        if not is_medsynth_output(p) and not (same_folder and volume_stem(p).endswith(suffixes))
    ]
    skipped = [p for p in items if p not in kept]
    if skipped:
        names = ", ".join(p.name for p in skipped[:5]) + (", ..." if len(skipped) > 5 else "")
        log.warning("skipping %d earlier medsynth output(s) in %s: %s", len(skipped), source, names)
    if not kept:
        raise MedsynthError("holds only medsynth outputs, no volumes to synthesise from", source)
    return kept


# ----------------------------------------------------------------------------- the batch run
def run_jobs(
    model: SynthesisModel, jobs: list[Job], args: argparse.Namespace, *, batch_size: int, keep_going: bool
) -> int:
    """Synthesise every job with one loaded model, overlapping reading and writing with compute.

    One thread reads the next job's inputs while the current one is synthesised; another writes the
    finished volumes (atomically, sidecar last). With ``keep_going`` (``--inputs``), a job that fails
    is reported on one line and the rest go on; the call ends with a summary and exits 1 if any failed.
    Without it, the first error ends the call (exit 2). Results do not depend on the overlap: each
    volume is computed exactly as a single ``--volume`` call computes it.
    """
    read_options = {"series_uid": args.series_uid, "volume_index": args.volume_index}
    failed: dict[int, str] = {}
    pending: deque[tuple[int, Path, str, Future[float]]] = deque()
    show_bar = None if len(jobs) > 1 and not args.quiet else True

    def fail(index: int, exc: BaseException) -> None:
        if not keep_going or (getattr(args, "debug", False) and not isinstance(exc, MedsynthError)):
            raise exc
        text = (
            str(exc)
            if isinstance(exc, MedsynthError)
            else f"{jobs[index].label}: {exc.__class__.__name__}: {exc}"
        )
        failed.setdefault(index, text)
        tqdm.write(f"error: {text}", file=sys.stderr)

    def collect(block: bool) -> None:
        while pending and (block or pending[0][3].done() or len(pending) > MAX_PENDING_WRITES):
            index, out, target, future = pending.popleft()
            try:
                seconds = future.result()
            except Exception as exc:  # noqa: BLE001  (reported per volume)
                fail(index, exc)
                continue
            if not args.quiet:
                tqdm.write(f"{out}  ({target}, {seconds:.1f} s)")

    with (
        ThreadPoolExecutor(1, thread_name_prefix="medsynth-read") as reader,
        ThreadPoolExecutor(1, thread_name_prefix="medsynth-write") as writer,
    ):
        upcoming = reader.submit(_read_job, jobs[0], read_options)
        for index, job in enumerate(tqdm(jobs, desc="volumes", unit="volume", disable=show_bar)):
            current = upcoming
            if index + 1 < len(jobs):
                upcoming = reader.submit(_read_job, jobs[index + 1], read_options)
            try:
                inputs = current.result()
                ood = screen_inputs(model, inputs, args)  # warns, or refuses with --strict
                for target, out in job.outputs:
                    check_writable(out)
                    prediction = model.predict(
                        inputs, target, batch_size=batch_size, flip_tta=args.tta,
                        progress=not args.quiet and len(jobs) == 1,
                    )  # fmt: skip
                    extras = trust_outputs(model, inputs, prediction, out, args, batch_size=batch_size)
                    future = writer.submit(
                        _write_job, prediction.volume, out, model, job.paths, prediction.seconds, vars(args),
                        {"ood": ood, **extras},
                    )  # fmt: skip
                    pending.append((index, out, prediction.target, future))
            except Exception as exc:  # noqa: BLE001  (reported per volume)
                fail(index, exc)
            collect(block=False)
        collect(block=True)
    if args.inputs:
        print_summary(jobs, failed, args.out, quiet=args.quiet)
    return 1 if failed else 0


def _read_job(job: Job, options: dict[str, Any]) -> dict[str, Volume]:
    return {modality: read_volume(path, **options) for modality, path in job.paths.items()}


def _write_job(volume: Volume, out: Path, model: SynthesisModel, paths: dict[str, str], seconds: float,
               arguments: dict[str, Any], extra: Mapping[str, Any] | None = None) -> float:  # fmt: skip
    write_prediction(volume, out, model, paths, seconds, arguments, extra)
    return seconds


def print_summary(jobs: list[Job], failed: dict[int, str], out: Path, *, quiet: bool) -> None:
    """``N of M volumes written; failed: a.nii.gz, b.nii.gz`` (on stderr when some failed)."""
    written = len(jobs) - len(failed)
    if failed:
        names = ", ".join(Path(jobs[i].label).name for i in sorted(failed))
        print(f"{written} of {len(jobs)} volumes written to {out}; failed: {names}", file=sys.stderr)
    elif not quiet:
        print(f"{written} of {len(jobs)} volumes written to {out}")
