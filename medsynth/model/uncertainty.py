"""Voxel-wise uncertainty: the model's own predicted error scale, test-time augmentation (TTA), or both.

The estimator is chosen per model by :func:`uncertainty_map` (measurements: docs/trust.md):

* **Scale head + TTA** (default where the plan has ``scale_channel``, trained with
  ``model.predict_scale``): the generator's second channel is the Laplace scale ``b`` of its own
  prediction (fitted with the Laplace likelihood, whose optimum is ``b = E|error|``). It knows the
  error of inputs like the training ones (aleatoric) but not how much the network itself would change
  with a slightly different input (epistemic), which the spread of the TTA members shows. Both are
  put together as one Laplace of the members' mixture: ``sqrt(mean(b^2) + var(mean) / 2)`` (the
  Laplace whose variance ``2 b^2`` is the mixture's), still an expected absolute error. On the demo
  cohort this ranks the error better than ``b`` alone (Spearman 0.30-0.34 instead of 0.20-0.30 on the
  subject whose tissues are least like the cohort's). Cost: ``len(MEMBERS) - 1`` extra syntheses.
* **Scale head alone** (``estimator="scale"``): ``b`` of the plain prediction; no extra cost.
* **TTA** (any other checkpoint): the same network is run on ``len(MEMBERS)`` perturbed copies of the
  normalised inputs (left-right flip, a small gamma change of the intensities), each prediction is
  mapped back, and the voxel-wise standard deviation of the members is the uncertainty. Cost: the
  same ``len(MEMBERS) - 1`` extra syntheses (the plain prediction is the first member).

All are in normalised target units ([-1, 1] scale) and 0 outside the head. Where an input voxel is one
the training subjects never had (:mod:`medsynth.model.support`: its intensity at its depth in the head),
none has learnt anything, so the map there is raised to at least the error of a guess made without the
input.

Calibration on held-out subjects (:func:`calibration`): Spearman correlation between uncertainty and
absolute error inside the mask, and the mean absolute error of the top-decile-uncertainty voxels over
that of the rest.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..data.masks import foreground_mask
from ..io.volume import Volume, to_canonical
from ..io.writers import write_volume
from .support import TrainingSupport
from .synthesis import Prediction, SynthesisModel

#: (left-right flip, gamma) of each member; (False, 1.0) is the plain prediction.
MEMBERS: tuple[tuple[bool, float], ...] = ((False, 1.0), (True, 1.0), (False, 0.8), (True, 1.25))
ESTIMATOR = (
    "test-time augmentation: std of 4 members (identity, left-right flip, gamma 0.8, flip + gamma 1.25)"
)
SCALE_ESTIMATOR = (
    "scale head: the generator's predicted Laplace scale b (expected |error|), trained with the "
    "Laplace likelihood"
)
TOTAL_ESTIMATOR = (
    "scale head + test-time augmentation: Laplace scale of the 4 members' mixture, "
    "sqrt(mean(b^2) + var(mean) / 2) (expected |error|)"
)
ESTIMATORS = ("auto", "scale", "tta")
_EXPECTED_ERROR = "(expected absolute error) in normalised target units ([-1, 1] scale); 0 outside the head"
UNITS = {
    ESTIMATOR: "standard deviation in normalised target units ([-1, 1] scale); 0 outside the head",
    SCALE_ESTIMATOR: f"Laplace scale b {_EXPECTED_ERROR}",
    TOTAL_ESTIMATOR: f"Laplace scale {_EXPECTED_ERROR}",
}


def _gamma(array: np.ndarray, gamma: float) -> np.ndarray:
    if gamma == 1.0:
        return array
    unit = np.clip((array + 1.0) / 2.0, 0.0, 1.0)
    return (2.0 * unit**gamma - 1.0).astype(np.float32)


def tta_members(
    model: SynthesisModel,
    normalised: Mapping[str, np.ndarray],
    mask: np.ndarray,
    target: str | None = None,
    *,
    batch_size: int = 16,
    plain: Prediction | None = None,
) -> tuple[np.ndarray, np.ndarray | None]:
    """The :data:`MEMBERS`' predictions, mapped back to canonical, stacked ``(members, I, J, K)``, and
    their scale maps when the model has a head (else None). ``plain`` is reused as the first member."""
    means, scales = [], []
    for flip, gamma in MEMBERS:
        if not flip and gamma == 1.0 and plain is not None:
            mean, scale = plain.normalised, plain.scale
        else:
            images = {m: _gamma(np.flip(a, 0) if flip else a, gamma) for m, a in normalised.items()}
            images = {m: np.ascontiguousarray(a) for m, a in images.items()}
            region = np.ascontiguousarray(np.flip(mask, 0)) if flip else mask
            mean, scale = model.synthesize_with_scale(images, region, target, batch_size=batch_size)
            if flip:
                mean, scale = np.flip(mean, 0), None if scale is None else np.flip(scale, 0)
        means.append(mean)
        scales.append(scale)
    stacked = np.stack(scales) if all(s is not None for s in scales) else None
    return np.stack(means), stacked


def mixture_scale(means: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """The Laplace scale whose variance (``2 b^2``) is that of the equal mixture of Laplace members
    ``(means[i], scales[i])``: ``sqrt(mean(b^2) + var(means) / 2)``."""
    return np.sqrt(np.mean(np.square(scales), axis=0) + np.var(means, axis=0) / 2.0)


@dataclass(frozen=True)
class UncertaintyMap:
    """A voxel-wise uncertainty map (canonical, normalised target units, 0 outside the head)."""

    values: np.ndarray
    estimator: str
    #: Voxels whose input the training subjects never had (raised to ``floor``); None when the
    #: checkpoint's fingerprint predates the counts this needs.
    unseen: np.ndarray | None
    floor: float | None

    def summary(self) -> dict[str, Any]:
        """The sidecar's ``unseen_input`` block."""
        if self.unseen is None:
            return {"status": "skipped", "note": "the checkpoint predates the (intensity, depth) counts"}
        return {
            "status": "ok",
            "voxels": int(self.unseen.sum()),
            "floor": round(float(self.floor or 0.0), 5),
        }


