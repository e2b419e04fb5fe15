"""The in-memory image model shared by every reader, writer and dataset.

Conventions (nibabel's, so NIfTI round-trips without thought):

* ``array`` is float32, indexed ``[i, j, k]`` in the voxel order of ``affine``.
* ``affine`` maps voxel indices to RAS+ world millimetres. DICOM/ITK (LPS) geometry is converted on
  read and back on write, so every Volume speaks one world convention.
* ``meta`` keeps what a writer needs to reproduce the source header (``format``, ``path``, NIfTI
  ``header`` bytes, ``qform_code``/``sform_code``, DICOM ``series_uid`` and tags, ...).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import nibabel as nib
import numpy as np

#: Flip LPS <-> RAS (x and y change sign).
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


@dataclass
class Volume:
    """A 3D image with its full geometry and where it came from."""

    array: np.ndarray
    affine: np.ndarray
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.array = np.asarray(self.array, dtype=np.float32)
        self.affine = np.asarray(self.affine, dtype=np.float64)
        if self.array.ndim != 3:
            raise ValueError(f"a Volume is 3D, got an array of shape {self.array.shape}")
        if self.affine.shape != (4, 4):
            raise ValueError(f"affine must be 4x4, got {self.affine.shape}")

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.array.shape)  # type: ignore[return-value]

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size in mm along i, j, k (column norms of the affine)."""
        return tuple(float(s) for s in np.linalg.norm(self.affine[:3, :3], axis=0))  # type: ignore[return-value]

    @property
    def origin(self) -> tuple[float, float, float]:
        """World position (RAS mm) of voxel (0, 0, 0)."""
        return tuple(float(v) for v in self.affine[:3, 3])  # type: ignore[return-value]

    @property
    def direction(self) -> np.ndarray:
        """3x3 matrix of unit axis directions (columns) in RAS."""
        return self.affine[:3, :3] / np.asarray(self.spacing)

    @property
    def orientation(self) -> str:
        """Axis codes such as ``RAS`` or ``LPS`` (nibabel's closest-axis labels)."""
        return "".join(nib.aff2axcodes(self.affine))

    @property
    def source(self) -> str:
        """Where the volume came from, for messages."""
        return str(self.meta.get("path", "<memory>"))

    def with_array(self, array: np.ndarray, **meta_updates: Any) -> Volume:
        """Same grid and provenance, new voxel values (shape must match)."""
        if tuple(array.shape) != self.shape:
            raise ValueError(f"array shape {array.shape} does not match the grid {self.shape}")
        return replace(self, array=array, meta={**self.meta, **meta_updates})

    def itk_geometry(self) -> tuple[tuple[float, ...], tuple[float, ...], tuple[float, ...]]:
        """(spacing, origin, direction) in SimpleITK's LPS convention, for writers."""
        lps = LPS_TO_RAS @ self.affine
        spacing = np.linalg.norm(lps[:3, :3], axis=0)
        direction = lps[:3, :3] / spacing
        return tuple(spacing.tolist()), tuple(lps[:3, 3].tolist()), tuple(direction.flatten().tolist())


#: A subject's co-registered images, keyed by canonical modality name.
Subject = dict[str, Volume]


@dataclass(frozen=True)
class Reorientation:
    """The axis permutation/flips that bring an array to canonical RAS, with its exact inverse.

    Only permutations and flips are used (no interpolation), so ``undo(apply(x)) == x`` bit for bit.
    """

    ornt: np.ndarray  # nibabel orientation array (axis, flip) from source to RAS
    source_shape: tuple[int, int, int]

    def apply(self, array: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(nib.orientations.apply_orientation(array, self.ornt))

    def undo(self, array: np.ndarray) -> np.ndarray:
        identity = np.column_stack([np.arange(3), np.ones(3)])
        inverse = nib.orientations.ornt_transform(identity, self.ornt)
        out = np.ascontiguousarray(nib.orientations.apply_orientation(array, inverse))
        if out.shape != self.source_shape:
            raise ValueError(f"undo produced shape {out.shape}, expected {self.source_shape}")
        return out


def to_canonical(volume: Volume) -> tuple[Volume, Reorientation]:
    """Reorient to the closest RAS axes for learning; keep the transform to go back exactly."""
    ornt = nib.orientations.io_orientation(volume.affine)
    transform = Reorientation(ornt=ornt, source_shape=volume.shape)
    array = transform.apply(volume.array)
    affine = volume.affine @ nib.orientations.inv_ornt_aff(ornt, volume.shape)
    return Volume(array, affine, dict(volume.meta)), transform
