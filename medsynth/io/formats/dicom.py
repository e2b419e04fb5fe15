"""A folder of DICOM files: pick one series (or one stack of a multi-frame file) and read it.

Classic single-frame series are read by SimpleITK's series reader in the order
:func:`~medsynth.io.dicom.list_dicom_series` sorted them; enhanced and legacy-converted multi-frame
objects by pydicom, frame by frame with the frame's own geometry and rescale. Both give their geometry in
ITK's LPS terms to the same :func:`~medsynth.io.geometry.affine_from_itk`. pydicom and SimpleITK are
imported here only when a folder is read.

Messages name real files: when the folder holds links (a batch converter links one series' files into a
private temporary folder), the files the links point to are named, never the temporary folder.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ...errors import DataError
from ..volume import Volume
from .base import ImageFormat, finish, register, volume_key

if TYPE_CHECKING:
    from ..dicom import DicomSeriesInfo


def _real(path: Path) -> Path:
    """The file a link points to (the path itself when it is not a link)."""
    return path.resolve() if path.is_symlink() else path


def _where(folder: Path, files: Any) -> Path:
    """The folder to name in a message: the real files' common folder when ``folder`` holds links."""
    files = list(files)
    if not files or not any(f.is_symlink() for f in files):
        return folder
    return Path(os.path.commonpath([_real(f).parent for f in files]))


def pick_series(folder: Path, series_uid: str | None) -> DicomSeriesInfo:
    """The one image series of ``folder`` that the user means, or a DataError that lists the choices.

    ``series_uid`` is a SeriesInstanceUID, or ``UID#stack`` for one stack of a multi-frame file that
    holds several (as :attr:`~medsynth.io.dicom.DicomSeriesInfo.selector` prints it).
    """
    from ..dicom import list_dicom_series

    found = list_dicom_series(folder)
    if found.unreadable:
        bad, reason = found.unreadable[0]
        raise DataError(
            f"has {len(found.unreadable)} DICOM file(s) that cannot be parsed (e.g. {_real(bad)}: {reason}); "
            "a slice may be missing, so remove them or copy the export again",
            _where(folder, [bad]),
        )
    if not found:
        nested = any(entry.is_dir() for entry in folder.iterdir())
        where = " directly in it (only in subfolders)" if nested else ""
        raise DataError(f"holds no DICOM files{where}; pass the folder of one DICOM image series", folder)
    images = [series for series in found if series.is_image]
    here = _where(folder, [f for series in found for f in series.files])
    if not images:
        kinds = ", ".join(sorted({series.modality or "unknown" for series in found}))
        raise DataError(
            f"holds only non-image DICOM objects ({kinds}); pass the folder of an image series", here
        )
    if series_uid is not None:
        matches = [s for s in images if series_uid in (s.selector, s.series_uid)]
        if not matches:
            listing = "; ".join(series.describe() for series in images)
            raise DataError(f"has no image series {series_uid}; available: {listing}", here)
        images = matches
    if len(images) > 1:
        listing = "; ".join(series.describe() for series in images)
        what = "stacks" if len({s.series_uid for s in images}) == 1 else "image series"
        raise DataError(
            f"holds {len(images)} {what}: {listing}; choose one with --series-uid UID (a series_uid "
            "column in a data manifest)",
            here,
        )
    return images[0]


def read_dicom_folder(
    folder: Path, *, series_uid: str | None = None, volume_index: int | None = None
) -> Volume:
    info = pick_series(folder, series_uid)
    here = _where(folder, info.files)
    if info.geometry_problem is not None:
        raise DataError(
            f"series {info.selector}: {info.geometry_problem}; export it as one regular 3D series", here
        )
    if info.n_slices < 2:
        raise DataError(
            f"series {info.selector} is a single 2D slice; medsynth needs a 3D volume with several slices",
            here,
        )
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
    if info.is_multiframe:
        meta["stack"] = info.stack
        meta["frames"] = list(info.frames)
        return _read_multiframe(info, volume_index, folder, meta)
    return _read_classic(info, volume_index, folder, meta)


def _read_classic(info: DicomSeriesInfo, volume_index: int | None, folder: Path, meta: dict) -> Volume:
    import SimpleITK as sitk

    from ..dicom import slice_problem
    from .itk import from_sitk, itk_reason

    for path in info.files:  # SimpleITK reads short pixel data and a slope of 0 without a word
        problem = slice_problem(path)
        if problem is not None:
            raise DataError(
                f"slice of series {info.series_uid} cannot be read: {problem}; export or copy the series "
                "again",
                _real(path),
            )
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames([str(file) for file in info.files])
    reader.SetOutputPixelType(sitk.sitkFloat32)
    try:
        image = reader.Execute()
    except RuntimeError as exc:
        bad = _first_bad_slice(info.files)
        if bad is not None:
            path, reason = bad
            raise DataError(
                f"slice of series {info.series_uid} cannot be read ({reason}); the file is truncated or "
                "corrupt, copy the export again",
                _real(path),
            ) from exc
        raise DataError(
            f"series {info.series_uid} cannot be read ({itk_reason(exc)}); copy the export again",
            _where(folder, info.files),
        ) from exc
    return from_sitk(image, volume_index, _where(folder, info.files), meta)


def _first_bad_slice(files: Any) -> tuple[Path, str] | None:
    """The first file whose pixels cannot be decoded, and why (only run once a series failed to read)."""
    import pydicom

    for path in files:
        try:
            pydicom.dcmread(path).pixel_array  # noqa: B018 - decoding is the check
        except Exception as exc:  # pydicom raises many exception types on damaged files
            return path, f"{type(exc).__name__}: {' '.join(str(exc).split())[:200]}"
    return None


def _read_multiframe(info: DicomSeriesInfo, volume_index: int | None, folder: Path, meta: dict) -> Volume:
    from ..dicom import multiframe_problem, read_multiframe
    from ..geometry import affine_from_itk

    path = info.files[0]
    problem = multiframe_problem(path, info.frames)
    if problem is not None:
        raise DataError(
            f"multi-frame series {info.selector} cannot be read: {problem}; export or copy the series again",
            _real(path),
        )
    try:
        array, spacing, origin, direction = read_multiframe(info)
    except Exception as exc:  # pydicom's decoders raise many exception types on damaged files
        reason = " ".join(str(exc).split())[:200] or type(exc).__name__
        raise DataError(
            f"multi-frame series {info.selector} cannot be decoded ({reason}); copy the export again",
            _real(path),
        ) from exc
    affine = affine_from_itk(spacing, origin, direction)
    here = _where(folder, info.files)  # a batch's link folder is never named
    return finish(array[volume_key(array.shape, volume_index, here)], affine, meta, here)


DICOM = register(ImageFormat("dicom", (), read_dicom_folder, folder=True))
