"""Can distance to the training data's features flag the inserted lesion that the scale head misses?

Issue 14 asks the uncertainty map to be ≥ 2× higher in a lesion no training subject had than in the
tissue around it, while still ranking ordinary voxels by their error (Spearman ≥ 0.3, top-decile error
ratio ≥ 2). The scale head meets the last two and not the first (docs/trust.md): it predicts the error of
tissue it has seen. This measures the classic epistemic complement (feature-space density, as in deep
nearest-neighbour OOD detection and DDU): the k-nearest-neighbour distance of each voxel's generator
features (the input of module ``--layer``, upsampled to the slice) to a bank of training-voxel features,
and the map ``b * max(1, z / z_q)``, where ``z`` is the distance over the median distance of validation
voxels with a similar ``b`` and ``z_q`` the ``q``-th percentile of ``z`` on the validation subjects.

For each held-out test subject it prints the whole-head calibration of the combined map per ``q`` and,
for a bright and a dark inserted lesion (:func:`medsynth.model.uncertainty.insert_lesion`), the
distance's and the combined map's mean in the lesion over its ring. A measurement, not a feature:
``medsynth`` does not ship this map (docs/trust.md says why).

    python benchmarks/feature_novelty.py --run /tmp/unc_runs/laplace --data /tmp/demo_data --layer head
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from medsynth.data.datasets import crop_plane, round_up, window_slices
from medsynth.data.layouts import load_subject, scan_dataset
from medsynth.data.masks import bounding_box
from medsynth.io.volume import Volume, to_canonical
from medsynth.model.slicing import BACKGROUND, context_indices
from medsynth.model.synthesis import SynthesisModel
from medsynth.model.uncertainty import calibration, canonical_inputs, insert_lesion, uncertainty_map

QUANTILES = (75, 90, 95, 99)


@torch.inference_mode()
def voxel_features(model: SynthesisModel, layer: str, normalised: dict, mask: np.ndarray) -> np.ndarray:
    """(C, I, J, K) features: the input of ``layer`` for every slice, framed as synthesis frames it."""
    plan, axis = model.plan, model.plan.axis
    images = {m: np.moveaxis(a, axis, 0) for m, a in normalised.items()}
    slab = np.moveaxis(mask, axis, 0)
    box = bounding_box(slab)
    size = [max(int(w), round_up(b.stop - b.start, 16)) for w, b in zip(plan.window, box[1:], strict=True)]
    centre = [(b.start + b.stop) // 2 for b in box[1:]]
    grid, inside = window_slices(centre, size, slab.shape[1:])
    cropped = {m: crop_plane(np.asarray(a), centre, size, BACKGROUND) for m, a in images.items()}
    neighbours = context_indices(slab.shape[0], plan.layout.context)
    captured: list[torch.Tensor] = []
    hook = dict(model.generator.named_modules())[layer].register_forward_pre_hook(
        lambda _module, inputs: captured.append(inputs[0])
    )
    model.generator.eval()
    features = None
    try:
        for start in range(box[0].start, box[0].stop, 16):
            chunk = np.arange(start, min(start + 16, box[0].stop))
            batch = torch.from_numpy(
                plan.layout.assemble({m: a[neighbours[chunk]] for m, a in cropped.items()})
            )
            captured.clear()
            model.generator(batch)
            found = torch.nn.functional.interpolate(captured[0], size=batch.shape[-2:], mode="nearest")
            found = found[:, :, inside[0], inside[1]].numpy()
            if features is None:
                features = np.zeros((found.shape[1], *slab.shape), np.float32)
            features[:, chunk[0] : chunk[-1] + 1, grid[0], grid[1]] = found.transpose(1, 0, 2, 3)
    finally:
        hook.remove()
    return np.moveaxis(features, 1, axis + 1)


class FeatureBank:
    """Standardised features of random training voxels; a query's distance is its mean k-NN distance."""

    def __init__(self, samples: np.ndarray, k: int = 5) -> None:
        bank = torch.from_numpy(samples)
        self.mean, self.std, self.k = bank.mean(0), bank.std(0) + 1e-6, k
        self.bank = (bank - self.mean) / self.std

    def distance(self, features: np.ndarray, mask: np.ndarray) -> np.ndarray:
        query = (torch.from_numpy(features[:, mask].T) - self.mean) / self.std
        rows = [
            torch.cdist(query[s : s + 4096], self.bank).topk(self.k, largest=False).values.mean(1)
            for s in range(0, len(query), 4096)
        ]
        out = np.zeros(mask.shape, np.float32)
        out[mask] = torch.cat(rows).numpy()
        return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--run", type=Path, required=True, help="a fixed one-input 2D run with a scale head")
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--layer", default="head", help="generator module whose input is the feature")
    parser.add_argument("--per-subject", type=int, default=1500, help="bank voxels per training subject")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = SynthesisModel.from_checkpoint(args.run)
    records = {r.id: r for r in scan_dataset(args.data)}
    source, target = model.sources[0], str(model.target)

    def subject(subject_id: str) -> dict[str, Volume]:
        loaded = load_subject(records[subject_id], [source, target])
        return {m: to_canonical(v)[0] for m, v in loaded.items()}

    def scored(volume: Volume) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(prediction, b, distance, mask) of one source volume."""
        prediction = model.predict({source: volume})
        normalised, mask, _, name = canonical_inputs(model, {source: volume}, None, prediction.mask)
        # The head's b alone: this measures what the distance adds to b, not to the shipped head + TTA map.
        scale = uncertainty_map(model, normalised, mask, name, prediction, estimator="scale").values
        features = voxel_features(model, args.layer, normalised, mask)
        return prediction.normalised, scale, bank.distance(features, mask), mask

    rng = np.random.default_rng(0)
    samples = []
    for subject_id in model.checkpoint_splits["train"]:
        volume = subject(subject_id)[source]
        normalised, mask, _, _ = canonical_inputs(model, {source: volume}, None)
        features = voxel_features(model, args.layer, normalised, mask)
        points = np.argwhere(mask)
        points = points[rng.choice(len(points), min(args.per_subject, len(points)), replace=False)]
        samples.append(features[:, points[:, 0], points[:, 1], points[:, 2]].T)
    bank = FeatureBank(np.concatenate(samples))

    # Validation: the typical distance per b-bin (20 quantile bins), and the quantiles of z.
    distances, scales = [], []
    for subject_id in model.checkpoint_splits["val"]:
        _, scale, distance, mask = scored(subject(subject_id)[source])
        distances.append(distance[mask])
        scales.append(scale[mask])
    distances, scales = np.concatenate(distances), np.concatenate(scales)
    edges = np.percentile(scales, np.linspace(0, 100, 21)[1:-1])
    bins = np.digitize(scales, edges)
    typical = np.array([np.median(distances[bins == i]) for i in range(20)])

    def relative(distance: np.ndarray, scale: np.ndarray) -> np.ndarray:
        return distance / typical[np.digitize(scale, edges)]

    z_q = {q: float(np.percentile(relative(distances, scales), q)) for q in QUANTILES}
    print(f"layer {args.layer}: bank {tuple(bank.bank.shape)}; z quantiles on validation voxels "
          + ", ".join(f"q{q} {v:.2f}" for q, v in z_q.items()))  # fmt: skip

    def combined(scale: np.ndarray, distance: np.ndarray, q: int) -> np.ndarray:
        return scale * np.maximum(1.0, relative(distance, scale) / z_q[q])

    print("| subject | case | distance ratio | b | " + " | ".join(f"b·z, q{q}" for q in QUANTILES) + " |")
    print("|" + "---|" * (4 + len(QUANTILES)))
    for subject_id in model.checkpoint_splits["test"]:
        volumes = subject(subject_id)
        prediction, scale, distance, mask = scored(volumes[source])
        error = prediction - model.normalise({target: volumes[target].array})[target]
        cells = [calibration(scale, error, mask)] + [
            calibration(combined(scale, distance, q), error, mask) for q in QUANTILES
        ]
        print(f"| {subject_id} | whole head: Spearman / top-decile ratio | – | "
              + " | ".join(f"{c['spearman']:.2f} / {c['top_decile_error_ratio']:.2f}" for c in cells) + " |")  # fmt: skip
        for bright in (True, False):
            arrays = {source: volumes[source].array, target: volumes[target].array}
            changed, ball, ring = insert_lesion(arrays, mask, volumes[source].spacing, bright=bright)
            _, scale, distance, lesioned_mask = scored(volumes[source].with_array(changed[source]))
            ball, ring = ball & lesioned_mask, ring & lesioned_mask
            maps = [distance, scale] + [combined(scale, distance, q) for q in QUANTILES]
            ratios = [m[ball].mean() / max(m[ring].mean(), 1e-12) for m in maps]
            kind = "bright" if bright else "dark"
            print(
                f"| {subject_id} | {kind} lesion / ring | " + " | ".join(f"{r:.2f}×" for r in ratios) + " |"
            )


if __name__ == "__main__":
    main()
