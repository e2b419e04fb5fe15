"""What a training image looked like: the statistics out-of-distribution checks compare inputs with.

Computed once per training subject and modality when the fingerprint is fitted (it is stored under
``fingerprint.subjects[id][modality]["appearance"]``) and, by the same function, for every input at
inference (:mod:`medsynth.model.ood`), so the two sides cannot be measured differently:

* geometry in **canonical RAS** axis order (spacing, shape, field of view), because synthesis slices the
  canonical volume whatever the file's voxel order;
* ``orientation`` (axis codes) and ``obliquity_deg`` (largest angle between a voxel axis and its nearest
  world axis);
* ``histogram``: the normalised intensities inside the volume's own foreground mask, ``HIST_BINS`` bins
  on ``[-1, 1]``, as fractions. Percentile normalisation removes scanner gain, so what is left is the
  *shape* of the intensity distribution, which differs between contrasts (CSF dark on T1w, bright on T2w);
* ``below_air_hu``: the fraction of voxels below -500 (air in Hounsfield units; MR magnitudes are >= 0);
* ``depth_histogram``: voxel counts of (normalised intensity, depth below the head's surface) pairs,
  ``HIST_BINS`` x ``DEPTH_BINS``: where in the head each intensity occurred. Fat and skull are bright or
  dark near the surface, never 5 cm inside; the uncertainty map (:mod:`medsynth.model.support`) flags
  input voxels whose pair no training subject had.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..io.volume import Volume, to_canonical
from .normalize import Normalizer

#: Histogram bins on [-1, 1] (normalised space).
HIST_BINS = 32
#: Intensities below this are air in Hounsfield units and never occur in MR magnitude images.
AIR_HU = -500.0
#: Depth bins (mm below the foreground surface) of ``depth_histogram``; the last is open-ended.
DEPTH_STEP_MM = 5.0
DEPTH_BINS = 16


#: The depth map is computed on a grid of at least this voxel size (mm): the depth bins are 5 mm wide, and
#: an exact transform at 1 mm costs 2.3 s per head (0.3 s on the 2 mm grid), at training and inference alike.
DEPTH_GRID_MM = 2.0


def depth_below_surface(mask: np.ndarray, spacing: tuple[float, ...]) -> np.ndarray:
    """Distance (mm) from each foreground voxel to the nearest background voxel; 0 outside ``mask``.

    A coordinate that needs no registration: the same anatomy lies at a similar depth in every head.
    Voxels finer than :data:`DEPTH_GRID_MM` are measured on every k-th voxel and the distances repeated
    (within a coarse voxel of the exact ones; the 2 mm demo grid is measured exactly).
    """
    from scipy import ndimage

    step = tuple(max(1, int(DEPTH_GRID_MM // s)) for s in spacing)
    coarse = mask[tuple(slice(None, None, k) for k in step)]
    depth = ndimage.distance_transform_edt(
        coarse, sampling=[s * k for s, k in zip(spacing, step, strict=True)]
    )
    for axis, k in enumerate(step):
        depth = np.repeat(depth, k, axis=axis) if k > 1 else depth
    depth = depth[tuple(slice(0, n) for n in mask.shape)]
    return np.where(mask, depth, 0.0).astype(np.float32)


def intensity_bins(normalised: np.ndarray) -> np.ndarray:
    """The ``HIST_BINS`` bin of each normalised value on [-1, 1] (clipped): the one rule of both
    histograms."""
    return np.clip(
        ((np.clip(normalised, -1.0, 1.0) + 1.0) / 2.0 * HIST_BINS).astype(np.int64), 0, HIST_BINS - 1
    )


def intensity_depth_bins(normalised: np.ndarray, depth: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The (intensity, depth) bin of each value: the index pair ``depth_histogram`` counts."""
    layer = np.clip((depth / DEPTH_STEP_MM).astype(np.int64), 0, DEPTH_BINS - 1)
    return intensity_bins(normalised), layer


