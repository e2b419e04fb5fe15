"""Trivial baselines that a synthesis model must beat, scored exactly like the model.

* :class:`IdentityBaseline` predicts the normalised source itself: what you get by doing nothing.
* :class:`IntensityLUTBaseline` learns a voxel-wise lookup table ``target = f(source)`` from training
  subjects: the best any method can do without looking at neighbourhoods. A model that does not beat
  it has learnt a contrast curve, not anatomy-aware synthesis.

Both work on normalised arrays (sources and target in the same space as the network's inputs and
outputs), share the interface ``fit(pairs) -> self``, ``predict(source) -> array``, ``to_dict()``, and
are rebuilt from their dict by :func:`baseline_from_dict` (so evaluation can save and reload them).

For a CT target two radiotherapy baselines predict Hounsfield units directly (``predict_hu(source, mask)``):
:class:`BulkDensityBaseline` (water inside the head, air outside) and :class:`BoneThresholdBaseline` (plus
bone where the MR is dark).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, ClassVar

import numpy as np

from .errors import ConfigError

#: One training pair: normalised source, normalised target, foreground mask (same shape).
Pair = tuple[np.ndarray, np.ndarray, np.ndarray]


class IdentityBaseline:
    """Predict the source unchanged.

    ``fit`` accepts the same pairs as the other baselines and ignores them, so callers need not
    treat this one specially.

    >>> IdentityBaseline().predict(np.array([-1.0, 0.5])).tolist()
    [-1.0, 0.5]
    """

    name: ClassVar[str] = "identity"

    def fit(self, pairs: Iterable[Pair]) -> IdentityBaseline:
        return self

    def predict(self, source: np.ndarray) -> np.ndarray:
        return np.array(source, dtype=np.float32, copy=True)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> IdentityBaseline:
        return cls()


class IntensityLUTBaseline:
    """Map each source intensity to the mean target intensity seen with it in training.

    The source range ``value_range`` is cut into ``n_bins`` equal bins; ``fit`` accumulates, per bin,
    the mean target over foreground voxels of every training pair (a streaming sum, so a cohort never
    has to fit in memory at once). Bins no training voxel fell into take values linearly interpolated
    from their filled neighbours (the nearest filled bin beyond the ends). ``predict`` interpolates the
    table at bin centres with ``np.interp``; sources outside ``value_range`` get the end values.

    The mean (not the median) is used because it is the least-squares optimum per bin and can be
    accumulated without keeping every voxel.

    >>> source = np.linspace(-1, 1, 1000).reshape(10, 10, 10)
    >>> lut = IntensityLUTBaseline(n_bins=64).fit([(source, 0.5 * source, np.ones_like(source, bool))])
    >>> bool(np.abs(lut.predict(source) - 0.5 * source).max() < 0.01)
    True
    """

    name: ClassVar[str] = "intensity_lut"

    def __init__(self, n_bins: int = 256, value_range: tuple[float, float] = (-1.0, 1.0)) -> None:
        low, high = (float(v) for v in value_range)
        if n_bins < 2:
            raise ValueError(f"n_bins must be at least 2, got {n_bins}")
        if not high > low:
            raise ValueError(f"value_range must be (low, high) with high > low, got {value_range}")
        self.n_bins = int(n_bins)
        self.value_range = (low, high)
        self.table: np.ndarray | None = None

    @property
    def centres(self) -> np.ndarray:
        """Source intensity at the centre of each bin."""
        low, high = self.value_range
        width = (high - low) / self.n_bins
        return low + width * (np.arange(self.n_bins) + 0.5)

    def _bin_index(self, values: np.ndarray) -> np.ndarray:
        low, high = self.value_range
        index = np.floor((values - low) * (self.n_bins / (high - low))).astype(np.int64)
        return np.clip(index, 0, self.n_bins - 1)

    def fit(self, pairs: Iterable[Pair]) -> IntensityLUTBaseline:
        """Learn the table from (source, target, mask) arrays of training subjects."""
        sums = np.zeros(self.n_bins, dtype=np.float64)
        counts = np.zeros(self.n_bins, dtype=np.int64)
        for number, (source, target, mask) in enumerate(pairs):
            source, target, mask = np.asarray(source), np.asarray(target), np.asarray(mask, dtype=bool)
            if not source.shape == target.shape == mask.shape:
                raise ValueError(
                    f"pair {number}: source {source.shape}, target {target.shape} and mask {mask.shape} differ"
                )
            index = self._bin_index(source[mask].astype(np.float64))
            sums += np.bincount(index, weights=target[mask].astype(np.float64), minlength=self.n_bins)
            counts += np.bincount(index, minlength=self.n_bins)
        filled = counts > 0
        if not filled.any():
            raise ValueError("no foreground voxels in the training pairs; the lookup table needs some")
        centres = self.centres
        self.table = np.interp(centres, centres[filled], sums[filled] / counts[filled])
        return self

    def predict(self, source: np.ndarray) -> np.ndarray:
        """Apply the table voxel-wise; returns float32 of the source's shape."""
        if self.table is None:
            raise ValueError("IntensityLUTBaseline.predict called before fit")
        source = np.asarray(source, dtype=np.float64)
        return np.interp(source, self.centres, self.table).astype(np.float32)

    def to_dict(self) -> dict[str, Any]:
        if self.table is None:
            raise ValueError("IntensityLUTBaseline.to_dict called before fit")
        return {
            "name": self.name,
            "n_bins": self.n_bins,
            "value_range": list(self.value_range),
            "table": self.table.tolist(),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> IntensityLUTBaseline:
        baseline = cls(n_bins=int(data["n_bins"]), value_range=tuple(data["value_range"]))
        table = np.asarray(data["table"], dtype=np.float64)
        if table.shape != (baseline.n_bins,):
            raise ConfigError(f"lookup table has {table.size} entries, expected n_bins = {baseline.n_bins}")
        baseline.table = table
        return baseline


#: Hounsfield units of air and water: what a bulk-density assignment uses.
AIR_HU, WATER_HU = -1000.0, 0.0


class BulkDensityBaseline:
    """A CT without any learning: water (0 HU) inside the input's head/body mask, air (-1000 HU) outside.

    The bulk-density assignment is the oldest MR-only radiotherapy method and the floor every synthetic
    CT is compared with (its dose error for photons is a few per cent; bone is what it lacks).
    Predicts Hounsfield units directly, from the input mask alone.
    """

    name: ClassVar[str] = "bulk"

    def predict_hu(self, source: np.ndarray, mask: np.ndarray) -> np.ndarray:
        return np.where(np.asarray(mask, dtype=bool), WATER_HU, AIR_HU).astype(np.float32)


class BoneThresholdBaseline:
    """Bulk density plus bone where the MR is dark inside the head: the classic MR-threshold segmentation.

    ``fit`` takes training pairs ``(normalised MR, CT in HU, head mask)``; the assigned values are the mean
    CT value of real bone (> 250 HU) and of the rest of the head, and the normalised MR threshold (on a
    grid of 41 values in [-1, 1]) is the one with the lowest HU MAE over the training heads. Why not the
    threshold whose dark region best matches the bone by Dice, the segmentation habit: CSF and air
    cavities are as dark as bone in T1w images, so that threshold paints the ventricles as bone (on the
    demo cohort: bone Dice 0.40, MAE 715 HU, worse than bulk density); the MAE-optimal one keeps only the
    darkest voxels. Either way it fails where context is needed, which is the point of a baseline.
    """

    name: ClassVar[str] = "bone_threshold"
    THRESHOLDS = np.linspace(-1.0, 1.0, 41)

    def __init__(self, threshold: float | None = None, bone_hu: float = 1000.0, soft_hu: float = 0.0) -> None:
        self.threshold, self.bone_hu, self.soft_hu = threshold, float(bone_hu), float(soft_hu)

    def fit(self, pairs: Iterable[tuple[np.ndarray, np.ndarray, np.ndarray]]) -> BoneThresholdBaseline:
        heads = [
            (np.asarray(source)[np.asarray(mask, bool)], np.asarray(ct, np.float64)[np.asarray(mask, bool)])
            for source, ct, mask in pairs
        ]
        hu = np.concatenate([h for _, h in heads]) if heads else np.empty(0)
        bone = hu > 250.0
        if not bone.any():
            raise ValueError(
                "no bone (> 250 HU) in the training CTs: the threshold baseline cannot be fitted"
            )
        self.bone_hu = float(hu[bone].mean())
        self.soft_hu = float(hu[~bone].mean()) if (~bone).any() else 0.0
        values = np.concatenate([v for v, _ in heads])
        as_bone, as_soft = np.abs(hu - self.bone_hu), np.abs(hu - self.soft_hu)
        order = np.argsort(values, kind="stable")  # voxels below a threshold are a prefix of this order
        gain = np.concatenate([[0.0], np.cumsum((as_bone - as_soft)[order])])
        below = np.searchsorted(values[order], self.THRESHOLDS, side="left")
        errors = as_soft.sum() + gain[below]  # total |error| when the darkest `below` voxels are bone
        self.threshold = float(self.THRESHOLDS[int(np.argmin(errors))])
        return self

    def predict_hu(self, source: np.ndarray, mask: np.ndarray) -> np.ndarray:
        if self.threshold is None:
            raise RuntimeError("BoneThresholdBaseline is not fitted; call fit() first")
        mask = np.asarray(mask, dtype=bool)
        out = np.where(mask, self.soft_hu, AIR_HU).astype(np.float32)
        out[mask & (np.asarray(source) < self.threshold)] = self.bone_hu
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "threshold": self.threshold,
            "bone_hu": self.bone_hu,
            "soft_hu": self.soft_hu,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BoneThresholdBaseline:
        return cls(data["threshold"], data["bone_hu"], data["soft_hu"])


Baseline = IdentityBaseline | IntensityLUTBaseline

#: Baselines by the name stored in their dict.
BASELINES: dict[str, type[IdentityBaseline] | type[IntensityLUTBaseline]] = {
    IdentityBaseline.name: IdentityBaseline,
    IntensityLUTBaseline.name: IntensityLUTBaseline,
}


def baseline_from_dict(data: dict[str, Any]) -> Baseline:
    """Rebuild a baseline saved with ``to_dict``; unknown names list the valid ones."""
    name = data.get("name")
    if name not in BASELINES:
        raise ConfigError(f"unknown baseline {name!r}; valid names: {', '.join(sorted(BASELINES))}")
    return BASELINES[name].from_dict(data)
