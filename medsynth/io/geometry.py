"""Grids in world space: compare them, convert to and from SimpleITK, resample, align a subject.

Every image of a subject must sit on one voxel grid before it is stacked into a training sample, and a
synthetic image must come back on its input's grid. This module decides when two grids are "the same"
(in millimetres, not by comparing floats), moves images between grids with SimpleITK, and refuses pairs
that do not even cover the same anatomy.

SimpleITK speaks LPS with arrays indexed ``[k, j, i]``; a :class:`~medsynth.io.volume.Volume` speaks RAS
with ``[i, j, k]``. :func:`affine_from_itk` and :func:`volume_to_sitk` are the only places that convert.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from ..errors import GeometryError
from .volume import LPS_TO_RAS, Subject, Volume

if TYPE_CHECKING:
    import SimpleITK as sitk

log = logging.getLogger("medsynth")

#: Below this fraction of the reference's field of view, two images are not the same anatomy.
MIN_OVERLAP = 0.5

#: Resampling warnings already given: training loads a subject twice (fingerprint, then cache), and the
#: user should read about each resampled file once.
_WARNED: set[tuple[object, ...]] = set()


def _warn_once(message: str, *args: object) -> None:
    if args not in _WARNED:
        _WARNED.add(args)
        log.warning(message, *args)


#: Interpolation names and SimpleITK's constants for them (SimpleITK is imported only to resample).
_INTERPOLATORS = {"linear": "sitkLinear", "nearest": "sitkNearestNeighbor", "bspline": "sitkBSpline"}


def affine_from_itk(
    spacing: Sequence[float], origin: Sequence[float], direction: Sequence[float]
) -> np.ndarray:
    """RAS voxel-to-world affine from ITK's LPS ``spacing``/``origin``/``direction`` (row-major).

    Works for 3D and higher-dimensional ITK images: only the first three axes are spatial.
    """
    dims = len(spacing)
    matrix = np.asarray(direction, dtype=np.float64).reshape(dims, dims)[:3, :3]
    lps = np.eye(4)
    lps[:3, :3] = matrix * np.asarray(spacing[:3], dtype=np.float64)
    lps[:3, 3] = np.asarray(origin[:3], dtype=np.float64)
    return LPS_TO_RAS @ lps


def volume_to_sitk(volume: Volume, array: np.ndarray | None = None) -> sitk.Image:
    """A SimpleITK image with the volume's exact LPS geometry and its float32 voxels, or ``array``'s.

    ``array`` (the volume's shape) keeps its own type: a Volume always holds float32, so a writer asked
    for int16 passes the rounded voxels here, or the file would store float32 under an int16 sidecar.
    """
    import SimpleITK as sitk

    voxels = volume.array if array is None else array
    if voxels.shape != volume.shape:
        raise ValueError(f"array shape {voxels.shape} does not match the grid {volume.shape}")
    image = sitk.GetImageFromArray(np.ascontiguousarray(voxels.transpose(2, 1, 0)))
    spacing, origin, direction = volume.itk_geometry()
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    image.SetDirection(direction)
    return image


def _corners(shape: Sequence[int]) -> np.ndarray:
    """Homogeneous voxel coordinates (4 x 8) of the outer corners of a grid's voxels."""
    lo, hi = -0.5, np.asarray(shape, dtype=np.float64) - 0.5
    grid = np.array(np.meshgrid(*[(lo, h) for h in hi], indexing="ij")).reshape(3, -1)
    return np.vstack([grid, np.ones(grid.shape[1])])


def grid_mismatch(a: Volume, b: Volume, atol_mm: float = 1e-3) -> str | None:
    """Describe how the grids of ``a`` and ``b`` differ, or ``None`` when they are the same.

    Affines are compared by how far apart the grid's corners land in world space, so the tolerance is a
    distance in millimetres whatever the voxel size or obliquity (rounding in DICOM or NIfTI headers moves
    a corner by far less than 1 micrometre).
    """
    if a.shape != b.shape:
        return f"shape {'x'.join(map(str, a.shape))} vs {'x'.join(map(str, b.shape))}"
    corners = _corners(a.shape)
    distance = float(np.max(np.linalg.norm(((a.affine - b.affine) @ corners)[:3], axis=0)))
    if distance <= atol_mm:
        return None
    spacing_a = ", ".join(f"{s:.3g}" for s in a.spacing)
    spacing_b = ", ".join(f"{s:.3g}" for s in b.spacing)
    return (
        f"grids differ by up to {distance:.3g} mm (spacing {spacing_a} vs {spacing_b} mm, "
        f"orientation {a.orientation} vs {b.orientation})"
    )


def overlap_fraction(a: Volume, b: Volume, samples: int = 16) -> float:
    """Fraction of ``b``'s field of view that lies inside ``a``'s field of view (0 to 1).

    The field of view is the box of voxel extents (oblique boxes included). ``b``'s box is sampled on a
    ``samples``-cubed lattice of points, each mapped into ``a``'s voxel space; the answer is the share that
    falls inside ``a``. Exact up to the lattice resolution (1/16 of each side by default), which is plenty to
    tell "same anatomy, different grid" from "wrong file".
    """
    steps = [(np.arange(samples) + 0.5) / samples * n - 0.5 for n in b.shape]
    points = np.array(np.meshgrid(*steps, indexing="ij")).reshape(3, -1)
    world = b.affine @ np.vstack([points, np.ones(points.shape[1])])
    in_a = (np.linalg.inv(a.affine) @ world)[:3]
    upper = np.asarray(a.shape, dtype=np.float64)[:, None] - 0.5
    inside = np.all((in_a >= -0.5) & (in_a <= upper), axis=0)
    return float(inside.mean())


def resample_to(volume: Volume, reference: Volume, interpolation: str = "linear") -> Volume:
    """Resample ``volume`` onto ``reference``'s grid (shape and affine), in world space.

    Voxels of the reference grid that fall outside ``volume`` get ``volume``'s minimum (its background),
    not 0, so intensity-normalised or CT images do not gain a false "tissue" border. The result keeps
    ``volume``'s provenance but not its NIfTI header, which described the old grid.
    """
    if interpolation not in _INTERPOLATORS:
        raise ValueError(
            f"unknown interpolation {interpolation!r}; choose one of {', '.join(_INTERPOLATORS)}"
        )
    import SimpleITK as sitk

    resampled = sitk.Resample(
        volume_to_sitk(volume),
        volume_to_sitk(reference),
        sitk.Transform(),
        getattr(sitk, _INTERPOLATORS[interpolation]),
        float(volume.array.min()),
        sitk.sitkFloat32,
    )
    array = sitk.GetArrayFromImage(resampled).transpose(2, 1, 0)
    meta = {key: value for key, value in volume.meta.items() if key != "header"}
    meta["resampled_to"] = reference.source
    return Volume(array, reference.affine.copy(), meta)


def align_subject(subject: Subject, reference: str, atol_mm: float = 1e-3) -> Subject:
    """Bring every image of a subject onto the grid of the ``reference`` modality.

    Images already on that grid are returned untouched (no interpolation). Images on another grid that
    cover at least half of the reference's field of view are resampled linearly, with a warning naming the
    file, because the user should know that their data were interpolated. Anything that overlaps less is
    almost certainly the wrong file (another subject, an unregistered session) and raises
    :class:`~medsynth.errors.GeometryError`.
    """
    if reference not in subject:
        raise ValueError(f"reference modality {reference!r} is not in the subject ({', '.join(subject)})")
    target = subject[reference]
    aligned: Subject = {}
    for modality, volume in subject.items():
        mismatch = grid_mismatch(volume, target, atol_mm)
        if mismatch is None:
            aligned[modality] = volume
            continue
        overlap = overlap_fraction(volume, target)
        if overlap < MIN_OVERLAP:
            raise GeometryError(
                f"covers only {overlap:.0%} of the field of view of {target.source} ({mismatch}); "
                "check that both files belong to the same subject and session, or register them first",
                volume.source,
            )
        _warn_once(
            "%s: not on the grid of %s (%s); resampling it linearly onto that grid",
            volume.source,
            target.source,
            mismatch,
        )
        aligned[modality] = resample_to(volume, target)
    return aligned
