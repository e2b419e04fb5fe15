"""Read any supported image into a :class:`~medsynth.io.volume.Volume`, or explain why it cannot be used.

NIfTI goes through nibabel (which understands qform/sform and scaling exactly), MHA/MHD/NRRD through
SimpleITK, and a folder through :func:`~medsynth.io.dicom.list_dicom_series` (which picks the series and
sorts its slices) then SimpleITK's series reader. Every path ends in the same checks, so a 2D image, an
ambiguous 4D image or NaN voxels are refused the same way whatever the format.
"""

from __future__ import annotations

import zlib
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import SimpleITK as sitk
from nibabel.filebasedimages import ImageFileError

from ..errors import DataError
from .dicom import DicomSeriesInfo, list_dicom_series
from .geometry import affine_from_itk
from .volume import Volume

NIFTI_SUFFIXES = (".nii", ".nii.gz")
ITK_SUFFIXES = (".mha", ".mhd", ".nrrd", ".nhdr")
_SUPPORTED = "use .nii/.nii.gz, .mha/.mhd, .nrrd/.nhdr, or a folder holding one DICOM series"


def read_volume(
    path: str | Path, *, series_uid: str | None = None, volume_index: int | None = None
) -> Volume:
    """Read a 3D image with its geometry; the file is opened read-only and never modified.

    Args:
        path: a NIfTI or ITK file, or a folder of DICOM files.
        series_uid: which series to read when the folder holds several image series.
        volume_index: which volume (0-based) to take from a 4D image; 4D images are refused without it,
            because silently taking the first volume of a multi-echo or diffusion file is rarely right.

    Raises:
        DataError: with one line naming the file and the fix.

    Example:
        >>> t1 = read_volume("sub-01_T1w.nii.gz")  # doctest: +SKIP
        >>> t1.shape, t1.orientation  # doctest: +SKIP
        ((176, 256, 256), 'RAS')
    """
    path = Path(path)
    if path.is_dir():
        return _read_dicom(path, series_uid, volume_index)
    if not path.exists():
        raise DataError("does not exist; check the path", path)
    name = path.name.lower()
    if name.endswith(NIFTI_SUFFIXES):
        return _read_nifti(path, volume_index)
    if name.endswith(ITK_SUFFIXES):
        return _read_itk(path, volume_index)
    if name.endswith(".dcm"):
        raise DataError("is a single DICOM file; pass the folder that holds the whole series", path)
    raise DataError(f"unsupported file type; {_SUPPORTED}", path)


def _volume_key(shape: tuple[int, ...], volume_index: int | None, path: Path) -> tuple[Any, ...]:
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
        raise DataError(f"is 4D with {count} volumes; pass volume_index (0 to {count - 1}) to pick one", path)
    if volume_index is not None and not 0 <= volume_index < count:
        raise DataError(
            f"volume_index {volume_index} is out of range; it has {count} volume(s), 0 to {count - 1}", path
        )
    spatial = (slice(None),) * 3
    return (*spatial, volume_index, *singles) if len(dims) == 4 else (*spatial, *singles)


def _finish(array: np.ndarray, affine: np.ndarray, meta: dict[str, Any], path: Path) -> Volume:
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


def _read_nifti(path: Path, volume_index: int | None) -> Volume:
    try:
        image = nib.load(path, mmap=False)
        key = _volume_key(image.shape, volume_index, path)
        array = np.asanyarray(image.dataobj[key])
    except (ImageFileError, OSError, EOFError, ValueError, zlib.error) as exc:
        raise DataError(
            f"cannot be read as NIfTI ({exc}); the file is truncated or corrupt, copy it again", path
        ) from exc
    header = image.header
    # nibabel moves scl_slope/scl_inter from the loaded header into the data proxy.
    slope, inter = float(image.dataobj.slope), float(image.dataobj.inter)
    meta = {
        "format": "nifti",
        "header": header.binaryblock,
        "qform_code": int(header["qform_code"]),
        "sform_code": int(header["sform_code"]),
        "on_disk_dtype": str(header.get_data_dtype()),
        "scl_slope": slope,
        "scl_inter": inter,
    }
    return _finish(array, image.affine, meta, path)


