"""MetaImage and NRRD (``.mha``/``.mhd``, ``.nrrd``/``.nhdr``) through SimpleITK, imported when used."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ...errors import DataError
from ..volume import Volume
from .base import ImageFormat, finish, register, volume_key

if TYPE_CHECKING:
    import SimpleITK as sitk


def read_itk(path: Path, *, series_uid: str | None = None, volume_index: int | None = None) -> Volume:
    import SimpleITK as sitk

    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as exc:
        raise DataError(
            f"cannot be read ({itk_reason(exc, path)}); the file is truncated or corrupt, copy it again", path
        ) from exc
    return from_sitk(
        image, volume_index, path, {"format": "itk", "pixel_type": image.GetPixelIDTypeAsString()}
    )


def write_itk(array: np.ndarray, reference: Volume, path: Path) -> None:
    import SimpleITK as sitk

    from ..geometry import volume_to_sitk

    sitk.WriteImage(volume_to_sitk(reference, array), str(path), useCompression=True)


def itk_reason(exc: RuntimeError, path: Path | None = None) -> str:
    """The informative last line of ITK's multi-line exception text.

    ITK ends "File cannot be read" with ``Reason:`` and the C library's last error, whatever made the read
    fail; for a file that is there it is stale (a truncated MetaImage says "No such file or directory").
    With an existing ``path`` that line becomes what it means.
    """
    lines = str(exc).strip().splitlines()
    last = lines[-1].strip() if lines else "unknown error"
    if last.startswith("Reason:") and path is not None and Path(path).exists():
        return "its header or voxel data is incomplete"
    return last


def from_sitk(image: sitk.Image, volume_index: int | None, path: Path, meta: dict[str, Any]) -> Volume:
    """Volume from a SimpleITK image: ``[(t,) k, j, i (, c)]`` arrays become ``[i, j, k (, t or c)]``."""
    import SimpleITK as sitk

    from ..geometry import affine_from_itk

    array = sitk.GetArrayViewFromImage(image)
    spatial = image.GetDimension()
    order = tuple(reversed(range(spatial))) + tuple(range(spatial, array.ndim))
    array = array.transpose(order)
    key = volume_key(array.shape, volume_index, path)
    affine = affine_from_itk(image.GetSpacing(), image.GetOrigin(), image.GetDirection())
    return finish(np.array(array[key]), affine, meta, path)


ITK = register(
    ImageFormat(
        "itk", (".mha", ".mhd", ".nrrd", ".nhdr"), read_itk, write_itk, write_suffixes=(".mha", ".nrrd")
    )
)