def uncertainty_map(
    model: SynthesisModel,
    normalised: Mapping[str, np.ndarray],
    mask: np.ndarray,
    target: str | None,
    prediction: Prediction,
    *,
    batch_size: int = 16,
    estimator: str = "auto",
) -> UncertaintyMap:
    """The uncertainty of ``prediction``, raised to the uninformed error wherever the input is unlike
    every training voxel (:mod:`medsynth.model.support`).

    ``estimator``: ``auto`` (scale head + TTA where the model has a head, else TTA), ``scale`` (the
    head's ``b`` alone: no extra synthesis) or ``tta`` (the members' spread, to compare on one model).
    ``prediction`` is the model's plain prediction of these inputs (``predict``): the first TTA
    member, its scale map and the voxel size. Canonical arrays; 0 outside ``mask``.
    """
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator must be one of {', '.join(ESTIMATORS)}, got {estimator!r}")
    has_head = prediction.scale is not None
    if estimator == "scale" and not has_head:
        raise ValueError("estimator 'scale' needs a model with a scale head (model.predict_scale)")
    if estimator == "scale":
        values, name = prediction.scale, SCALE_ESTIMATOR
    else:
        means, scales = tta_members(model, normalised, mask, target, batch_size=batch_size, plain=prediction)
        if estimator == "auto" and scales is not None:
            values, name = mixture_scale(means, scales), TOTAL_ESTIMATOR
        else:
            values, name = np.std(means, axis=0), ESTIMATOR
    values = np.where(mask, values, 0.0).astype(np.float32)
    support = TrainingSupport.from_fingerprint(model.fingerprint, normalised, prediction.target)
    if support is None:
        return UncertaintyMap(values, name, None, None)
    unseen = support.unseen(normalised, mask, prediction.spacing)
    floor = np.float32(support.uninformed_error)
    values = np.where(unseen, np.maximum(values, floor), values).astype(np.float32)
    return UncertaintyMap(values, name, unseen, support.uninformed_error)


def canonical_inputs(
    model: SynthesisModel,
    inputs: Mapping[str, Volume],
    target: str | None,
    mask: np.ndarray | None = None,
):
    """The canonical normalised inputs, mask and reorientation ``predict`` uses.

    ``mask``: the prediction's (``Prediction.mask``) when there is one, so that the foreground, which
    takes seconds at 1 mm, is not found again (with one input it is also that input's own mask, which
    its normalisation needs, as in ``predict``).
    """
    target, order = model.plan.resolve_target(inputs, target)
    canonical, reorientation = {}, None
    for modality in order:
        volume, reorientation = to_canonical(inputs[modality])
        canonical[modality] = volume.array
    if mask is None:
        mask = foreground_mask([canonical[m] for m in order])
    own = {order[0]: mask} if len(order) == 1 else None
    return model.normalise(canonical, own), mask, reorientation, target


#: Stem suffix of the uncertainty map written beside a synthetic volume.
UNCERTAINTY_SUFFIX = "_uncertainty"


def uncertainty_path(out: Path) -> Path:
    """``<out stem>_uncertainty<out ending>`` beside the synthetic volume ``out``, in its format.

    ``t2.nii.gz`` gets ``t2_uncertainty.nii.gz`` and ``t2.mha`` gets ``t2_uncertainty.mha``, so outputs
    of one name in two formats never share (and overwrite) one map.

    >>> uncertainty_path(Path("t2.mha")).name
    't2_uncertainty.mha'
    """
    from ..io import formats

    endings = sorted({e for f in formats.registered() for e in f.write_suffixes}, key=len, reverse=True)
    ending = next((e for e in endings if out.name.lower().endswith(e)), None)
    if ending is None:
        return out.with_name(f"{out.stem}{UNCERTAINTY_SUFFIX}.nii.gz")
    return out.with_name(f"{out.name[: -len(ending)]}{UNCERTAINTY_SUFFIX}{out.name[-len(ending) :]}")