def _read_itk(path: Path, volume_index: int | None) -> Volume:
    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as exc:
        raise DataError(
            f"cannot be read ({_itk_reason(exc)}); the file is truncated or corrupt, copy it again", path
        ) from exc
    return _from_sitk(
        image, volume_index, path, {"format": "itk", "pixel_type": image.GetPixelIDTypeAsString()}
    )


def _itk_reason(exc: RuntimeError) -> str:
    """The informative last line of ITK's multi-line exception text."""
    lines = str(exc).strip().splitlines()
    return lines[-1].strip() if lines else "unknown error"


def _from_sitk(image: sitk.Image, volume_index: int | None, path: Path, meta: dict[str, Any]) -> Volume:
    """Volume from a SimpleITK image: ``[(t,) k, j, i (, c)]`` arrays become ``[i, j, k (, t or c)]``."""
    array = sitk.GetArrayViewFromImage(image)
    spatial = image.GetDimension()
    order = tuple(reversed(range(spatial))) + tuple(range(spatial, array.ndim))
    array = array.transpose(order)
    key = _volume_key(array.shape, volume_index, path)
    affine = affine_from_itk(image.GetSpacing(), image.GetOrigin(), image.GetDirection())
    return _finish(np.array(array[key]), affine, meta, path)


def _pick_series(folder: Path, series_uid: str | None) -> DicomSeriesInfo:
    """The one image series of ``folder`` that the user means, or a DataError that lists the choices."""
    found = list_dicom_series(folder)
    if found.unreadable:
        bad, reason = found.unreadable[0]
        raise DataError(
            f"has {len(found.unreadable)} DICOM file(s) that cannot be parsed (e.g. {bad.name}: {reason}); "
            "a slice may be missing, so remove them or copy the export again",
            folder,
        )
    if not found:
        nested = any(entry.is_dir() for entry in folder.iterdir())
        where = " directly in it (only in subfolders)" if nested else ""
        raise DataError(f"holds no DICOM files{where}; pass the folder of one DICOM image series", folder)
    images = [series for series in found if series.is_image]
    if not images:
        kinds = ", ".join(sorted({series.modality or "unknown" for series in found}))
        raise DataError(
            f"holds only non-image DICOM objects ({kinds}); pass the folder of an image series", folder
        )
    if series_uid is not None:
        matches = [series for series in images if series.series_uid == series_uid]
        if not matches:
            listing = "; ".join(series.describe() for series in images)
            raise DataError(f"has no image series {series_uid}; available: {listing}", folder)
        return matches[0]
    if len(images) > 1:
        listing = "; ".join(series.describe() for series in images)
        raise DataError(f"holds {len(images)} image series: {listing}; pass series_uid to choose one", folder)
    return images[0]


def _read_dicom(folder: Path, series_uid: str | None, volume_index: int | None) -> Volume:
    info = _pick_series(folder, series_uid)
    if info.geometry_problem is not None:
        raise DataError(
            f"series {info.series_uid}: {info.geometry_problem}; export it as one regular 3D series", folder
        )
    if info.n_files == 1 and info.number_of_frames <= 1:
        raise DataError(
            f"series {info.series_uid} is a single 2D slice; medsynth needs a 3D volume with several slices",
            folder,
        )
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames([str(file) for file in info.files])
    reader.SetOutputPixelType(sitk.sitkFloat32)
    try:
        image = reader.Execute()
    except RuntimeError as exc:
        raise DataError(
            f"series {info.series_uid} cannot be read ({_itk_reason(exc)}); copy the export again",
            folder,
        ) from exc
    meta = {
        "format": "dicom",
        "series_uid": info.series_uid,
        "study_uid": info.study_uid,
        "series_description": info.series_description,
        "modality": info.modality,
        "files": [str(file) for file in info.files],
        "tags": {
            "PatientID": info.patient_id,
            "StudyDate": info.study_date,
            "ProtocolName": info.protocol_name,
            "SequenceName": info.sequence_name,
            "EchoTime": info.echo_time,
            "RepetitionTime": info.repetition_time,
            "InversionTime": info.inversion_time,
            "ContrastBolusAgent": info.contrast_bolus_agent,
        },
    }
    return _from_sitk(image, volume_index, folder, meta)
