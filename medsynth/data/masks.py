"""Foreground (head/body) masks and their bounding boxes.

The mask decides where normalisation statistics are taken, which slices are worth training on, where
the crop is centred and where metrics are computed, so it must be robust across contrasts: each image
is first scaled by its own robust range, the images are averaged (a voxel dark in one contrast is
usually bright in another), and Otsu on log intensities separates tissue from air. Hole filling, slice
by slice along every axis and then in 3D, keeps dark tissue (CSF, bone in MR) inside even where the
head is open at the neck; the largest connected component drops noise and neck/table fragments, and a
small closing smooths the boundary. Any one contrast then gives nearly the same head mask as all of
them together, which keeps normalisation consistent between training (all contrasts present) and
inference (only the sources).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage
from skimage.filters import threshold_otsu


def _robust_unit(array: np.ndarray) -> np.ndarray:
    """Scale to [0, 1] between the 1st and 99th percentiles so no single contrast dominates the mean."""
    lower, upper = np.percentile(array, [1.0, 99.0])
    if upper <= lower:
        return np.zeros(array.shape, dtype=np.float32)
    return np.clip((array - lower) / (upper - lower), 0.0, 1.0).astype(np.float32)


def foreground_mask(arrays: Sequence[np.ndarray]) -> np.ndarray:
    """Boolean foreground of co-registered images of one subject (same shape, any number of dims).

    A constant image has no foreground and gives an all-False mask.

    >>> image = np.zeros((20, 20, 20), np.float32); image[5:15, 5:15, 5:15] = 100.0
    >>> int(foreground_mask([image]).sum())
    1000
    """
    if not arrays:
        raise ValueError("foreground_mask needs at least one image")
    shape = np.shape(arrays[0])
    if any(np.shape(a) != shape for a in arrays):
        raise ValueError(f"images must share a grid, got shapes {[np.shape(a) for a in arrays]}")
    combined = np.mean([_robust_unit(np.asarray(a, dtype=np.float32)) for a in arrays], axis=0)
    if combined.max() <= combined.min():
        return np.zeros(shape, dtype=bool)
    # Tissue spans decades (dark bone and CSF to bright fat) while air is noise near zero: in log space
    # the air/tissue split dominates, so the threshold is not pulled up between two tissue classes.
    # On the demo cohort, single-contrast masks then differ from the all-contrast one by <= 2 % of
    # voxels (plain Otsu: up to 45 %, when it cut between brain and scalp).
    log_intensity = np.log1p(100.0 * combined)
    mask = largest_component(fill_holes_in_slices(log_intensity > threshold_otsu(log_intensity)))
    # Pad before closing: scipy erodes against a zero border, which would strip voxels on the grid edge.
    structure = ndimage.generate_binary_structure(mask.ndim, 1)
    closed = ndimage.binary_closing(np.pad(mask, 1), structure=structure)
    mask = closed[tuple(slice(1, -1) for _ in range(mask.ndim))]
    return ndimage.binary_fill_holes(mask)


def fill_holes_in_slices(mask: np.ndarray, axes: Sequence[int] | None = None) -> np.ndarray:
    """Fill holes in every 2D slice along ``axes`` (default: every axis): closes dark shells a 3D fill
    cannot (open necks); ``axes=(2,)`` fills axial slices only (a skull ring around the brain)."""
    mask = np.asarray(mask, dtype=bool)
    filled = mask.copy()
    for axis in range(mask.ndim) if axes is None else axes:
        planes = np.moveaxis(mask, axis, 0)
        filled |= np.moveaxis(np.stack([ndimage.binary_fill_holes(plane) for plane in planes]), 0, axis)
    return filled


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest face-connected component of ``mask`` (all False when the mask is empty)."""
    labels, count = ndimage.label(mask)
    if count <= 1:
        return labels > 0
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    return labels == int(sizes.argmax())


def bounding_box(mask: np.ndarray, margin: int = 0) -> tuple[slice, ...]:
    """Smallest box holding every True voxel, grown by ``margin`` voxels and clipped to the grid.

    An empty mask gives the whole grid, so callers never have to special-case "no foreground".
    """
    mask = np.asarray(mask, dtype=bool)
    if margin < 0:
        raise ValueError(f"margin must be >= 0, got {margin}")
    if not mask.any():
        return tuple(slice(0, n) for n in mask.shape)
    box = []
    for axis, size in enumerate(mask.shape):
        others = tuple(a for a in range(mask.ndim) if a != axis)
        present = np.flatnonzero(mask.any(axis=others))
        box.append(slice(max(int(present[0]) - margin, 0), min(int(present[-1]) + 1 + margin, size)))
    return tuple(box)
