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
* ``below_air_hu``: the fraction of voxels below -500 (air in Hounsfield units; MR magnitudes are >= 0).
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


def normalised_histogram(normalised: np.ndarray) -> np.ndarray:
    """Fractions of ``normalised`` values (clipped to [-1, 1]) in ``HIST_BINS`` equal bins."""
    counts, _ = np.histogram(np.clip(normalised, -1.0, 1.0), bins=HIST_BINS, range=(-1.0, 1.0))
    total = counts.sum()
    return counts / total if total else np.full(HIST_BINS, 1.0 / HIST_BINS)


def obliquity_degrees(affine: np.ndarray) -> float:
    """Largest angle (degrees) between a voxel axis and the world axis it is closest to."""
    columns = np.asarray(affine, dtype=np.float64)[:3, :3]
    cosines = np.abs(columns / np.linalg.norm(columns, axis=0)).max(axis=0)
    return float(np.degrees(np.arccos(np.clip(cosines.min(), -1.0, 1.0))))


def appearance_statistics(volume: Volume, normalizer: Normalizer, mask: np.ndarray) -> dict[str, Any]:
    """The statistics of one image (``normalizer`` fitted on it inside ``mask``, its foreground).

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
    histogram = normalised_histogram(normalizer.forward(values))
    return {
        "spacing": [round(float(s), 6) for s in spacing],
        "shape": [int(s) for s in shape],
        "field_of_view_mm": [round(float(f), 3) for f in spacing * shape],
        "orientation": volume.orientation,
        "obliquity_deg": round(obliquity_degrees(volume.affine), 3),
        "histogram": [round(float(h), 6) for h in histogram],
        "below_air_hu": round(float(np.mean(volume.array < AIR_HU)), 6),
    }
