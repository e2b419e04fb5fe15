"""The L1-only vs GAN ablation as a picture: the same held-out slices from both generators.

Both runs must share the task, data and split (``benchmarks/compare_modes.py`` trains ``demo_cpu`` and
``demo_l1`` for equal minutes). PSNR favours the blur that L1 alone produces; the adversarial term trades
some of it for texture and edge sharpness, which a zoomed crop shows better than a number.

    python benchmarks/objective_figure.py --data demo/data --gan runs/compare/demo_cpu \\
        --l1 runs/compare/demo_l1 --out docs/l1_vs_gan.png
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from medsynth.data.layouts import load_subject, scan_dataset
from medsynth.io.volume import to_canonical
from medsynth.model.synthesis import SynthesisModel
from medsynth.viz import comparison_grid


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument(
        "--gan", type=Path, required=True, help="run folder trained with train.objective: gan"
    )
    parser.add_argument("--l1", type=Path, required=True, help="run folder trained with train.objective: l1")
    parser.add_argument("--out", type=Path, default=Path("docs/l1_vs_gan.png"))
    args = parser.parse_args()
    gan, l1 = SynthesisModel.from_checkpoint(args.gan), SynthesisModel.from_checkpoint(args.l1)
    subject_id = gan.checkpoint_splits["test"][0]
    record = next(r for r in scan_dataset(args.data) if r.id == subject_id)
    source, target = gan.sources[0], str(gan.target)
    volumes = load_subject(record, [source, target])
    predictions = {
        name: model.predict({source: volumes[source]}) for name, model in (("GAN", gan), ("L1", l1))
    }
    truth = to_canonical(volumes[target])[0].array
    normalised_truth = gan.normalise({target: truth})[target]
    normalised_source = gan.normalise({source: to_canonical(volumes[source])[0].array})[source]
    mask = predictions["GAN"].mask
    present = np.flatnonzero(mask.any(axis=(0, 1)))
    rows, titles = [], []
    for k in np.linspace(present[0], present[-1], 5)[[2, 3]].astype(int):
        rows.append({
            "input T1w": normalised_source[:, :, k],
            "L1 only": predictions["L1"].normalised[:, :, k],
            "GAN (L1 + adversarial)": predictions["GAN"].normalised[:, :, k],
            "target T2w": normalised_truth[:, :, k],
        })  # fmt: skip
        titles.append(f"{subject_id}, axial {k}")
    window = {name: -1.0 for name in rows[0]}, {name: 1.0 for name in rows[0]}
    path = comparison_grid(rows, args.out, titles=titles, vmin=window[0], vmax=window[1], error_column=False)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