def write_uncertainty(
    model: SynthesisModel,
    inputs: Mapping[str, Volume],
    prediction: Prediction,
    out: Path,
    *,
    batch_size: int = 16,
) -> dict[str, Any]:
    """Write ``<out stem>_uncertainty<out ending>`` on the output's grid; return the sidecar summary."""
    started = time.perf_counter()
    normalised, mask, reorientation, target = canonical_inputs(
        model, inputs, prediction.target, prediction.mask
    )
    result = uncertainty_map(model, normalised, mask, target, prediction, batch_size=batch_size)
    spread = result.values
    path = uncertainty_path(out)
    reference = prediction.volume
    write_volume(reorientation.undo(spread), reference, path)
    inside = spread[mask]
    return {
        "path": str(path),
        "estimator": result.estimator,
        "units": UNITS[result.estimator]
        + (
            "; at least unseen_input.floor where the input is unlike every training voxel"
            if result.unseen is not None
            else ""
        ),
        "unseen_input": result.summary(),
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


def insert_lesion(
    arrays: Mapping[str, np.ndarray],
    mask: np.ndarray,
    spacing: tuple[float, ...],
    *,
    bright: bool = True,
    radius_mm: float = 6.0,
    centre: tuple[int, int, int] | None = None,
) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
    """A lesion no training subject had: a ball set to each modality's 99.5th (``bright``) or 0.5th
    percentile inside ``mask``, in every array at once (source and target alike).

    Returns the changed arrays, the ball and its surrounding ring (``radius + 1`` to ``2 radius + 1``
    voxels, inside ``mask``): the tissue the lesion's uncertainty is compared with. ``centre`` defaults
    to the mask's centroid moved a fifth of the head's width to the left (into a hemisphere, off the
    midline). Canonical arrays of one shape; ``spacing`` in mm.
    """
    if centre is None:
        points = np.nonzero(mask)
        width = points[0].max() - points[0].min()
        centre = (
            int(round(points[0].mean() + width / 5)),
            int(round(points[1].mean())),
            int(round(points[2].mean())),
        )
    radius = max(radius_mm / float(min(spacing)), 1.5)
    grid = np.indices(mask.shape, dtype=np.float32)
    distance = np.sqrt(sum((g - c) ** 2 for g, c in zip(grid, centre, strict=True)))
    ball = (distance <= radius) & mask
    ring = (distance > radius + 1) & (distance <= 2 * radius + 1) & mask
    level = 99.5 if bright else 0.5
    changed = {}
    for name, array in arrays.items():
        array = np.array(array, dtype=np.float32)
        array[ball] = np.percentile(array[mask], level)
        changed[name] = array
    return changed, ball, ring


def lesion_contrast(
    model: SynthesisModel,
    sources: Mapping[str, Volume],
    target: Volume,
    *,
    bright: bool = True,
    radius_mm: float = 6.0,
    estimator: str = "auto",
) -> dict[str, float]:
    """Insert a lesion (:func:`insert_lesion`) into ``sources`` and ``target`` of a fixed-task model's
    subject; return the mean uncertainty and mean |error| in the lesion over those of its ring, and the
    whole-head calibration of the lesioned case (normalised space)."""
    canonical = {m: to_canonical(v)[0] for m, v in sources.items()}
    first = next(iter(canonical.values()))
    truth_name = str(model.target)
    mask = foreground_mask([c.array for c in canonical.values()])
    arrays = {**{m: c.array for m, c in canonical.items()}, truth_name: to_canonical(target)[0].array}
    changed, ball, ring = insert_lesion(arrays, mask, first.spacing, bright=bright, radius_mm=radius_mm)
    inputs = {m: canonical[m].with_array(changed[m]) for m in canonical}
    prediction = model.predict(inputs)
    normalised, mask, _, name = canonical_inputs(model, inputs, None, prediction.mask)
    unc = uncertainty_map(model, normalised, mask, name, prediction, estimator=estimator).values
    truth = model.normalise({truth_name: changed[truth_name]})[truth_name]
    error = np.abs(prediction.normalised - truth)
    ball, ring = ball & mask, ring & mask
    return {
        "uncertainty_ratio": float(unc[ball].mean() / max(unc[ring].mean(), 1e-12)),
        "error_ratio": float(error[ball].mean() / max(error[ring].mean(), 1e-12)),
        "lesion_voxels": int(ball.sum()),
        **calibration(unc, prediction.normalised - truth, mask),
    }
