"""Held-out scores of one checkpoint under the old and the current input normalisation at inference.

Before wave 2, inference fitted each input's percentiles inside the *joint* foreground mask of all sources,
while the training cache fitted them inside each volume's *own* mask: a many-to-one or unified model saw
differently scaled inputs at inference. This evaluates the same checkpoint on the same held-out subjects
both ways, so the effect of the fix is measured, not guessed.

    python benchmarks/normalisation_skew.py --run runs/compare/demo_many_to_one --data demo/data
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from medsynth.data.masks import foreground_mask
from medsynth.evaluate import evaluate, render_table, space_label
from medsynth.model.synthesis import SynthesisModel


def joint_mask_rule(model: SynthesisModel):
    """The pre-wave-2 rule: every input normalised inside the joint foreground of all inputs."""

    def normalise(canonical: Mapping[str, np.ndarray], own_masks: object = None) -> dict[str, np.ndarray]:
        mask = foreground_mask(list(canonical.values()))
        return {m: model.fingerprint._spec(m).make().fit(a, mask).forward(a) for m, a in canonical.items()}

    return normalise


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, required=True, help="run folder (its best checkpoint and splits)")
    parser.add_argument("--data", type=Path, required=True)
    args = parser.parse_args()
    for label in ("own mask (current)", "joint mask (before the fix)"):
        model = SynthesisModel.from_checkpoint(args.run)
        if label.startswith("joint"):
            model.normalise = joint_mask_rule(model)  # type: ignore[method-assign]
        out = args.run / ("eval_skew_" + label.split()[0])
        cases = evaluate(model, args.data, out, progress=False)
        print(label)
        print(render_table(cases, space_label("normalised")))


if __name__ == "__main__":
    main()
