"""``medsynth evaluate``: synthesise held-out subjects and score them honestly.

Each held-out subject goes through the same path as ``medsynth infer`` (raw files -> SynthesisModel), and is
scored on the whole volume and inside the foreground mask of its inputs, in a stated intensity space:

* ``normalised`` (default): the space the network works in. The target is normalised exactly as a
  training target (its own foreground percentiles -> [-1, 1]); data range 2.
* ``native``: the synthetic volume mapped back to the target modality's scale (cohort-level
  parameters of the fingerprint) against the untouched target; data range = the target's max - min.

Trivial baselines (``--baselines``) are scored the same way: the normalised source itself and a
source -> target intensity lookup table fitted on the run's training subjects.

A CT target is also scored in Hounsfield units, whatever produced it (:mod:`medsynth.evaluate_ct`): MAE
and mean error inside the body, PSNR over [-1024, 3071] HU, MS-SSIM, per tissue band, bone Dice and
95 % Hausdorff distance, and the proton range error of the dose surrogate; the baselines gain the
bulk-density assignment and an MR-threshold bone segmentation, and each subject's figure shows the MR,
both CTs, their HU difference and the range-error map.

``--uncertainty`` also measures whether the model's voxel-wise uncertainty
(:func:`medsynth.model.uncertainty.uncertainty_map`: its scale head, else TTA) tracks its error, in
normalised space inside the mask: ``spearman_unc_err`` (Spearman rho of uncertainty and |error|),
``top_decile_error_ratio`` (mean |error| of the top-decile-uncertainty voxels / that of the rest) and
``unc_seconds`` (the estimator's time beyond the plain prediction) per subject, their mean in the
summary's ``calibration`` block, and a ``*_uncertainty.png`` per subject (|error| beside uncertainty).
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import logging
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from . import __version__
from .baselines import BoneThresholdBaseline, BulkDensityBaseline, IdentityBaseline, IntensityLUTBaseline
from .config import load_config
from .data.fingerprint import Fingerprint
from .data.layouts import SubjectRecord, load_subject, scan_dataset
from .data.masks import foreground_mask
from .errors import MedsynthError
from .evaluate_ct import CTScoring, render_ct_table
from .io.atomic import atomic_path, atomic_write_text
from .io.volume import Volume, to_canonical
from .metrics import compute_metrics, json_safe
from .model.checkpoint import resolve_checkpoint
from .model.synthesis import Prediction, SynthesisModel
from .model.uncertainty import calibration, uncertainty_map
from .model_card import refresh_after_evaluation
from .viz import subject_figure, uncertainty_figure

log = logging.getLogger("medsynth")

#: Columns of the printed table: masked metrics, the numbers the README reports.
TABLE_METRICS = ("psnr_masked", "ssim3d_masked", "mae_masked")


@dataclass
class Case:
    """One scored synthesis: a subject, a method, a target and the inputs it was given."""

    subject: str
    method: str
    target: str
    inputs: tuple[str, ...]
    metrics: dict[str, Any]


def evaluate_from_args(args: argparse.Namespace) -> int:
    if args.run:
        run = args.run
        checkpoint = resolve_checkpoint(args.checkpoint or run)
        config = load_config(run / "config.yaml")
        data_root = args.data or config.data.root
        manifest = config.data.manifest
    elif args.checkpoint and args.data:
        run, checkpoint, data_root, manifest = None, args.checkpoint, args.data, None
    else:
        raise MedsynthError("give --run RUN, or --checkpoint CKPT with --data DIR")
    if not data_root:
        raise MedsynthError("the run does not say where its data is; pass --data DIR", args.run)
    model = SynthesisModel.from_checkpoint(
        checkpoint, device=args.device, precision=getattr(args, "precision", "fp32"),
        target=getattr(args, "target", None),
    )  # fmt: skip
    # The run's own direction is scored into RUN/eval (the model card reads it); another direction of a
    # checkpoint that holds several gets its own folder, so neither overwrites the other.
    own = model.directions[0] == str(model.task)
    folder = "eval" if own else f"eval_{'-'.join(model.sources)}_to_{model.target}"
    out = args.out or ((run or Path(checkpoint).parent) / folder)
    cases = evaluate(
        model, data_root, out, split=args.split, space=args.space, manifest=manifest,
        baselines=args.baselines, progress=not args.quiet,
        uncertainty=getattr(args, "uncertainty", False),
    )  # fmt: skip
    print(render_table(cases, space_label(args.space)))
    if any(case.target == "ct" for case in cases):
        print(render_ct_table(cases))
    print(f"per-subject rows: {out / 'metrics.csv'}; summary: {out / 'summary.json'}; figures: {out}/*.png")
    return 0


def space_label(space: str) -> str:
    return (
        "normalised [-1, 1], data range 2"
        if space == "normalised"
        else "native target scale, data range = max - min"
    )


def select_subjects(
    records: list[SubjectRecord], splits: dict[str, list[str]], split: str
) -> list[SubjectRecord]:
    """The records of one split of the checkpoint's run (``all`` = every subject found)."""
    if split == "all":
        return records
    wanted = set(splits.get(split, []))
    chosen = [r for r in records if r.id in wanted]
    if not chosen:
        raise MedsynthError(
            f"none of the run's {split} subjects are in this data folder; use --split all to score every subject"
        )
    return chosen


