"""Does the uncertainty map track the error? Every estimator on trained runs' held-out test subjects.

For every run and estimator (``tta``: test-time augmentation, any model; ``scale``: the model's own
Laplace scale head, runs trained with ``model.predict_scale=true``; ``scale+tta``: both as one Laplace,
the default of such runs) and every test subject of the run's split: masked PSNR (normalised space), Spearman(uncertainty, |error|) inside the mask, the mean |error|
of the top-decile-uncertainty voxels over the rest, the estimator's seconds beyond the plain prediction,
and an inserted lesion (a 6 mm ball at the 99.5th / 0.5th percentile of source and target:
:func:`medsynth.model.uncertainty.lesion_contrast`): mean uncertainty in the ball over its ring, and the
same ratio of |error|. Prints a markdown table and writes the rows as JSON.

The floor where an input is unlike every training voxel (medsynth/model/support.py) applies to every
estimator; ``unseen_percent`` is the share of a healthy subject's head it raised (false alarms).
The figures of docs/trust.md (12 epochs, so they do not depend on the machine's speed):

    medsynth train 't1->t2' --data /tmp/demo_data --config demo_cpu --runs-dir /tmp/unc3 --name beta0 \\
        --set train.max_minutes=null --set train.epochs=6 --set train.decay_epochs=6 \\
        --set model.predict_scale=true [--set train.seed=1] --quiet
    python benchmarks/calibration.py --data /tmp/demo_data /tmp/unc3/beta0
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from medsynth.data.layouts import load_subject, scan_dataset
from medsynth.data.masks import foreground_mask
from medsynth.io.volume import to_canonical
from medsynth.metrics import psnr
from medsynth.model.synthesis import SynthesisModel
from medsynth.model.uncertainty import (
    calibration,
    canonical_inputs,
    insert_lesion,
    lesion_contrast,
    uncertainty_map,
)
from medsynth.viz import SYNTHETIC, TARGET, UNCERTAINTY, comparison_grid

#: Benchmark label of each ``uncertainty_map`` estimator (``auto`` is scale + TTA on a model with a head).
LABELS = {"tta": "tta", "scale": "scale", "auto": "scale+tta"}


def measure(run: Path, data: Path) -> list[dict]:
    model = SynthesisModel.from_checkpoint(run)
    estimators = ("tta", "scale", "auto") if model.plan.scale_channel else ("tta",)
    records = {r.id: r for r in scan_dataset(data)}
    source, target = model.sources[0], str(model.target)
    rows = []
    for subject in model.checkpoint_splits["test"]:
        volumes = load_subject(records[subject], [source, target])
        prediction = model.predict({source: volumes[source]})
        normalised, mask, _, name = canonical_inputs(model, {source: volumes[source]}, None, prediction.mask)
        truth = model.normalise({target: to_canonical(volumes[target])[0].array})[target]
        for estimator in estimators:
            started = time.perf_counter()
            result = uncertainty_map(model, normalised, mask, name, prediction, estimator=estimator)
            seconds = time.perf_counter() - started
            row = {
                "run": run.name,
                "estimator": LABELS[estimator],
                "subject": subject,
                "psnr_masked": psnr(prediction.normalised, truth, mask=mask, data_range=2.0),
                "predict_seconds": prediction.seconds,
                "unc_seconds": seconds,
                # Healthy voxels the support floor raised (false alarms); -1: no (intensity, depth) counts.
                "unseen_percent": -1.0 if result.unseen is None else 100.0 * result.unseen.sum() / mask.sum(),
                **calibration(result.values, prediction.normalised - truth, mask),
            }
            for bright in (True, False):
                lesion = lesion_contrast(
                    model, {source: volumes[source]}, volumes[target], bright=bright, estimator=estimator
                )
                kind = "bright" if bright else "dark"
                row[f"{kind}_unc_ratio"] = lesion["uncertainty_ratio"]
                row[f"{kind}_err_ratio"] = lesion["error_ratio"]
            rows.append(row)
    return rows


def lesion_figure(run: Path, data: Path, path: Path) -> Path:
    """Axial slices through the inserted lesion of the run's first test subject, bright and dark:
    source, target, synthetic, |error| and the shipped uncertainty map (normalised space)."""
    model = SynthesisModel.from_checkpoint(run)
    source, target = model.sources[0], str(model.target)
    subject = model.checkpoint_splits["test"][0]
    volumes = load_subject({r.id: r for r in scan_dataset(data)}[subject], [source, target])
    canonical = {m: to_canonical(v)[0] for m, v in volumes.items()}
    mask = foreground_mask([canonical[source].array])
    rows, titles = [], []
    for bright in (True, False):
        arrays = {m: c.array for m, c in canonical.items()}
        changed, ball, _ = insert_lesion(arrays, mask, canonical[source].spacing, bright=bright)
        inputs = {source: canonical[source].with_array(changed[source])}
        prediction = model.predict(inputs)
        normalised, inside, _, name = canonical_inputs(model, inputs, None, prediction.mask)
        unc = uncertainty_map(model, normalised, inside, name, prediction).values
        truth = model.normalise({target: changed[target]})[target]
        k = int(round(np.argwhere(ball)[:, 2].mean()))
        rows.append({source: normalised[source][:, :, k], TARGET: truth[:, :, k],
                     SYNTHETIC: prediction.normalised[:, :, k], UNCERTAINTY: unc[:, :, k]})  # fmt: skip
        titles.append(f"{subject}, {'bright' if bright else 'dark'} lesion, slice {k}")
    return comparison_grid(
        rows, path, titles=titles, vmax={UNCERTAINTY: float(np.max([r[UNCERTAINTY] for r in rows]))}
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--out", type=Path, default=Path("calibration.json"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--figure", type=Path, help="PNG of the first run's inserted lesions (docs/lesion_uncertainty.png)"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for run in args.runs:
        rows.extend(measure(run, args.data))
    args.out.write_text(json.dumps(rows, indent=2))
    if args.figure:
        print(f"figure: {lesion_figure(args.runs[0], args.data, args.figure)}")
    columns = ["psnr_masked", "spearman", "top_decile_error_ratio", "bright_unc_ratio", "bright_err_ratio",
               "dark_unc_ratio", "dark_err_ratio", "unseen_percent", "unc_seconds"]  # fmt: skip
    print("| run | estimator | subject | " + " | ".join(columns) + " |")
    print("|" + "---|" * (3 + len(columns)))
    for row in rows:
        print(f"| {row['run']} | {row['estimator']} | {row['subject']} | "
              + " | ".join(f"{row[c]:.3g}" for c in columns) + " |")  # fmt: skip
    for run in dict.fromkeys(r["run"] for r in rows):
        for estimator in LABELS.values():
            chosen = [r for r in rows if r["run"] == run and r["estimator"] == estimator]
            if chosen:
                means = {c: float(np.mean([r[c] for r in chosen])) for c in columns}
                print(
                    f"| {run} | {estimator} | mean | " + " | ".join(f"{means[c]:.3g}" for c in columns) + " |"
                )


if __name__ == "__main__":
    main()