def intensity_depth_counts(normalised: np.ndarray, depth: np.ndarray) -> np.ndarray:
    """``(HIST_BINS, DEPTH_BINS)`` voxel counts of the (intensity, depth) pairs of equal-shaped arrays."""
    intensity, layer = intensity_depth_bins(normalised, depth)
    counts = np.bincount(intensity * DEPTH_BINS + layer, minlength=HIST_BINS * DEPTH_BINS)
    return counts.reshape(HIST_BINS, DEPTH_BINS)


def normalised_histogram(normalised: np.ndarray) -> np.ndarray:
    """Fractions of ``normalised`` values (clipped to [-1, 1]) in ``HIST_BINS`` equal bins."""
    counts = np.bincount(intensity_bins(np.ravel(normalised)), minlength=HIST_BINS)
    total = counts.sum()
    return counts / total if total else np.full(HIST_BINS, 1.0 / HIST_BINS)


def obliquity_degrees(affine: np.ndarray) -> float:
    """Largest angle (degrees) between a voxel axis and the world axis it is closest to."""
    columns = np.asarray(affine, dtype=np.float64)[:3, :3]
    cosines = np.abs(columns / np.linalg.norm(columns, axis=0)).max(axis=0)
    return float(np.degrees(np.arccos(np.clip(cosines.min(), -1.0, 1.0))))


def appearance_statistics(
    volume: Volume,
    normalizer: Normalizer,
    mask: np.ndarray,
    *,
    with_depth: bool = True,
    depth_normalizer: Normalizer | None = None,
) -> dict[str, Any]:
    """The statistics of one image (``normalizer`` fitted on it inside ``mask``, its foreground).

    ``with_depth=False`` leaves out ``depth_histogram`` (a distance transform: seconds at 1 mm), which
    the whole-volume checks of an input do not use. ``depth_normalizer``: the network's normaliser, when
    it is not ``normalizer``: the depth histogram says which intensities the *network* saw where
    (:mod:`medsynth.model.support`), while a histogram-standardised source's screen compares the
    percentile view (:meth:`~medsynth.data.fingerprint.NormalizationSpec.for_screen`).

    >>> import numpy as np
    >>> from medsynth.data.normalize import PercentileNormalizer
    >>> array = np.random.default_rng(0).random((8, 8, 8)).astype(np.float32)
    >>> volume = Volume(array, np.diag([2.0, 2.0, 3.0, 1.0]), {"path": "x.nii.gz"})
    >>> mask = np.ones(array.shape, bool)
    >>> stats = appearance_statistics(volume, PercentileNormalizer().fit(array, mask), mask)
    >>> stats["spacing"], stats["field_of_view_mm"], len(stats["histogram"])
    ([2.0, 2.0, 3.0], [16.0, 16.0, 24.0], 32)
    """
    canonical, _ = to_canonical(volume)
    spacing = np.asarray(canonical.spacing)
    shape = np.asarray(canonical.shape)
    values = volume.array[mask] if mask.any() else volume.array.ravel()
    normalised = normalizer.forward(values)
    histogram = normalised_histogram(normalised)
    statistics = {
        "spacing": [round(float(s), 6) for s in spacing],
        "shape": [int(s) for s in shape],
        "field_of_view_mm": [round(float(f), 3) for f in spacing * shape],
        "orientation": volume.orientation,
        "obliquity_deg": round(obliquity_degrees(volume.affine), 3),
        "histogram": [round(float(h), 6) for h in histogram],
        "below_air_hu": round(float(np.mean(volume.array < AIR_HU)), 6),
    }
    if with_depth:
        depth = depth_below_surface(mask, volume.spacing)[mask] if mask.any() else np.zeros(values.shape)
        seen = normalised if depth_normalizer is None else depth_normalizer.forward(values)
        statistics["depth_histogram"] = intensity_depth_counts(seen, depth).tolist()
    return statistics
