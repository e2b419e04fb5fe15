"""Voxel-wise uncertainty by test-time augmentation (TTA): where does the model disagree with itself?

The demo generators have no dropout, so Monte-Carlo dropout is not available; an ensemble needs
several trainings. TTA needs neither: the same network is run on ``len(MEMBERS)`` perturbed copies of
the normalised inputs (left-right flip, a small gamma change of the intensities), each prediction is
mapped back, and the voxel-wise standard deviation of the members is the uncertainty (normalised target
units, [-1, 1] scale; 0 outside the head). Cost: ``len(MEMBERS)`` syntheses (the plain prediction is
one of them when it is passed in).

Calibration on held-out subjects (:func:`calibration`): Spearman correlation between uncertainty and
absolute error inside the mask, and the mean absolute error of the top-decile-uncertainty voxels over
that of the rest.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from ..data.masks import foreground_mask
from ..io.volume import Volume, to_canonical
from ..io.writers import write_volume
from .synthesis import Prediction, SynthesisModel

#: (left-right flip, gamma) of each member; (False, 1.0) is the plain prediction.
MEMBERS: tuple[tuple[bool, float], ...] = ((False, 1.0), (True, 1.0), (False, 0.8), (True, 1.25))
ESTIMATOR = (
    "test-time augmentation: std of 4 members (identity, left-right flip, gamma 0.8, flip + gamma 1.25)"
)


def _gamma(array: np.ndarray, gamma: float) -> np.ndarray:
    if gamma == 1.0:
        return array
    unit = np.clip((array + 1.0) / 2.0, 0.0, 1.0)
    return (2.0 * unit**gamma - 1.0).astype(np.float32)


def tta_uncertainty(
    model: SynthesisModel,
    normalised: Mapping[str, np.ndarray],
    mask: np.ndarray,
    target: str | None = None,
    *,
    batch_size: int = 16,
    plain: np.ndarray | None = None,
) -> np.ndarray:
    """Canonical normalised inputs -> voxel-wise std of the TTA members (0 outside ``mask``)."""
    members = []
    for flip, gamma in MEMBERS:
        if not flip and gamma == 1.0 and plain is not None:
            members.append(plain)
            continue
        images = {m: _gamma(np.flip(a, 0) if flip else a, gamma) for m, a in normalised.items()}
        images = {m: np.ascontiguousarray(a) for m, a in images.items()}
        region = np.ascontiguousarray(np.flip(mask, 0)) if flip else mask
        output = model.synthesize_normalised(images, region, target, batch_size=batch_size)
        members.append(np.flip(output, 0) if flip else output)
    spread = np.std(np.stack(members), axis=0).astype(np.float32)
    spread[~mask] = 0.0
    return spread


def canonical_inputs(model: SynthesisModel, inputs: Mapping[str, Volume], target: str | None):
    """The canonical normalised inputs, mask and reorientation ``predict`` uses."""
    target, order = model.plan.resolve_target(inputs, target)
    canonical, reorientation = {}, None
    for modality in order:
        volume, reorientation = to_canonical(inputs[modality])
        canonical[modality] = volume.array
    mask = foreground_mask([canonical[m] for m in order])
    return model.normalise(canonical), mask, reorientation, target


def write_uncertainty(
    model: SynthesisModel,
    inputs: Mapping[str, Volume],
    prediction: Prediction,
    out: Path,
    *,
    batch_size: int = 16,
) -> dict[str, Any]:
    """Write ``<out stem>_uncertainty.nii.gz`` on the output's grid; return the sidecar summary."""
    started = time.perf_counter()
    normalised, mask, reorientation, target = canonical_inputs(model, inputs, prediction.target)
    spread = tta_uncertainty(
        model, normalised, mask, target, batch_size=batch_size, plain=prediction.normalised
    )
    stem = out.name[: -len(".nii.gz")] if out.name.endswith(".nii.gz") else out.stem
    path = out.with_name(f"{stem}_uncertainty.nii.gz")
    reference = prediction.volume
    write_volume(reorientation.undo(spread), reference, path)
    inside = spread[mask]
    return {
        "path": str(path),
        "estimator": ESTIMATOR,
        "units": "standard deviation in normalised target units ([-1, 1] scale); 0 outside the head",
        "mean_in_mask": round(float(inside.mean()), 5) if inside.size else 0.0,
        "p95_in_mask": round(float(np.percentile(inside, 95)), 5) if inside.size else 0.0,
        "max": round(float(spread.max()), 5),
        "seconds": round(time.perf_counter() - started, 3),
    }


def calibration(uncertainty: np.ndarray, error: np.ndarray, mask: np.ndarray) -> dict[str, float]:
    """Does uncertainty track |error| inside ``mask``? Spearman rho and the top-decile error ratio."""
    from scipy.stats import spearmanr

    u, e = uncertainty[mask].astype(np.float64), np.abs(error[mask]).astype(np.float64)
    rho = float(spearmanr(u, e).statistic)
    cut = np.percentile(u, 90)
    top, rest = e[u >= cut], e[u < cut]
    ratio = float(top.mean() / rest.mean()) if rest.size and rest.mean() > 0 else float("nan")
    return {"spearman": rho, "top_decile_error_ratio": ratio}
