"""NIfTI-1/2 (``.nii``, ``.nii.gz``) through nibabel, which understands qform/sform and scaling exactly."""

from __future__ import annotations

import logging
import zlib
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from nibabel.filebasedimages import ImageFileError
from nibabel.wrapstruct import WrapStructError

from ...errors import DataError
from ..volume import Volume
from .base import ImageFormat, finish, register, volume_key

log = logging.getLogger("medsynth")

_GZIP_MAGIC = b"\x1f\x8b"
_NIFTI2_HEADER_BYTES = 540


def read_nifti(path: Path, *, series_uid: str | None = None, volume_index: int | None = None) -> Volume:
    """Read a NIfTI file; a ``.nii.gz`` that is not compressed (or a ``.nii`` that is) is read anyway.

    nibabel picks decompression by the name, so a misnamed file would otherwise fail as "corrupt".
    """
    with open(path, "rb") as stream:
        head = stream.read(352)
    compressed = head[:2] == _GZIP_MAGIC
    named_gz = path.name.lower().endswith(".gz")
    misnamed = ""
    if compressed != named_gz:
        misnamed = (
            "is gzip-compressed although named .nii; rename it to .nii.gz"
            if compressed
            else "is not gzip-compressed although named .nii.gz; rename it to .nii"
        )
        if not compressed and head[344:347] != b"n+1" and head[4:7] != b"n+2":
            raise DataError(
                f"{misnamed.split(';')[0]}, and holds no NIfTI header; the file is corrupt, copy it again",
                path,
            )
    try:
        image = _load_misnamed(path, compressed) if misnamed else nib.load(path, mmap=False)
        key = volume_key(image.shape, volume_index, path)
        array = np.asanyarray(image.dataobj[key])
    except (ImageFileError, OSError, EOFError, ValueError, zlib.error, WrapStructError) as exc:
        raise DataError(
            f"cannot be read as NIfTI ({exc}); the file is truncated or corrupt, copy it again", path
        ) from exc
    if misnamed:
        log.warning("%s: %s (read it anyway)", path, misnamed)
    header = image.header
    # nibabel moves scl_slope/scl_inter from the loaded header into the data proxy.
    slope, inter = float(image.dataobj.slope), float(image.dataobj.inter)
    meta: dict[str, Any] = {
        "format": "nifti",
        "header": header.binaryblock,
        "qform_code": int(header["qform_code"]),
        "sform_code": int(header["sform_code"]),
        "on_disk_dtype": str(header.get_data_dtype()),
        "scl_slope": slope,
        "scl_inter": inter,
    }
    return finish(array, image.affine, meta, path)


def _load_misnamed(path: Path, compressed: bool) -> nib.Nifti1Image | nib.Nifti2Image:
    """Load a NIfTI whose name lies about its compression, from its bytes."""
    data = path.read_bytes()
    if compressed:
        data = zlib.decompress(data, wbits=16 + zlib.MAX_WBITS)
    image_class = nib.Nifti2Image if int.from_bytes(data[:4], "little") == _NIFTI2_HEADER_BYTES else None
    if image_class is None and int.from_bytes(data[:4], "big") == _NIFTI2_HEADER_BYTES:
        image_class = nib.Nifti2Image
    return (image_class or nib.Nifti1Image).from_bytes(data)


def write_nifti(array: np.ndarray, reference: Volume, path: Path) -> None:
    nib.save(nifti_image(array, reference), path)


def nifti_image(array: np.ndarray, reference: Volume) -> nib.Nifti1Image | nib.Nifti2Image:
    """A NIfTI image of ``array`` whose header is the reference's (when it was NIfTI) or a scanner-space one.

    The reference header is kept byte for byte where it still applies, so qform and sform (which may
    legitimately differ) come back exactly. Only what no longer holds is reset: the data type (the array's:
    float32, or int16 when asked), the scaling (none: values are written as they are), the display range, and
    the affine if the reference's grid is not the header's any more.
    """
    block = reference.meta.get("header") if reference.meta.get("format") == "nifti" else None
    if block is None:
        image = nib.Nifti1Image(array, reference.affine)
        image.header.set_qform(reference.affine, code=1)
        image.header.set_sform(reference.affine, code=1)
        image.header.set_xyzt_units("mm", "sec")
        return image
    header_class = nib.Nifti2Header if len(block) == _NIFTI2_HEADER_BYTES else nib.Nifti1Header
    header = header_class(binaryblock=block)
    header.set_data_shape(array.shape)
    header.set_data_dtype(array.dtype)
    header.set_slope_inter(None, None)
    header["cal_min"] = header["cal_max"] = 0
    if not np.allclose(header.get_best_affine(), reference.affine, rtol=0, atol=1e-6):
        header.set_qform(reference.affine, code=int(header["qform_code"]) or 1)
        header.set_sform(reference.affine, code=int(header["sform_code"]) or 1)
    image_class = nib.Nifti2Image if header_class is nib.Nifti2Header else nib.Nifti1Image
    return image_class(array, None, header)


NIFTI = register(
    ImageFormat("nifti", (".nii", ".nii.gz"), read_nifti, write_nifti, write_suffixes=(".nii", ".nii.gz"))
)
