"""A model card in every run folder: ``model_card.md`` for people, ``model_card.json`` for tools.

Written at the end of training and refreshed by ``medsynth evaluate`` (which adds the held-out metrics,
the baselines and, with ``--uncertainty``, the calibration). Everything on it is read from the run
folder: ``config.yaml`` (recipe), ``checkpoint_best.pt`` (plan, fingerprint, splits, version),
``metrics.csv`` (training time) and ``eval/summary.json`` (evaluation), so the card can be rebuilt at
any time with :func:`write_model_card` and never disagrees with the files beside it.

Example::

    from medsynth.model_card import write_model_card
    write_model_card("runs/t1_to_t2-unet2d")   # -> (model_card.md, model_card.json)
"""

from __future__ import annotations

import contextlib
import csv
import json
import logging
import os
import platform
from pathlib import Path
from typing import Any

import numpy as np

from . import __version__
from .errors import MedsynthError
from .hardware import cpu_summary
from .io.atomic import atomic_write_text
from .metrics import json_safe

log = logging.getLogger("medsynth")

CARD_MD = "model_card.md"
CARD_JSON = "model_card.json"

INTENDED_USE = (
    "Research use: synthesising a missing MR contrast for method development, data harmonisation "
    "experiments and education. Not a medical device; a synthetic image must not be used for "
    "diagnosis or treatment decisions."
)
KNOWN_LIMITS = (
    "Trained on the subjects, scanners and voxel sizes summarised above only; inputs unlike them are "
    "flagged by `medsynth infer` (out-of-distribution check, `--strict` refuses them, docs/trust.md).",
    "Pathology absent from the training data (lesions, tumours, implants) can be painted over with "
    "healthy-looking tissue. `--uncertainty` maps rise where an input intensity never occurred at its "
    "depth in the training heads (fat- or bone-like blobs deep inside); a lesion that looks, voxel by "
    "voxel and depth by depth, like tissue the model has seen there is not flagged.",
    "Inputs are normalised per volume (foreground percentiles); outputs are on the cohort's typical "
    "intensity scale, not a calibrated physical quantity.",
)


def _read_csv(path: Path) -> list[dict[str, str]]:
    if not path.is_file():
        return []
    with open(path, encoding="utf-8", newline="") as stream:
        return list(csv.DictReader(stream))


def _training_time(rows: list[dict[str, str]]) -> dict[str, Any]:
    seconds = 0.0
    for row in rows:
        for key in ("seconds", "val_seconds", "io_seconds"):
            with contextlib.suppress(ValueError):
                seconds += float(row.get(key) or 0)
    if not rows:
        return {"epochs": 0, "seconds": round(seconds, 1)}
    # An epoch the time budget ended early (metrics.csv ``partial`` = "k/n" steps) is not a whole one.
    partial = rows[-1].get("partial") or ""
    summary: dict[str, Any] = {"epochs": int(rows[-1]["epoch"]) - bool(partial), "seconds": round(seconds, 1)}
    if partial:
        summary["partial_epoch"] = f"{partial} steps of epoch {rows[-1]['epoch']}"
    return summary