def evaluate(
    model: SynthesisModel,
    data_root: str | Path,
    out: Path,
    *,
    split: str = "test",
    space: str = "normalised",
    manifest: str | None = None,
    baselines: bool = False,
    progress: bool = True,
    uncertainty: bool = False,
) -> list[Case]:
    """Score every subject of ``split``; write metrics.csv, summary.json and one PNG per subject.

    ``uncertainty`` adds the calibration columns and figures (module docstring).
    """
    records = scan_dataset(data_root, manifest)
    splits = model.checkpoint_splits
    subjects = scorable_subjects(model, select_subjects(records, splits, split), split)
    fitted = fit_baselines(model, records, splits.get("train", [])) if baselines else {}
    cases: list[Case] = []
    for record in tqdm(subjects, desc="subjects", disable=None if progress else True):
        cases.extend(evaluate_subject(model, record, out, space, fitted, uncertainty=uncertainty))
    write_results(cases, out, model, split, space)
    refresh_after_evaluation(model.source, out)  # the run's model card gets the held-out table
    return cases


def evaluate_subject(
    model: SynthesisModel,
    record: SubjectRecord,
    out: Path,
    space: str,
    baselines: dict[str, Any],
    *,
    uncertainty: bool = False,
) -> Iterator[Case]:
    """Synthesise and score one subject for every (target, input set) the model supports."""
    task = model.task
    needed = list(task.modalities) if task.is_unified else [*task.sources, str(task.target)]
    # A unified model is scored on whatever the subject has; a missing fixed input is load_subject's error.
    volumes = load_subject(record, [m for m in needed if m in record.paths] if task.is_unified else needed)
    for target, inputs in input_sets(model, tuple(volumes)):
        given = {m: volumes[m] for m in inputs}
        prediction = model.predict(given, target)
        truth = _canonical_array(volumes[target])
        mask = prediction.mask
        # Scored against the target normalised by the rule every image of the model follows.
        truth_normalised = model.normalise({target: truth})[target]
        sources_normalised = model.normalise({m: _canonical_array(volumes[m]) for m in inputs})
        candidates = {"model": prediction.normalised}
        label = "-".join(inputs) + f"_to_{target}"
        calibrated = (
            measure_calibration(model, sources_normalised, truth_normalised, target, prediction,
                                out / f"{record.id}_{label}_uncertainty.png", volumes[target].spacing)
            if uncertainty else {}
        )  # fmt: skip
        first = inputs[0]
        if "lut" in baselines and not model.task.is_unified:
            if target != "ct":  # an MR is no CT estimate; the bulk-density baselines below are
                candidates["identity"] = IdentityBaseline().predict(sources_normalised[first])
            candidates["lut"] = baselines["lut"].predict(sources_normalised[first])
        if target == "ct" and "bone_threshold" in baselines:
            window = model.fingerprint.output_normalizer(target)
            for baseline in (BulkDensityBaseline(), baselines["bone_threshold"]):
                candidates[baseline.name] = window.forward(
                    baseline.predict_hu(sources_normalised[first], mask)
                )
        hounsfield = CTScoring(truth, mask, prediction.spacing) if target == "ct" else None
        for method, normalised in candidates.items():
            if space == "native":
                native = model.fingerprint.output_normalizer(target).inverse(normalised)
                metrics = compute_metrics(native, truth, mask=mask, data_range=float(truth.max() - truth.min()),
                                          space=f"native {target} intensity")  # fmt: skip
            else:
                metrics = compute_metrics(normalised, truth_normalised, mask=mask, data_range=2.0,
                                          space="normalised [-1, 1]")  # fmt: skip
            if method == "model":
                metrics.update(calibrated)
            if hounsfield is not None:  # a CT target is also scored in HU, the way radiotherapy reads it
                hu = model.fingerprint.output_normalizer(target).inverse(normalised)
                figure = ((first, sources_normalised[first]), out / f"{record.id}_{label}.png")
                metrics.update(hounsfield.score(hu, figure if method == "model" else None))
            yield Case(record.id, method, target, inputs, metrics)
        # A unified model is scored from every input subset; one figure per target (all others given)
        # shows it without writing 2**(M-1) near-identical PNGs per target.
        if len(inputs) == len(volumes) - 1 and hounsfield is None:
            subject_figure(sources_normalised, prediction.normalised, truth_normalised,
                           out / f"{record.id}_{label}.png", mask=mask, spacing=volumes[target].spacing)  # fmt: skip


