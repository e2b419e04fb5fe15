"""Write an array on the exact grid of a reference Volume (the promise "geometry is sacred").

The reference is the Volume the array was computed from (the input of a synthesis), so the output lands
voxel for voxel on the input's grid. For NIfTI the reference's own header is reused when it has one:
qform/sform codes, units and intent survive, which matters to tools (FSL, SPM) that read those codes.
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import SimpleITK as sitk

from ..errors import MedsynthError
from .atomic import atomic_path
from .geometry import volume_to_sitk
from .volume import Volume

_NIFTI2_HEADER_BYTES = 540


def write_volume(array: np.ndarray, reference: Volume, path: str | Path) -> Path:
    """Write ``array`` as float32 on ``reference``'s grid; the format follows the extension.

    ``.nii``/``.nii.gz`` are written with nibabel, ``.mha``/``.nrrd`` with SimpleITK (compressed). The file
    appears complete or not at all (:func:`~medsynth.io.atomic.atomic_path`).

    Raises:
        ValueError: ``array`` does not have the reference's shape (a programming error upstream).
        MedsynthError: the extension is not a supported output format.

    Example:
        >>> write_volume(t2_synthetic, t1, "sub-01_T2w_syn.nii.gz")  # doctest: +SKIP
    """
    path = Path(path)
    array = np.asarray(array, dtype=np.float32)
    if array.shape != reference.shape:
        raise ValueError(f"array shape {array.shape} does not match the reference grid {reference.shape}")
    name = path.name.lower()
    if name.endswith((".nii", ".nii.gz")):
        image = _nifti_image(array, reference)
        with atomic_path(path) as temp:
            nib.save(image, temp)
    elif name.endswith((".mha", ".nrrd")):
        image = volume_to_sitk(reference.with_array(array))
        with atomic_path(path) as temp:
            sitk.WriteImage(image, str(temp), useCompression=True)
    else:
        raise MedsynthError("unsupported output extension; use .nii.gz, .nii, .mha or .nrrd", path)
    return path


def _nifti_image(array: np.ndarray, reference: Volume) -> nib.Nifti1Image | nib.Nifti2Image:
    """A NIfTI image of ``array`` whose header is the reference's (when it was NIfTI) or a scanner-space one.

    The reference header is kept byte for byte where it still applies, so qform and sform (which may
    legitimately differ) come back exactly. Only what no longer holds is reset: the data type (float32),
    the scaling (none: values are written as they are), the display range, and the affine if the
    reference's grid is not the header's any more.
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
    header.set_data_dtype(np.float32)
    header.set_slope_inter(None, None)
    header["cal_min"] = header["cal_max"] = 0
    if not np.allclose(header.get_best_affine(), reference.affine, rtol=0, atol=1e-6):
        header.set_qform(reference.affine, code=int(header["qform_code"]) or 1)
        header.set_sform(reference.affine, code=int(header["sform_code"]) or 1)
    image_class = nib.Nifti2Image if header_class is nib.Nifti2Header else nib.Nifti1Image
    return image_class(array, None, header)