def _hardware(device: str) -> dict[str, Any]:
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    info: dict[str, Any] = {
        "device": device,
        "machine": platform.machine(),
        "cpu": cpu_summary(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
    }
    if torch.cuda.is_available():
        info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return info


def _data_summary(fingerprint: dict[str, Any], splits: dict[str, list[str]]) -> dict[str, Any]:
    """Per modality: training subjects, spacing / shape ranges (canonical RAS when recorded)."""
    per_modality: dict[str, Any] = {}
    for entry in fingerprint.get("subjects", {}).values():
        for modality, stats in entry.items():
            geometry = stats.get("appearance", stats)
            item = per_modality.setdefault(modality, {"spacing": [], "shape": []})
            item["spacing"].append(geometry["spacing"])
            item["shape"].append(geometry["shape"])
    summary = {}
    for modality, item in per_modality.items():
        spacing, shape = np.asarray(item["spacing"]), np.asarray(item["shape"])
        summary[modality] = {
            "subjects": len(spacing),
            "spacing_mm_min": spacing.min(axis=0).round(3).tolist(),
            "spacing_mm_max": spacing.max(axis=0).round(3).tolist(),
            "shape_min": shape.min(axis=0).tolist(),
            "shape_max": shape.max(axis=0).tolist(),
            "normalisation": fingerprint.get("specs", {}).get(modality, {}).get("scheme"),
        }
    return {
        "modalities": summary,
        "splits": {name: len(ids) for name, ids in splits.items()},
        "split_ids": splits,
        "scanners": "not recorded (add scanner/sequence metadata to the data set's sidecars)",
    }


def _previous_hardware(run_dir: Path) -> dict[str, Any] | None:
    try:
        return json.loads((run_dir / CARD_JSON).read_text(encoding="utf-8"))["training"]["hardware"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _precision(run_dir: Path) -> dict[str, Any] | None:
    """The training run's precision and why (``precision.json``, written when the run started)."""
    try:
        return json.loads((run_dir / "precision.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def build_model_card(run_dir: str | Path) -> dict[str, Any]:
    """The card's content as a JSON-ready dict (see the module docstring for its sources)."""
    import yaml

    from .model.checkpoint import BEST, file_digest, load_checkpoint
    from .model.plan import SynthesisPlan
    from .model.synthesis import checkpoint_directions

    run_dir = Path(run_dir)
    checkpoint = run_dir / BEST
    payload = load_checkpoint(checkpoint)
    plan = SynthesisPlan.from_checkpoint(payload, str(checkpoint))
    config_path = run_dir / "config.yaml"
    config = yaml.safe_load(config_path.read_text(encoding="utf-8")) if config_path.is_file() else {}
    splits = payload.get("data", {}).get("splits", {})
    summary_path = run_dir / "eval" / "summary.json"
    evaluation = json.loads(summary_path.read_text(encoding="utf-8")) if summary_path.is_file() else None
    train_config = config.get("train", {}) if isinstance(config, dict) else {}
    return {
        "name": run_dir.name,
        "task": str(plan.task),
        # Every direction the checkpoint serves (``infer --target`` picks) and how its data was paired.
        "directions": checkpoint_directions(payload),
        "pairing": str(payload.get("data", {}).get("pairing", "paired")),
        "recipe": {
            "generator": plan.generator.to_dict(),
            "spatial_dims": plan.spatial_dims,
            "context": plan.context,
            "window": list(plan.window) if plan.window else None,
            "objective": payload.get("objective"),
            "config": config,
        },
        "data": _data_summary(payload.get("fingerprint", {}), splits),
        "training": {
            **_training_time(_read_csv(run_dir / "metrics.csv")),
            "best_validation": payload.get("best"),
            # The training machine: probed when the card is first written (the end of training) and
            # kept by later refreshes, which may run elsewhere (``medsynth evaluate`` on another box).
            "hardware": _previous_hardware(run_dir) or _hardware(str(train_config.get("device", "auto"))),
            "precision": _precision(run_dir),
        },
        "evaluation": evaluation,
        "calibration": (evaluation or {}).get("calibration"),
        "intended_use": INTENDED_USE,
        "known_limits": list(KNOWN_LIMITS),
        "medsynth_version": payload.get("medsynth_version", __version__),
        "card_written_by": __version__,
        "checkpoint": {"path": BEST, "sha256": file_digest(checkpoint), "epoch": payload.get("epoch")},
    }


def _directions_lines(card: dict[str, Any]) -> list[str]:
    """What a model trained on unpaired data, or holding several directions, must say up front."""
    directions, pairing = card.get("directions") or [card["task"]], card.get("pairing", "paired")
    if len(directions) < 2 and pairing == "paired":
        return []
    lines = []
    if len(directions) > 1:
        lines.append(
            f"**Directions**: {', '.join(f'`{d}`' for d in directions)}; the first is the run's own, the "
            "others are chosen with `--target` (infer, evaluate, convert, export). Scores below are the first's "
            "unless the evaluation names another target."
        )
    if pairing == "unpaired":
        lines.append(
            "**Trained on unpaired data** (`data.pairing: unpaired`): source and target images were drawn "
            "independently, so nothing in training tied a synthetic image to its subject's real one. Unpaired "
            "methods can add or remove anatomy; check structure agreement (head and bone outlines) as well as "
            "intensity scores."
        )
    return [part for line in lines for part in (line, "")]


def _range(low: list[Any], high: list[Any]) -> str:
    fmt = lambda v: "x".join(f"{x:g}" for x in v)  # noqa: E731
    return fmt(low) if low == high else f"{fmt(low)} .. {fmt(high)}"


def _best(best: dict[str, Any] | None) -> str:
    if not best or "value" not in best:
        return "no validation score recorded"
    text = f"best validation {best.get('metric')} {_num(best['value'])} at epoch {best.get('epoch')}"
    return text + validation_note(best)


#: Said wherever a best validation score of an unpaired run without validation targets is shown.
ROUND_TRIP_NOTE = (
    " (held-out subjects without a target: chosen by the divergence of the synthetic targets' intensity"
    " histogram from the training targets', which a copy of the input cannot win; the round trip source ->"
    " target -> source is a consistency score beside it; neither compares with a real target)"
)
#: Said wherever a best validation score against registered held-out targets is shown.
REGISTERED_TARGET_NOTE = (
    " (against the held-out subjects' real targets, each first registered rigidly onto its source: unpaired or"
    " misaligned data promise no alignment)"
)


def validation_note(best: dict[str, Any]) -> str:
    """How a run's best validation score was measured, when it was not a plain comparison with aligned targets
    (``best["validation"]``, recorded by the loop's model selection)."""
    return {"round trip": ROUND_TRIP_NOTE, "registered target": REGISTERED_TARGET_NOTE}.get(
        str(best.get("validation")), ""
    )


def _num(value: Any) -> str:
    return f"{value:.3f}" if isinstance(value, (int, float)) else str(value)


def render_markdown(card: dict[str, Any]) -> str:
    """The card as Markdown: one section per topic, tables where there are numbers."""
    recipe, data, training = card["recipe"], card["data"], card["training"]
    lines = [
        f"# Model card: {card['name']}",
        "",
        f"**Task** `{card['task']}` · **generator** `{recipe['generator']['name']}` "
        f"({recipe['spatial_dims']}D, context {recipe['context']}, window {recipe['window']}) · "
        f"**medsynth** {card['medsynth_version']} · **checkpoint** `{card['checkpoint']['path']}` "
        f"(epoch {card['checkpoint']['epoch']}, SHA-256 `{card['checkpoint']['sha256']}`)",
        "",
        *_directions_lines(card),
        "## Intended use",
        card["intended_use"],
        "",
        "## Known limits",
        *[f"- {limit}" for limit in card["known_limits"]],
        "",
        "## Training data (fingerprint of the training subjects)",
        "| modality | subjects | spacing (mm, RAS) | shape | normalisation |",
        "|---|---|---|---|---|",
    ]
    for modality, item in data["modalities"].items():
        lines.append(
            f"| {modality} | {item['subjects']} | {_range(item['spacing_mm_min'], item['spacing_mm_max'])} | "
            f"{_range(item['shape_min'], item['shape_max'])} | {item['normalisation']} |"
        )
    splits = ", ".join(f"{k} {v}" for k, v in data["splits"].items())
    lines += [
        "",
        f"Splits (by subject, saved in splits.json): {splits}. Scanners: {data['scanners']}.",
        "",
        "## Training",
        f"{training['epochs']} epochs"
        + (
            f" and {training['partial_epoch']} (the time budget ended it)"
            if training.get("partial_epoch")
            else ""
        )
        + f" in {training['seconds'] / 60:.1f} min on {training['hardware']['device']} "
        f"({training['hardware'].get('cpu') or str(training['hardware']['cpu_count']) + ' CPUs'}"
        + (f", {', '.join(training['hardware']['gpus'])}" if training["hardware"].get("gpus") else "")
        + f", torch {training['hardware']['torch']}); {_best(training['best_validation'])}.",
        *_precision_lines(training.get("precision")),
        "",
        "## Held-out evaluation",
    ]
    evaluation = card.get("evaluation")
    if not evaluation:
        lines.append("Not evaluated yet: run `medsynth evaluate --run RUN --baselines` to fill this table.")
    else:
        lines += [
            f"Split `{evaluation.get('split')}`, intensity space: {evaluation.get('space')}; "
            f"mask: {evaluation.get('mask')}.",
            "",
            "| method | inputs -> target | n | PSNR (dB) | SSIM | MAE |",
            "|---|---|---|---|---|---|",
        ]
        for group in evaluation.get("groups", []):
            cells = [
                f"{_num(group[m]['mean'])} ± {_num(group[m]['std'])}" if m in group else "-"
                for m in ("psnr_masked", "ssim3d_masked", "mae_masked")
            ]
            lines.append(
                f"| {group['method']} | {group['inputs']} -> {group['target']} | {group['subjects']} | "
                + " | ".join(cells)
                + " |"
            )
        lines += _hounsfield_lines(evaluation.get("groups", []))
    lines += ["", "## Uncertainty calibration"]
    calibration = card.get("calibration")
    if not calibration:
        lines.append("Not measured: run `medsynth evaluate --run RUN --uncertainty`.")
    else:
        lines.append(
            f"Estimator: {calibration.get('estimator')}. Spearman(uncertainty, |error|) inside the mask: "
            f"{_num(calibration.get('spearman_mean'))}; mean |error| of the top-decile-uncertainty "
            f"voxels / the rest: {_num(calibration.get('top_decile_ratio_mean'))} "
            f"(mean over {calibration.get('subjects')} subjects)."
        )
    return "\n".join(lines) + "\n"


def _hounsfield_lines(groups: list[dict[str, Any]]) -> list[str]:
    """A CT target's table in Hounsfield units (``medsynth.evaluate_ct``), when the evaluation has one."""
    from .evaluate_ct import CT_TABLE

    rows = [g for g in groups if "mae_hu" in g]
    if not rows:
        return []
    lines = [
        "",
        "In Hounsfield units, inside the body (PSNR over [-1024, 3071] HU; bone > 250 HU; range error: "
        "water-equivalent depth to each brain voxel, 8 axial proton beams):",
        "",
        "| method | n | " + " | ".join(title for _, title, _ in CT_TABLE) + " |",
        "|---|---|" + "---|" * len(CT_TABLE),
    ]

    def cell(value: Any, fmt: str) -> str:  # summary.json writes infinities as "inf"
        return fmt.format(value) if isinstance(value, (int, float)) else str(value)

    for group in rows:
        cells = [
            f"{cell(group[key]['mean'], fmt)} ± {cell(group[key]['std'], fmt).lstrip('+')}"
            if key in group
            else "-"
            for key, _, fmt in CT_TABLE
        ]
        lines.append(f"| {group['method']} | {group['subjects']} | " + " | ".join(cells) + " |")
    return lines


def _precision_lines(precision: dict[str, Any] | None) -> list[str]:
    if not precision:
        return []
    layout = "channels_last" if precision.get("channels_last") else "contiguous"
    return ["", f"Precision: {precision.get('precision')}, {layout} ({precision.get('reason')})."]


def write_model_card(run_dir: str | Path) -> tuple[Path, Path]:
    """Write (or refresh) ``model_card.md`` and ``model_card.json`` in ``run_dir``, atomically."""
    run_dir = Path(run_dir)
    card = json_safe(build_model_card(run_dir))
    json_path = atomic_write_text(run_dir / CARD_JSON, json.dumps(card, indent=2, default=str) + "\n")
    md_path = atomic_write_text(run_dir / CARD_MD, render_markdown(card))
    return Path(md_path), Path(json_path)


def refresh_model_card(run_dir: str | Path | None) -> Path | None:
    """:func:`write_model_card` for callers that must not fail because of it (end of training, evaluate)."""
    if run_dir is None or not (Path(run_dir) / "config.yaml").is_file():
        return None
    try:
        return write_model_card(run_dir)[0]
    except (MedsynthError, OSError, KeyError, TypeError, ValueError) as exc:
        log.warning("model card not written in %s: %s", run_dir, exc)
        return None


def refresh_after_evaluation(checkpoint: str | Path, out: str | Path) -> Path | None:
    """Refresh the card of the checkpoint's run folder when the evaluation was written to ``RUN/eval``."""
    run_dir = Path(checkpoint).parent
    if Path(out).resolve() != (run_dir / "eval").resolve():
        return None
    return refresh_model_card(run_dir)