def measure_calibration(
    model: SynthesisModel,
    sources: dict[str, np.ndarray],
    truth: np.ndarray,
    target: str,
    prediction: Prediction,
    figure: Path,
    spacing: tuple[float, ...],
) -> dict[str, Any]:
    """The uncertainty of one prediction against its error (normalised space, inside the mask)."""
    started = time.perf_counter()
    mask = prediction.mask
    unc = uncertainty_map(model, sources, mask, target, prediction)
    seconds = time.perf_counter() - started
    result = calibration(unc.values, prediction.normalised - truth, mask)
    uncertainty_figure(prediction.normalised, truth, unc.values, figure, mask=mask, spacing=spacing)
    return {
        "spearman_unc_err": result["spearman"],
        "top_decile_error_ratio": result["top_decile_error_ratio"],
        "unc_seconds": seconds,
        "estimator": unc.estimator,
    }


def input_sets(model: SynthesisModel, available: tuple[str, ...]) -> Iterator[tuple[str, tuple[str, ...]]]:
    """(target, inputs) pairs to score: the fixed task, or for a unified model every target and every
    non-empty subset of the subject's other modalities."""
    if not model.task.is_unified:
        yield str(model.target), tuple(model.sources)
        return
    for target in available:
        others = [m for m in available if m != target]
        for size in range(1, len(others) + 1):
            for subset in itertools.combinations(others, size):
                yield target, subset


def scorable_subjects(model: SynthesisModel, records: list[SubjectRecord], split: str) -> list[SubjectRecord]:
    """The records that hold the model's inputs and its target (unpaired runs have subjects with one
    side only: they are left out, said in one line); a unified model takes what each subject has."""
    if model.task.is_unified:
        return records
    needed = {*model.sources, str(model.target)}
    kept = [r for r in records if needed <= set(r.paths)]
    left = sorted(r.id for r in records if r not in kept)
    if not kept:
        raise MedsynthError(
            f"no {split} subject has both {', '.join(model.sources)} and {model.target} to score against; "
            "use --split all, or give --data a folder with complete subjects"
        )
    if left:
        log.warning("%d %s subject(s) lack %s and are not scored: %s", len(left), split,
                    " or ".join(sorted(needed)), ", ".join(left))  # fmt: skip
    return kept


def fit_baselines(
    model: SynthesisModel, records: list[SubjectRecord], train_ids: list[str]
) -> dict[str, Any]:
    """Fit the lookup-table baseline on the run's training subjects (first source -> target)."""
    if model.task.is_unified:
        return {}
    source, target = model.sources[0], str(model.target)
    fingerprint: Fingerprint = model.fingerprint
    train = [r for r in records if r.id in set(train_ids) and {source, target} <= set(r.paths)]
    if not train:
        log.warning("no training subject of the run with both %s and %s in this data folder; baselines skipped",
                    source, target)  # fmt: skip
        return {}
    fitted: dict[str, Any] = {}
    if target == "ct":

        def hu_pairs() -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
            for record in train:
                volumes = load_subject(record, [source, target])
                src, ct = _canonical_array(volumes[source]), _canonical_array(volumes[target])
                yield fingerprint.input_normalizer(source, src).forward(src), ct, foreground_mask([src])

        fitted["bone_threshold"] = BoneThresholdBaseline().fit(hu_pairs())

    def pairs() -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        for record in train:
            volumes = load_subject(record, [source, target])
            src, tgt = _canonical_array(volumes[source]), _canonical_array(volumes[target])
            mask = foreground_mask([src])
            yield (fingerprint.input_normalizer(source, src).forward(src),
                   fingerprint.input_normalizer(target, tgt).forward(tgt), mask)  # fmt: skip

    return {**fitted, "lut": IntensityLUTBaseline().fit(pairs())}


def _canonical_array(volume: Volume) -> np.ndarray:
    return to_canonical(volume)[0].array


