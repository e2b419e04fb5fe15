"""The format registry and the checks every reader shares.

One :class:`ImageFormat` per file format, registered by the module that implements it (nnU-Net's
``reader_writer_registry`` idea): :func:`~medsynth.io.readers.read_volume` and
:func:`~medsynth.io.writers.write_volume` look the format up by file ending, so a new format is one new
module in this package and an unknown ending is refused with the list of known ones.

Format modules import their heavy library (SimpleITK, pydicom) inside their functions, so reading a
NIfTI never loads them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ...errors import DataError
from ..volume import Volume

#: ``read(path, series_uid=..., volume_index=...) -> Volume``
Reader = Callable[..., Volume]
#: ``write(array, reference, path)``: write ``array`` (float32, or int16 when asked) on ``reference``'s grid to
#: ``path``, storing the array's own type.
Writer = Callable[[np.ndarray, Volume, Path], None]


@dataclass(frozen=True)
class ImageFormat:
    """A format medsynth reads (and maybe writes), found by file ending or, with ``folder``, a folder.

    ``suffixes`` are lower-case endings including the dot (``.nii.gz``); ``write_suffixes`` the subset
    that can be written (``.mhd`` is read but not written: its pixels live in a second file).
    """

    name: str
    suffixes: tuple[str, ...]
    read: Reader
    write: Writer | None = None
    write_suffixes: tuple[str, ...] = ()
    folder: bool = False

    def __post_init__(self) -> None:
        if not self.folder and not self.suffixes:
            raise ValueError(f"format {self.name!r} needs file endings or folder=True")
        if any(not s.startswith(".") or s != s.lower() for s in self.suffixes):
            raise ValueError(f"format {self.name!r}: endings must be lower case and start with '.'")
        if not set(self.write_suffixes) <= set(self.suffixes) or (self.write_suffixes and not self.write):
            raise ValueError(f"format {self.name!r}: write_suffixes need a writer and must be read suffixes")


_REGISTRY: dict[str, ImageFormat] = {}


def register(image_format: ImageFormat) -> ImageFormat:
    """Add a format; an ending (or the folder reader) already claimed by another format is an error."""
    for other in _REGISTRY.values():
        if other.name == image_format.name:
            continue
        clash = set(other.suffixes) & set(image_format.suffixes)
        if clash or (other.folder and image_format.folder):
            raise ValueError(f"format {image_format.name!r} claims {clash or 'folders'} of {other.name!r}")
    _REGISTRY[image_format.name] = image_format
    return image_format


def registered() -> tuple[ImageFormat, ...]:
    return tuple(_REGISTRY.values())


def format_for(path: Path, *, writing: bool = False) -> ImageFormat | None:
    """The format of ``path`` by its longest matching ending (a folder: the folder format), or None."""
    if not writing and path.is_dir():
        return next((f for f in _REGISTRY.values() if f.folder), None)
    name = path.name.lower()
    best: tuple[int, ImageFormat] | None = None
    for image_format in _REGISTRY.values():
        for suffix in image_format.write_suffixes if writing else image_format.suffixes:
            if name.endswith(suffix) and (best is None or len(suffix) > best[0]):
                best = (len(suffix), image_format)
    return best[1] if best else None


def known_endings(*, writing: bool = False) -> str:
    """``.nii, .nii.gz, ...`` (and "a DICOM folder" when reading) for error messages."""
    endings = [s for f in _REGISTRY.values() for s in (f.write_suffixes if writing else f.suffixes)]
    folders = [] if writing else [f"a {f.name.upper()} folder" for f in _REGISTRY.values() if f.folder]
    return ", ".join(endings + folders)


def volume_key(shape: tuple[int, ...], volume_index: int | None, path: Path) -> tuple[Any, ...]:
    """Index expression taking one 3D volume (axes ``i, j, k`` first) out of an image of ``shape``.

    Trailing axes of length 1 are ignored (NIfTI often stores a 3D image as ``x, y, z, 1``).
    """
    dims = list(shape)
    while len(dims) > 3 and dims[-1] == 1:
        dims.pop()
    singles = (0,) * (len(shape) - len(dims))
    if len(dims) < 3 or 1 in dims[:3]:
        raise DataError(
            f"is a 2D image (shape {'x'.join(map(str, shape))}); medsynth needs a 3D volume with several slices",
            path,
        )
    if len(dims) > 4:
        raise DataError(
            f"has {len(dims)} dimensions; medsynth reads 3D images or one volume of a 4D image", path
        )
    count = dims[3] if len(dims) == 4 else 1
    if len(dims) == 4 and volume_index is None:
        raise DataError(
            f"is 4D with {count} volumes; pick one with --volume-index N, N from 0 to {count - 1} "
            "(data.volume_index in a training config)",
            path,
        )
    if volume_index is not None and not 0 <= volume_index < count:
        raise DataError(
            f"--volume-index {volume_index} is out of range; it has {count} volume(s), 0 to {count - 1}", path
        )
    spatial = (slice(None),) * 3
    return (*spatial, volume_index, *singles) if len(dims) == 4 else (*spatial, *singles)


def finish(array: np.ndarray, affine: np.ndarray, meta: dict[str, Any], path: Path) -> Volume:
    """Checks shared by every format: real numbers, all finite, then build the float32 Volume."""
    if not np.issubdtype(array.dtype, np.number) or np.iscomplexobj(array):
        raise DataError(
            f"has {array.dtype} voxels (colour or complex); medsynth needs one real value per voxel", path
        )
    array = np.asarray(array, dtype=np.float32)
    finite = np.isfinite(array)
    if not finite.all():
        raise DataError(
            f"has {int(array.size - finite.sum())} NaN/Inf voxels; replace them (e.g. with 0) and save the file again",
            path,
        )
    if not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise DataError("has an invalid (singular or non-finite) voxel-to-world matrix; fix its header", path)
    return Volume(array, affine, {"path": str(path), **meta})
