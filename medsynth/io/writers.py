"""Write an array on the exact grid of a reference Volume (the promise "geometry is sacred").

The reference is the Volume the array was computed from (the input of a synthesis), so the output lands
voxel for voxel on the input's grid. The format is found by file ending in :mod:`medsynth.io.formats`;
for NIfTI the reference's own header is reused when it has one: qform/sform codes, units and intent
survive, which matters to tools (FSL, SPM) that read those codes.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from ..errors import MedsynthError
from . import formats
from .atomic import atomic_path
from .volume import Volume

log = logging.getLogger("medsynth")
#: Output data types: float32 (the default: what the network computed) or int16 (rounded, clipped to
#: the int16 range; what CT scanners and treatment-planning systems store HU as).
OUTPUT_DTYPES = ("float32", "int16")


def write_volume(array: np.ndarray, reference: Volume, path: str | Path, *, dtype: str = "float32") -> Path:
    """Write ``array`` as float32 (or ``dtype="int16"``) on ``reference``'s grid; the format follows the extension.

    ``.nii``/``.nii.gz`` are written with nibabel, ``.mha``/``.nrrd`` with SimpleITK (compressed). The file
    appears complete or not at all (:func:`~medsynth.io.atomic.atomic_path`).

    Raises:
        ValueError: ``array`` does not have the reference's shape (a programming error upstream).
        MedsynthError: the extension is not a supported output format (the message lists them).

    Example:
        >>> write_volume(t2_synthetic, t1, "sub-01_T2w_syn.nii.gz")  # doctest: +SKIP
    """
    path = Path(path)
    if dtype not in OUTPUT_DTYPES:
        raise MedsynthError(f"output dtype must be one of {', '.join(OUTPUT_DTYPES)}, got {dtype!r}", path)
    array = np.asarray(array, dtype=np.float32)
    if dtype == "int16":
        array = to_int16(array, path)
    if array.shape != reference.shape:
        raise ValueError(f"array shape {array.shape} does not match the reference grid {reference.shape}")
    image_format = formats.format_for(path, writing=True)
    if image_format is None or image_format.write is None:
        raise MedsynthError(f"unsupported output extension; use {formats.known_endings(writing=True)}", path)
    with atomic_path(path) as temp:
        image_format.write(array, reference, temp)
    return path


def to_int16(array: np.ndarray, path: Path) -> np.ndarray:
    """``array`` rounded to int16; values beyond its range are clipped, with one warning for the file.

    A synthetic CT above 32767 HU is a model failure, not a value to store quietly: the warning says how
    many voxels were clipped and the range they spanned, and float32 keeps them.
    """
    info = np.iinfo(np.int16)
    rounded = np.rint(array)
    outside = (rounded < info.min) | (rounded > info.max)
    clipped = int(np.count_nonzero(outside))
    if clipped:
        values = array[outside]
        log.warning(
            "%s: %d voxel(s) outside the int16 range [%d, %d] were clipped (values from %.6g to %.6g); "
            "use --out-dtype float32 to keep them",
            path, clipped, info.min, info.max, float(values.min()), float(values.max()),
        )  # fmt: skip
    return np.clip(rounded, info.min, info.max).astype(np.int16)
