"""How close can ANY predictor get to the demo cohort's targets? (the noise/bias ceiling)

Each demo contrast carries its own Rician noise and its own smooth bias field (+-20 %), drawn
independently of the other contrasts. No model can predict them from the inputs, so they cap every
score. This script measures that cap: for each subject it rebuilds the target's noise-free, bias-free
signal (with the subject's true relaxation times: an oracle, better than any real predictor) and scores
it against the real target exactly as ``medsynth evaluate`` scores a model (both normalised to [-1, 1]
with their own foreground percentiles; PSNR inside the inputs' foreground mask; data range 2).

    .venv/bin/python benchmarks/demo_ceiling.py --spacing 2 --subjects 12 --target t2 --source t1
"""

from __future__ import annotations

import argparse

import machine
import numpy as np

from medsynth.data import demo
from medsynth.data.masks import foreground_mask
from medsynth.data.normalize import PercentileNormalizer
from medsynth.metrics import psnr, ssim_3d


def normalised(image: np.ndarray) -> np.ndarray:
    return PercentileNormalizer().fit(image, foreground_mask([image])).forward(image)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spacing", type=float, default=2.0)
    parser.add_argument("--subjects", type=int, default=12)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--source", default="t1")
    parser.add_argument("--target", default="t2")
    args = parser.parse_args()
    print(machine.describe())
    base = demo.anatomy(args.spacing)
    scores = []
    print(f"oracle (noise- and bias-free {args.target}) vs the real {args.target}, mask of {args.source}")
    print("| subject | PSNR (dB) | SSIM |\n|---|---|---|")
    for index in range(args.subjects):
        # Same draws, in the same order, as demo.simulate_subject.
        rng = np.random.default_rng((args.seed, index))
        fractions, _ = demo.warp_anatomy(base, rng)
        relaxation = demo.jittered_tissues(rng)
        images, clean = {}, {}
        for sequence in demo.SEQUENCES:
            images[sequence.modality] = demo.simulate_contrast(
                sequence, fractions, relaxation, args.spacing, rng
            )
            signal = np.tensordot(sequence.signal(*relaxation).astype(np.float32), fractions, axes=1)
            clean[sequence.modality] = np.abs(signal)
        mask = foreground_mask([images[args.source]])
        oracle, target = normalised(clean[args.target]), normalised(images[args.target])
        scores.append(
            (
                psnr(oracle, target, mask=mask, data_range=2.0),
                ssim_3d(oracle, target, mask=mask, data_range=2.0),
            )
        )
        print(f"| sub-{index + 1:02d} | {scores[-1][0]:.2f} | {scores[-1][1]:.3f} |")
    values = np.array(scores)
    print(
        f"| mean ± std | {values[:, 0].mean():.2f} ± {values[:, 0].std():.2f} | {values[:, 1].mean():.3f} ± {values[:, 1].std():.3f} |"
    )


if __name__ == "__main__":
    main()