# ---------------------------------------------------------------------------------- outputs
def write_results(cases: list[Case], out: Path, model: SynthesisModel, split: str, space: str) -> None:
    """metrics.csv (one row per case) and summary.json (mean, std, median per group)."""
    if not cases:
        raise MedsynthError("nothing was evaluated")
    metric_names = list(
        dict.fromkeys(
            k
            for case in cases
            for k, v in case.metrics.items()
            if isinstance(v, (int, float)) and k != "mask_voxels"
        )
    )
    with atomic_path(out / "metrics.csv") as temp, open(temp, "w", newline="", encoding="utf-8") as stream:
        writer = csv.writer(stream)
        writer.writerow(["subject", "method", "target", "inputs", *metric_names, "mask_voxels", "space"])
        for case in cases:
            writer.writerow([case.subject, case.method, case.target, "+".join(case.inputs),
                             *[_fmt(case.metrics.get(m)) for m in metric_names], case.metrics["mask_voxels"],
                             case.metrics["space"]])  # fmt: skip
    summary = {
        "medsynth_version": __version__,
        "checkpoint": model.describe(),
        "precision": model.precision_record(),
        "split": split,
        "space": space_label(space),
        "mask": "foreground of the input volumes (Otsu, hole-filled, largest component); *_masked metrics",
        "groups": summarise(cases, metric_names),
    }
    calibrated = [c for c in cases if "spearman_unc_err" in c.metrics]
    if calibrated:
        summary["calibration"] = summarise_calibration(calibrated)
    atomic_write_text(out / "summary.json", json.dumps(json_safe(summary), indent=2))


def summarise(cases: list[Case], metric_names: list[str]) -> list[dict[str, Any]]:
    groups: dict[tuple[str, str, str], list[Case]] = {}
    for case in cases:
        groups.setdefault((case.method, case.target, "+".join(case.inputs)), []).append(case)
    result = []
    for (method, target, inputs), members in groups.items():
        entry: dict[str, Any] = {
            "method": method,
            "target": target,
            "inputs": inputs,
            "subjects": len(members),
        }
        for name in metric_names:
            if any(name not in m.metrics for m in members):
                continue
            values = np.array([m.metrics[name] for m in members], dtype=np.float64)
            finite = values[np.isfinite(values)]
            entry[name] = {
                "mean": float(finite.mean()) if finite.size else math.inf,
                "std": float(finite.std()) if finite.size else 0.0,
                "median": float(np.median(values)),
            }
        result.append(entry)
    return result


def summarise_calibration(cases: list[Case]) -> dict[str, Any]:
    """The ``calibration`` block of summary.json (read by the model card): means over the model's cases."""
    block: dict[str, Any] = {
        "estimator": cases[0].metrics["estimator"],
        "subjects": len({c.subject for c in cases}),
        "space": "normalised [-1, 1], inside the mask",
    }
    for name, key in (("spearman_unc_err", "spearman"), ("top_decile_error_ratio", "top_decile_ratio"),
                      ("unc_seconds", "unc_seconds")):  # fmt: skip
        values = np.array([c.metrics[name] for c in cases], dtype=np.float64)
        block[f"{key}_mean"] = float(np.nanmean(values))
        block[f"{key}_std"] = float(np.nanstd(values))
        block[f"{key}_min"] = float(np.nanmin(values))
    return block


def render_table(cases: list[Case], space: str) -> str:
    """Mean ± std over subjects of the masked metrics, one line per method/target/inputs."""
    groups = summarise(cases, list(TABLE_METRICS))
    header = f"{'method':<10} {'inputs -> target':<24} {'n':>3}  {'PSNR (dB)':>14}  {'SSIM':>13}  {'MAE':>15}"
    lines = [
        f"held-out metrics inside the foreground mask; intensity space: {space}",
        header,
        "-" * len(header),
    ]
    for group in groups:
        psnr, ssim, mae = (group[m] for m in TABLE_METRICS)
        lines.append(
            f"{group['method']:<10} {group['inputs'] + ' -> ' + group['target']:<24} {group['subjects']:>3}  "
            f"{psnr['mean']:>7.2f} ± {psnr['std']:<5.2f}  {ssim['mean']:>6.3f} ± {ssim['std']:<5.3f}  "
            f"{mae['mean']:>7.4f} ± {mae['std']:<6.4f}"
        )
    return "\n".join(lines)


def _fmt(value: float | None) -> str:
    if value is None:
        return ""
    return "inf" if value == math.inf else f"{value:.6g}"
