"""Read any supported image into a :class:`~medsynth.io.volume.Volume`, or explain why it cannot be used.

The format is found by file ending in the registry of :mod:`medsynth.io.formats` (NIfTI through
nibabel, MHA/MHD/NRRD through SimpleITK, a folder as a DICOM series). Before that, the path itself is
checked so a missing file, a link loop or a permission problem is reported as what it is, and every
format ends in the same checks, so a 2D image, an ambiguous 4D image or NaN voxels are refused the same
way whatever the format.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

from ..errors import DataError
from . import formats
from .volume import Volume


def read_volume(
    path: str | Path, *, series_uid: str | None = None, volume_index: int | None = None
) -> Volume:
    """Read a 3D image with its geometry; the file is opened read-only and never modified.

    Args:
        path: a NIfTI or ITK file, or a folder of DICOM files.
        series_uid: which series to read when the folder holds several image series (``UID#stack``
            for one stack of a multi-frame file that holds several).
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
    _check_access(path)
    image_format = formats.format_for(path)
    if image_format is None:
        if path.name.lower().endswith(".dcm"):
            raise DataError("is a single DICOM file; pass the folder that holds the whole series", path)
        raise DataError(f"unsupported file type; use {formats.known_endings()}", path)
    return image_format.read(path, series_uid=series_uid, volume_index=volume_index)


def _check_access(path: Path) -> None:
    """Say what is wrong with the path itself: missing, a link loop, a broken link, no permission."""
    try:
        is_folder = path.is_dir()
        if is_folder:
            os.listdir(path)
        else:
            with open(path, "rb"):
                pass
    except FileNotFoundError as exc:
        if path.is_symlink():
            raise DataError(
                f"is a symbolic link to {os.readlink(path)}, which does not exist; fix the link", path
            ) from exc
        raise DataError("does not exist; check the path", path) from exc
    except PermissionError as exc:
        raise DataError(
            "cannot be read: permission denied; ask for read access (chmod) or copy the data", path
        ) from exc
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise DataError("is a symbolic link loop; point the link at the real file", path) from exc
        if exc.errno == errno.ENOENT:  # a folder in the path is missing
            raise DataError("does not exist; check the path", path) from exc
        raise DataError(f"cannot be read ({exc.strerror or exc}); check the path", path) from exc
