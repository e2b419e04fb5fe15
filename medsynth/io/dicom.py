"""DICOM series: find them in scanner exports, and write synthetic volumes back as series.

Discovery reads headers only (``stop_before_pixels`` and a fixed list of tags), so a batch converter can
walk whole export trees quickly; files that are not DICOM are ignored, files that look like DICOM but cannot
be parsed are reported, never raised. Pixels are read later by SimpleITK (:mod:`medsynth.io.readers`),
given the file list sorted here.

Writing produces one classic single-frame image per slice along the volume's ``k`` axis with exact
per-slice geometry, 16-bit pixels and a rescale that keeps float precision, so any PACS or viewer accepts
the result and reading it back gives the same grid.
"""

from __future__ import annotations

import contextlib
import copy
import datetime
import os
import shutil
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, BinaryIO, NamedTuple

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    CTImageStorage,
    ExplicitVRLittleEndian,
    MediaStorageDirectoryStorage,
    MRImageStorage,
    generate_uid,
)
from pydicom.valuerep import format_number_as_ds

from ..errors import MedsynthError
from .atomic import partial_name
from .volume import LPS_TO_RAS, Volume

#: Modalities whose objects carry no image to translate (reports, presentation states, RT, segmentations).
NON_IMAGE_MODALITIES = frozenset(
    {"SR", "PR", "KO", "DOC", "REG", "SEG", "RTSTRUCT", "RTPLAN", "RTDOSE", "RTRECORD"}
)

#: Tags read during discovery; everything else in the header is skipped.
_DISCOVERY_TAGS = [
    "SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID", "SeriesDescription",
    "SeriesNumber", "Modality", "ImageType", "Rows", "Columns", "NumberOfFrames", "InstanceNumber",
    "ImagePositionPatient", "ImageOrientationPatient", "ProtocolName", "SequenceName", "ScanningSequence",
    "SequenceVariant", "EchoTime", "RepetitionTime", "InversionTime", "ContrastBolusAgent", "PatientID",
    "StudyDate", "PixelSpacing", "SliceThickness", "RescaleSlope", "RescaleIntercept",
    "SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence", "DimensionIndexSequence",
]  # fmt: skip

_STORAGE_CLASSES = {"MR": MRImageStorage, "CT": CTImageStorage}
_PATIENT_STUDY_TAGS = (
    "PatientName", "PatientID", "PatientBirthDate", "PatientSex", "PatientAge", "PatientSize", "PatientWeight",
    "StudyInstanceUID", "StudyDate", "StudyTime", "AccessionNumber", "StudyID", "StudyDescription",
    "ReferringPhysicianName", "FrameOfReferenceUID", "PositionReferenceIndicator",
)  # fmt: skip
_UINT16_MAX = 65535


@dataclass(frozen=True)
class DicomSeriesInfo:
    """One series found on disk: what it is, where its files are, and the tags that identify its contrast.

    ``files`` are sorted by position along the slice normal (or by InstanceNumber when positions are
    missing), which is the order a volume reader needs. ``geometry_problem`` says why the files do not form
    one regular 3D grid (mixed orientations, repeated or unevenly spaced slices), or is ``None``.
    """

    series_uid: str
    study_uid: str
    series_description: str
    series_number: int | None
    modality: str
    sop_class_uid: str
    is_image: bool
    files: tuple[Path, ...]
    slice_positions: tuple[float, ...]
    geometry_problem: str | None
    image_type: tuple[str, ...]
    protocol_name: str
    sequence_name: str
    scanning_sequence: tuple[str, ...]
    sequence_variant: tuple[str, ...]
    echo_time: float | None
    repetition_time: float | None
    inversion_time: float | None
    contrast_bolus_agent: str
    patient_id: str
    study_date: str
    transfer_syntax_uid: str
    number_of_frames: int
    frames: tuple[int, ...] = ()
    stack: str = ""

    @property
    def n_files(self) -> int:
        return len(self.files)

    @property
    def is_multiframe(self) -> bool:
        """One multi-frame (enhanced or legacy-converted) file whose ``frames`` are the slices."""
        return bool(self.frames)

    @property
    def n_slices(self) -> int:
        return len(self.frames) if self.frames else self.n_files

    @property
    def selector(self) -> str:
        """What ``read_volume(series_uid=...)`` takes: the UID, plus ``#stack`` when a file holds several."""
        return f"{self.series_uid}#{self.stack}" if self.stack else self.series_uid

    def describe(self) -> str:
        """One line for messages: UID (and stack), description and file or frame count."""
        count = f"{len(self.frames)} frames" if self.frames else f"{self.n_files} files"
        return f"{self.selector} ({self.series_description or 'no description'}, {count})"


class DicomSeriesList(list[DicomSeriesInfo]):
    """The series found in a folder, with the files that could not be parsed and the links not followed.

    ``unreadable`` holds ``(file, reason)`` for files that look like DICOM but failed to parse, so a batch
    run reports them all instead of stopping on the first bad file; ``links`` holds ``(link, reason)``
    for symbolic links a recursive walk did not follow (broken, or leading out of the folder).
    """

    def __init__(
        self,
        series: list[DicomSeriesInfo],
        unreadable: list[tuple[Path, str]],
        links: list[tuple[Path, str]] | None = None,
    ) -> None:
        super().__init__(series)
        self.unreadable = unreadable
        self.links = links or []


class _FileHeader(NamedTuple):
    path: Path
    dataset: Dataset
    position: np.ndarray | None
    orientation: np.ndarray | None
    instance: int | None


def _dicom_preamble(stream: BinaryIO) -> bool | None:
    """``True`` for Part 10 files (``DICM`` after the preamble), ``False`` for bare datasets, else ``None``.

    Bare little-endian datasets (no preamble, as some old exports write them) start with a group 0x0002 or
    0x0008 tag; anything else (text, images, archives) is not DICOM and is skipped without parsing.
    """
    head = stream.read(132)
    stream.seek(0)
    if head[128:132] == b"DICM":
        return True
    return False if head[:2] in (b"\x02\x00", b"\x08\x00") else None


def _read_header(path: Path) -> _FileHeader | None:
    """Parse one file's header; ``None`` when it is not DICOM or is a DICOMDIR."""
    if path.name.upper() == "DICOMDIR":
        return None
    with open(path, "rb") as stream:
        part10 = _dicom_preamble(stream)
        if part10 is None:
            return None
        with warnings.catch_warnings():  # odd values in exports are common and not the user's to fix
            warnings.simplefilter("ignore")
            dataset = pydicom.dcmread(
                stream, stop_before_pixels=True, force=not part10, specific_tags=_DISCOVERY_TAGS
            )
    if dataset.get("file_meta", Dataset()).get("MediaStorageSOPClassUID") == MediaStorageDirectoryStorage:
        return None
    if "SeriesInstanceUID" not in dataset:
        raise ValueError("no SeriesInstanceUID")
    position = _floats(dataset.get("ImagePositionPatient"), 3)
    orientation = _floats(dataset.get("ImageOrientationPatient"), 6)
    instance = dataset.get("InstanceNumber")
    return _FileHeader(path, dataset, position, orientation, int(instance) if instance is not None else None)


def _floats(value: Any, count: int) -> np.ndarray | None:
    if value is None:
        return None
    array = np.asarray([float(v) for v in value], dtype=np.float64)
    return array if array.shape == (count,) else None


def _walk(folder: Path, recursive: bool, skipped_links: list[tuple[Path, str]]) -> Iterator[Path]:
    """The files of ``folder`` in name order; with ``recursive``, of its subfolders too (depth first).

    A recursive walk follows symbolic links (to files and to folders) that stay inside ``folder``, as
    exports that link one tree into another expect, and visits every real folder once, so a link back
    to a parent cannot loop. Links that lead out of ``folder`` or nowhere are not followed; they are
    added to ``skipped_links`` with the reason. Only regular files are yielded (a FIFO would block).
    """
    if not recursive:
        yield from sorted(p for p in folder.iterdir() if p.is_file())
        return
    root = folder.resolve()
    visited = {root}
    pending = [folder]
    while pending:
        current = pending.pop()
        try:
            entries = sorted(os.scandir(current), key=lambda e: e.name)
        except OSError as exc:
            skipped_links.append((current, f"cannot be listed ({exc.strerror or exc})"))
            continue
        folders = []
        for entry in entries:
            path = Path(entry.path)
            if entry.is_symlink():
                real = Path(os.path.realpath(path))
                if not real.exists():
                    skipped_links.append((path, f"leads nowhere (broken or a loop, to {os.readlink(path)})"))
                    continue
                if not real.is_relative_to(root):
                    skipped_links.append((path, f"leads out of {folder} (to {real})"))
                    continue
            if entry.is_dir():  # follows links, which now stay inside the export
                real = path.resolve()
                if real not in visited:
                    visited.add(real)
                    folders.append(path)
            elif entry.is_file():
                yield path
        pending.extend(reversed(folders))


def list_dicom_series(folder: str | Path, recursive: bool = False) -> DicomSeriesList:
    """Group the DICOM files of ``folder`` (and its subfolders when ``recursive``) into series.

    Files are recognised by content, not extension (scanner exports often have none); DICOMDIR indexes
    and repeated copies of one instance are skipped. A recursive listing follows symbolic links that stay
    inside ``folder`` and lists the others in ``links`` (:func:`_walk`). Series are returned in order of
    study, series number and UID so listings are stable.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise MedsynthError("is not a folder; pass the folder that holds the DICOM files", folder)
    groups: dict[str, list[_FileHeader]] = {}
    seen_instances: set[str] = set()
    unreadable: list[tuple[Path, str]] = []
    links: list[tuple[Path, str]] = []
    for path in _walk(folder, recursive, links):
        try:
            header = _read_header(path)
        except Exception as exc:  # pydicom raises many exception types on malformed files; report them all
            reason = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else "no details"
            unreadable.append((path, f"{type(exc).__name__}: {reason}"))
            continue
        if header is None:
            continue
        instance_uid = str(header.dataset.get("SOPInstanceUID", path))
        if instance_uid in seen_instances:
            continue
        seen_instances.add(instance_uid)
        groups.setdefault(str(header.dataset.SeriesInstanceUID), []).append(header)
    series = []
    for uid, headers in groups.items():
        if len(headers) == 1 and int(headers[0].dataset.get("NumberOfFrames") or 1) > 1:
            series += _summarise_multiframe(uid, headers[0])
        else:
            series.append(_summarise(uid, headers))
    series.sort(
        key=lambda s: (
            s.study_uid, s.series_number if s.series_number is not None else -1, s.series_uid, s.stack
        )
    )  # fmt: skip
    return DicomSeriesList(series, unreadable, links)


def _summarise(series_uid: str, headers: list[_FileHeader]) -> DicomSeriesInfo:
    """Sort a series' files along the slice normal and collect its identifying tags."""
    first = headers[0]
    normal = None if first.orientation is None else np.cross(first.orientation[:3], first.orientation[3:])
    if normal is not None and all(h.position is not None for h in headers):
        keyed = sorted(headers, key=lambda h: (float(h.position @ normal), h.instance or 0, h.path.name))
        positions = tuple(float(h.position @ normal) for h in keyed)
    else:
        keyed = sorted(headers, key=lambda h: (h.instance if h.instance is not None else 0, h.path.name))
        positions = ()
    ds = keyed[0].dataset
    modality = str(ds.get("Modality", "")).upper()
    frames = int(ds.get("NumberOfFrames") or 1)
    is_image = "Rows" in ds and "Columns" in ds and modality not in NON_IMAGE_MODALITIES
    file_meta = ds.get("file_meta", Dataset())
    return DicomSeriesInfo(
        series_uid=series_uid,
        study_uid=str(ds.get("StudyInstanceUID", "")),
        series_description=str(ds.get("SeriesDescription", "")),
        series_number=int(ds.SeriesNumber) if ds.get("SeriesNumber") not in (None, "") else None,
        modality=modality,
        sop_class_uid=str(ds.get("SOPClassUID", "")),
        is_image=is_image,
        files=tuple(h.path for h in keyed),
        slice_positions=positions,
        geometry_problem=_geometry_problem(keyed, positions, frames) if is_image else None,
        image_type=_strings(ds.get("ImageType")),
        protocol_name=str(ds.get("ProtocolName", "")),
        sequence_name=str(ds.get("SequenceName", "")),
        scanning_sequence=_strings(ds.get("ScanningSequence")),
        sequence_variant=_strings(ds.get("SequenceVariant")),
        echo_time=_optional_float(ds.get("EchoTime")),
        repetition_time=_optional_float(ds.get("RepetitionTime")),
        inversion_time=_optional_float(ds.get("InversionTime")),
        contrast_bolus_agent=str(ds.get("ContrastBolusAgent", "")),
        patient_id=str(ds.get("PatientID", "")),
        study_date=str(ds.get("StudyDate", "")),
        transfer_syntax_uid=str(file_meta.get("TransferSyntaxUID", "")),
        number_of_frames=frames,
    )


def _geometry_problem(headers: list[_FileHeader], positions: tuple[float, ...], frames: int) -> str | None:
    """Why these single-frame slices do not stack into one regular grid, or ``None`` when they do."""
    if len(headers) == 1:
        return None
    if frames > 1:
        return (
            f"{len(headers)} multi-frame files in one series; medsynth reads one multi-frame file per series"
        )
    if not positions:
        return "slices lack ImagePositionPatient/ImageOrientationPatient, so they cannot be stacked"
    return _grid_problem([h.orientation for h in headers], positions, "slices")


def _grid_problem(
    orientations: Sequence[np.ndarray | None], positions: Sequence[float], what: str
) -> str | None:
    """Why slices (or frames) at ``positions`` along the normal do not form one regular grid, or None.

    The one rule for classic series and multi-frame stacks alike.
    """
    reference = orientations[0]
    if reference is None or any(o is None or not np.allclose(o, reference, atol=1e-4) for o in orientations):
        return f"{what} have different orientations (a localizer or a multi-plane series)"
    if len(positions) < 2:
        return None
    gaps = np.diff(positions)
    if np.any(gaps < 1e-3):
        repeats = int(np.sum(gaps < 1e-3))
        return f"{repeats} {what} repeat a position (several echoes or time points in one series)"
    median = float(np.median(gaps))
    if np.max(np.abs(gaps - median)) > 0.01 * median + 1e-3:
        return f"uneven slice spacing ({gaps.min():.4g} to {gaps.max():.4g} mm; missing slices?)"
    return None


def _strings(value: Any) -> tuple[str, ...]:
    if value is None or value == "":
        return ()
    if isinstance(value, str):
        return (value,)
    return tuple(str(v) for v in value)


def _first_float(*values: Any) -> float | None:
    return next((float(v) for v in values if v is not None and v != ""), None)


def _optional_float(value: Any) -> float | None:
    return None if value is None or value == "" else float(value)


# --- multi-frame (enhanced and legacy-converted enhanced) objects --------------------------------------

#: Dimension index pointers that number frames *within* a stack; the other dimensions (echo, time, ...)
#: split a file into several stacks.
_IN_STACK_POINTERS = frozenset({0x00200032, 0x00209057, 0x00209056})


@dataclass(frozen=True)
class FrameGeometry:
    """Where one frame of a multi-frame file lies and how its stored values map to real ones.

    Per-frame functional groups win over shared ones, which win over top-level attributes.
    """

    index: int
    position: np.ndarray | None
    orientation: np.ndarray | None
    pixel_spacing: tuple[float, float] | None
    slope: float
    intercept: float
    stack_id: str
    dimension_values: tuple[int, ...]


def _group_item(ds: Dataset, per_frame: Dataset | None, sequence: str) -> Dataset | None:
    for groups in (per_frame, _first(ds.get("SharedFunctionalGroupsSequence"))):
        item = _first(groups.get(sequence)) if groups is not None else None
        if item is not None:
            return item
    return None


def _first(sequence: Any) -> Dataset | None:
    return sequence[0] if sequence else None


def frame_geometry(ds: Dataset) -> list[FrameGeometry]:
    """The geometry of every frame of a multi-frame dataset, in file order."""
    count = int(ds.get("NumberOfFrames") or 1)
    per_frame = ds.get("PerFrameFunctionalGroupsSequence") or []
    frames = []
    for index in range(count):
        groups = per_frame[index] if index < len(per_frame) else None
        position = _group_item(ds, groups, "PlanePositionSequence")
        orientation = _group_item(ds, groups, "PlaneOrientationSequence")
        measures = _group_item(ds, groups, "PixelMeasuresSequence")
        rescale = _group_item(ds, groups, "PixelValueTransformationSequence") or ds
        content = _group_item(ds, groups, "FrameContentSequence") or Dataset()
        spacing = _floats((measures or ds).get("PixelSpacing"), 2)
        slope = rescale.get("RescaleSlope")
        intercept = rescale.get("RescaleIntercept")
        values = content.get("DimensionIndexValues")
        values = () if values is None else (values,) if isinstance(values, int) else tuple(values)
        frames.append(
            FrameGeometry(
                index=index,
                position=_floats((position or Dataset()).get("ImagePositionPatient"), 3),
                orientation=_floats((orientation or Dataset()).get("ImageOrientationPatient"), 6),
                pixel_spacing=None if spacing is None else (float(spacing[0]), float(spacing[1])),
                slope=1.0 if slope in (None, "") else float(slope),
                intercept=0.0 if intercept in (None, "") else float(intercept),
                stack_id=str(content.get("StackID", "")),
                dimension_values=tuple(int(v) for v in values),
            )
        )
    return frames


def _stack_keys(ds: Dataset, frames: list[FrameGeometry]) -> tuple[list[tuple[Any, ...]], str]:
    """A stack key per frame and what tells the stacks apart (stack ID, orientation or dimension)."""
    if len({f.stack_id for f in frames}) > 1:
        return [(f.stack_id,) for f in frames], "StackID"
    orientations = [None if f.orientation is None else tuple(np.round(f.orientation, 3)) for f in frames]
    if len(set(orientations)) > 1:
        return [(o,) for o in orientations], "orientation"
    pointers = [int(item.get("DimensionIndexPointer", 0)) for item in ds.get("DimensionIndexSequence") or []]
    keep = [n for n, pointer in enumerate(pointers) if pointer not in _IN_STACK_POINTERS]
    if keep and all(len(f.dimension_values) == len(pointers) for f in frames):
        keys = [tuple(f.dimension_values[n] for n in keep) for f in frames]
        if len(set(keys)) > 1:
            return keys, "DimensionIndexValues"
    return [() for _ in frames], ""


def _summarise_multiframe(series_uid: str, header: _FileHeader) -> list[DicomSeriesInfo]:
    """One entry per stack of a multi-frame file, frames sorted along the slice normal.

    A file that holds several stacks (orientations, echoes, time points) lists each as its own entry
    (``stack`` = ``1``, ``2``, ...), to be picked like a series; nothing is chosen for the user.
    """
    base = _summarise(series_uid, [header])
    ds = header.dataset
    if not base.is_image:
        return [base]
    # Enhanced objects keep timing in functional groups, legacy-converted ones in "unassigned" attributes.
    shared = _first(ds.get("SharedFunctionalGroupsSequence")) or Dataset()
    converted = _first(shared.get("UnassignedSharedConvertedAttributesSequence")) or Dataset()
    timing = _first(shared.get("MRTimingAndRelatedParametersSequence")) or Dataset()
    echo = _first(shared.get("MREchoSequence")) or Dataset()
    base = replace(
        base,
        echo_time=_first_float(base.echo_time, converted.get("EchoTime"), echo.get("EffectiveEchoTime")),
        repetition_time=_first_float(
            base.repetition_time, converted.get("RepetitionTime"), timing.get("RepetitionTime")
        ),
        inversion_time=_first_float(base.inversion_time, converted.get("InversionTime")),
        protocol_name=base.protocol_name or str(converted.get("ProtocolName", "")),
        sequence_name=base.sequence_name or str(converted.get("SequenceName", "")),
    )
    frames = frame_geometry(ds)
    if any(f.position is None or f.orientation is None for f in frames):
        kind = pydicom.uid.UID(base.sop_class_uid).name.removesuffix(" Storage") or "DICOM"
        problem = (
            f"multi-frame {kind} object ({base.number_of_frames} frames) without per-frame position and "
            "orientation (no Plane Position/Orientation functional groups), so the frames cannot be stacked"
        )
        return [replace(base, frames=tuple(f.index for f in frames), geometry_problem=problem)]
    keys, split_by = _stack_keys(ds, frames)
    stacks: dict[tuple[Any, ...], list[FrameGeometry]] = {}
    for key, frame in zip(keys, frames, strict=True):
        stacks.setdefault(key, []).append(frame)
    infos = []
    for number, members in enumerate(stacks.values(), start=1):
        normal = np.cross(members[0].orientation[:3], members[0].orientation[3:])
        members = sorted(members, key=lambda f: (float(f.position @ normal), f.index))
        positions = tuple(float(f.position @ normal) for f in members)
        problem = _grid_problem([f.orientation for f in members], positions, "frames")
        spacings = {f.pixel_spacing for f in members}
        if problem is None and (None in spacings or len(spacings) > 1):
            problem = "frames lack PixelSpacing or have different ones, so they cannot be stacked"
        if problem is None and len(members) < 2:
            problem = "a single frame, not a 3D volume"
        infos.append(
            replace(
                base,
                frames=tuple(f.index for f in members),
                slice_positions=positions,
                geometry_problem=problem,
                stack=f"{number}" if len(stacks) > 1 else "",
                series_description=(
                    f"{base.series_description} [stack {number} of {len(stacks)} by {split_by}]"
                    if len(stacks) > 1
                    else base.series_description
                ),
            )
        )
    return infos


def read_multiframe(info: DicomSeriesInfo) -> tuple[np.ndarray, tuple[float, ...], np.ndarray, np.ndarray]:
    """Real-valued voxels ``[i, j, k]`` of one multi-frame stack and its ITK-style LPS geometry.

    Returns ``(array, spacing, origin, direction)`` with ``direction`` row-major 3x3 (columns: the
    row, column and normal directions), the convention of SimpleITK's series reader, so the caller
    builds the affine with the same function as for classic series. Frames are sorted along the normal
    and rescaled with their own slope and intercept.
    """
    ds = pydicom.dcmread(info.files[0])
    frames = frame_geometry(ds)
    chosen = [frames[n] for n in info.frames]
    pixels = ds.pixel_array
    if pixels.ndim == 2:
        pixels = pixels[None]
    stored = pixels[list(info.frames)].astype(np.float64)  # (k, rows, columns)
    slopes = np.array([f.slope for f in chosen])[:, None, None]
    intercepts = np.array([f.intercept for f in chosen])[:, None, None]
    array = (stored * slopes + intercepts).transpose(2, 1, 0)
    row, column = chosen[0].orientation[:3], chosen[0].orientation[3:]
    normal = np.cross(row, column)
    positions = info.slice_positions
    between_rows, between_columns = chosen[0].pixel_spacing
    spacing = (between_columns, between_rows, (positions[-1] - positions[0]) / (len(positions) - 1))
    direction = np.column_stack([row, column, normal / np.linalg.norm(normal)])
    return array, spacing, chosen[0].position, direction.flatten()


# --- trusting stored pixels ----------------------------------------------------------------------------

#: Elements larger than this stay on disk when a header is read to check its pixels (only their size is kept).
_DEFER_BYTES = 1024
_PIXEL_DATA = 0x7FE00010
_UNDEFINED_LENGTH = 0xFFFFFFFF


def read_pixel_header(path: Path) -> Dataset:
    """Every attribute of one file, with its pixel data left on disk (its length and offset are kept)."""
    with warnings.catch_warnings():  # odd values in exports are common and not the user's to fix
        warnings.simplefilter("ignore")
        return pydicom.dcmread(path, defer_size=_DEFER_BYTES, force=True)


def pixel_data_problem(ds: Dataset, path: Path) -> str | None:
    """Why one file holds fewer pixel bytes than its header declares, or ``None``.

    SimpleITK (GDCM) reads a slice whose PixelData element holds half of its ``Rows x Columns x frames``
    values without complaint and makes up the rest, so the sizes are compared here before any pixel is
    decoded: the element's own length, and how much of it the file really holds. Encapsulated
    (compressed) pixel data declares no size; its decoder finds damage.
    """
    element = ds.get_item(_PIXEL_DATA, keep_deferred=True)
    if element is None:
        if "FloatPixelData" in ds or "DoubleFloatPixelData" in ds:
            return None
        return "holds no pixel data (the PixelData element is missing)"
    syntax = ds.get("file_meta", Dataset()).get("TransferSyntaxUID")
    if syntax is not None and pydicom.uid.UID(syntax).is_compressed:
        return None
    length = getattr(element, "length", None)
    if length is None:  # already a decoded DataElement
        length = len(element.value or b"")
    if length == _UNDEFINED_LENGTH:
        return None
    try:
        rows, columns = int(ds.Rows), int(ds.Columns)
        bits = int(ds.BitsAllocated)
        samples = int(ds.get("SamplesPerPixel") or 1)
        frames = int(ds.get("NumberOfFrames") or 1)
    except (AttributeError, TypeError, ValueError) as exc:
        return f"has no usable pixel description (Rows, Columns, BitsAllocated: {exc})"
    expected = (rows * columns * samples * frames * bits + 7) // 8
    if str(ds.get("PhotometricInterpretation", "")).strip() == "YBR_FULL_422":
        expected = expected // 3 * 2  # two samples per pixel on disk, not three
    have, short_file = length, False
    value_tell = getattr(element, "value_tell", None)
    if value_tell is not None:
        on_disk = max(0, os.path.getsize(path) - int(value_tell))
        have, short_file = min(length, on_disk), on_disk < length
    if have >= expected:
        return None
    shape = f"{rows}x{columns}" + (f"x{frames} frames" if frames > 1 else "") + f", {bits}-bit"
    why = "the file is truncated" if short_file else "the pixel data was cut short"
    return f"pixel data holds {have} of the {expected} bytes its header declares ({shape}; {why})"


def rescale_problem(slope: Any, intercept: Any) -> str | None:
    """Why a RescaleSlope / RescaleIntercept pair cannot map stored values to real ones, or ``None``.

    A slope of 0 maps every voxel to the intercept (readers that then take slope 1 instead read a
    different image without a word); a missing slope means 1, as the standard says.
    """
    for name, value in (("RescaleSlope", slope), ("RescaleIntercept", intercept)):
        if value is None or value == "":
            continue
        try:
            number = float(value)
        except (TypeError, ValueError):
            return f"{name} {value!r} is not a number"
        if not np.isfinite(number):
            return f"{name} is {number}"
        if name == "RescaleSlope" and number == 0:
            return "RescaleSlope is 0, which maps every stored value to the intercept"
    return None


def slice_problem(path: Path) -> str | None:
    """Why the pixels of one single-frame file cannot be trusted (short pixel data, slope 0), or ``None``."""
    try:
        ds = read_pixel_header(path)
    except Exception as exc:  # pydicom raises many exception types on damaged files
        return f"its header cannot be parsed ({type(exc).__name__}: {' '.join(str(exc).split())[:200]})"
    return pixel_data_problem(ds, path) or rescale_problem(ds.get("RescaleSlope"), ds.get("RescaleIntercept"))


def multiframe_problem(path: Path, frames: Sequence[int]) -> str | None:
    """Why the pixels of the chosen ``frames`` of a multi-frame file cannot be trusted, or ``None``.

    The pixel data is checked for the whole file, the rescale of each chosen frame as its functional
    groups give it (per-frame over shared over top level).
    """
    try:
        ds = read_pixel_header(path)
        problem = pixel_data_problem(ds, path)
        geometry = frame_geometry(ds) if problem is None else []
    except Exception as exc:  # pydicom raises many exception types on damaged files
        return f"its header cannot be parsed ({type(exc).__name__}: {' '.join(str(exc).split())[:200]})"
    for index in frames if problem is None else ():
        problem = rescale_problem(geometry[index].slope, geometry[index].intercept)
        if problem is not None:
            return f"frame {index + 1}: {problem}"
    return problem


# --- writing -------------------------------------------------------------------------------------------


def _quantise(array: np.ndarray) -> tuple[np.ndarray, str, str]:
    """16-bit stored values and the (slope, intercept) strings that map them back to ``array``.

    Integer-valued data that fit in int16 are stored exactly (slope 1, intercept 0). Anything else uses the
    full uint16 range between the minimum and maximum, so the error is at most half a step,
    ``(max - min) / 65535 / 2``. Slope and intercept are rounded to DICOM's 16-character decimal strings
    *before* quantising, so the file decodes with exactly the values used here.
    """
    low, high = float(array.min()), float(array.max())
    if np.array_equal(array, np.round(array)) and -32768 <= low <= high <= 32767:
        return array.astype("<i2"), "1", "0"
    intercept = format_number_as_ds(low)
    slope = format_number_as_ds((high - float(intercept)) / _UINT16_MAX * (1 + 1e-9) if high > low else 1.0)
    stored = np.round((array.astype(np.float64) - float(intercept)) / float(slope))
    return np.clip(stored, 0, _UINT16_MAX).astype("<u2"), slope, intercept


def _ds(values: Sequence[float]) -> list[str]:
    return [format_number_as_ds(float(v)) for v in values]


@contextlib.contextmanager
def _atomic_folder(folder: Path) -> Iterator[Path]:
    """Yield a hidden sibling folder that replaces ``folder`` (absent or empty) once the block succeeds.

    A crash or error mid-series leaves no partial series behind for a later scan to pick up; a killed
    process leaves its hidden folder, named by :func:`~medsynth.io.atomic.partial_name` so that
    :func:`~medsynth.io.atomic.remove_stale_partials` of the parent folder removes it.
    """
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise MedsynthError(
            "already exists and is not empty; remove it or choose another output folder", folder
        )
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        temp = folder.parent / partial_name(folder.name, keep_suffixes=False)
        temp.mkdir()
    except OSError as exc:
        raise MedsynthError(f"cannot write here ({exc.strerror})", folder.parent) from exc
    try:
        yield temp
        if folder.exists():
            folder.rmdir()
        os.rename(temp, folder)
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise


def write_dicom_series(
    volume: Volume,
    folder: str | Path,
    *,
    series_description: str,
    series_number: int = 1001,
    modality: str = "MR",
    reference_datasets: Sequence[Dataset] | None = None,
    derived: bool = False,
    derivation_description: str = "synthesised by medsynth",
    study_uid: str | None = None,
    frame_of_reference_uid: str | None = None,
    patient_id: str = "ANONYMOUS",
    patient_name: str = "Anonymous",
) -> list[Path]:
    """Write ``volume`` as a new DICOM series, one slice per file along its ``k`` axis.

    ``folder`` must not exist or be empty; the series appears there complete or not at all. Each slice
    gets its own ImagePositionPatient, and the series shares ImageOrientationPatient, PixelSpacing and
    SliceThickness, all converted from the volume's RAS affine to DICOM's LPS, so reading the folder back
    gives the same grid. Values are stored as 16-bit integers with RescaleSlope/RescaleIntercept (see
    :func:`_quantise`).

    With ``reference_datasets`` (the source series' headers, e.g. from ``pydicom.dcmread``), the patient,
    study and frame-of-reference attributes are copied so the new series files next to its source in
    PACS; ``study_uid``/``frame_of_reference_uid`` override them, and ``patient_id``/``patient_name`` apply
    only without a reference. ``derived=True`` marks the images ``DERIVED\\SECONDARY`` with
    ``derivation_description``, as a synthetic image should be.

    DICOM readers order slices along ``row x column`` directions, so a left-handed grid (e.g. a
    radiological-convention NIfTI) reads back with its ``k`` axis reversed: the same voxels in the same
    places, but a different affine. Right-handed grids read back with the same affine.

    Example:
        >>> files = write_dicom_series(t2_synthetic, "out/T2_syn", series_description="T2w synthetic",
        ...                            reference_datasets=t1_headers, derived=True)  # doctest: +SKIP
    """
    modality = modality.upper()
    if modality not in _STORAGE_CLASSES:
        raise ValueError(f"modality must be one of {', '.join(_STORAGE_CLASSES)}, got {modality!r}")
    if not np.all(np.isfinite(volume.array)):
        raise ValueError("the volume has NaN or Inf voxels; DICOM integer pixels cannot store them")
    folder = Path(folder)
    template = _series_template(volume, modality, series_description, series_number, derived)
    if reference_datasets:
        for keyword in _PATIENT_STUDY_TAGS:
            if keyword in reference_datasets[0]:
                setattr(template, keyword, reference_datasets[0].data_element(keyword).value)
    else:
        template.PatientName = patient_name
        template.PatientID = patient_id
    if study_uid is not None:
        template.StudyInstanceUID = study_uid
    if frame_of_reference_uid is not None:
        template.FrameOfReferenceUID = frame_of_reference_uid
    if derived:
        template.DerivationDescription = derivation_description
    stored, slope, intercept = _quantise(volume.array)
    template.PixelRepresentation = 1 if stored.dtype.kind == "i" else 0
    template.RescaleSlope, template.RescaleIntercept = slope, intercept
    if modality == "CT":
        template.RescaleType = "HU"

    lps = LPS_TO_RAS @ volume.affine
    normal = np.cross(*_axis_directions(lps))
    paths = []
    with _atomic_folder(folder) as temp:
        for k in range(volume.shape[2]):
            position = lps[:3, :3] @ np.array([0.0, 0.0, float(k)]) + lps[:3, 3]
            ds = copy.deepcopy(template)
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
            ds.InstanceNumber = k + 1
            ds.ImagePositionPatient = _ds(position)
            ds.SliceLocation = format_number_as_ds(float(position @ normal))
            ds.PixelData = np.ascontiguousarray(stored[:, :, k].T).tobytes()
            name = f"IM{k + 1:05d}.dcm"
            ds.save_as(temp / name, enforce_file_format=True)
            with open(temp / name, "rb") as stream:  # on disk before the folder is renamed into place
                os.fsync(stream.fileno())
            paths.append(folder / name)
    return paths


def _axis_directions(lps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Unit LPS directions of DICOM rows (voxel axis i) and columns (voxel axis j) from an LPS affine."""
    return (
        lps[:3, 0] / np.linalg.norm(lps[:3, 0]),
        lps[:3, 1] / np.linalg.norm(lps[:3, 1]),
    )


def _series_template(volume: Volume, modality: str, description: str, number: int, derived: bool) -> Dataset:
    """Attributes shared by every slice of the new series (everything but position, UID and pixels)."""
    now = datetime.datetime.now()
    date, time = now.strftime("%Y%m%d"), now.strftime("%H%M%S")
    lps = LPS_TO_RAS @ volume.affine
    row, column = _axis_directions(lps)
    spacing_i, spacing_j, spacing_k = volume.spacing

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = _STORAGE_CLASSES[modality]
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.SOPClassUID = _STORAGE_CLASSES[modality]
    ds.ImageType = ["DERIVED", "SECONDARY"] if derived else ["ORIGINAL", "PRIMARY"]
    ds.Modality = modality
    ds.Manufacturer = "medsynth"
    ds.SeriesInstanceUID = generate_uid()
    ds.SeriesNumber = number
    ds.SeriesDescription = description
    ds.SeriesDate = ds.ContentDate = ds.InstanceCreationDate = date
    ds.SeriesTime = ds.ContentTime = ds.InstanceCreationTime = time
    # Type 1/2 attributes of the patient and study modules, replaced by the reference's when there is one.
    ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "", "", "", ""
    ds.StudyInstanceUID = generate_uid()
    ds.StudyDate, ds.StudyTime = date, time
    ds.StudyID = ds.AccessionNumber = ds.ReferringPhysicianName = ""
    ds.FrameOfReferenceUID = generate_uid()
    ds.PositionReferenceIndicator = ""
    if modality == "MR":
        # Type 1 in the MR Image module; a synthetic image was acquired with no sequence ("research mode").
        ds.ScanningSequence, ds.SequenceVariant = "RM", "NONE"
        ds.ScanOptions = ds.MRAcquisitionType = ""
        ds.EchoTime = ds.RepetitionTime = ds.EchoTrainLength = None
    else:
        ds.KVP = None
    ds.ImageOrientationPatient = _ds(np.concatenate([row, column]))
    ds.PixelSpacing = _ds([spacing_j, spacing_i])  # DICOM: (between rows, between columns)
    ds.SliceThickness = ds.SpacingBetweenSlices = format_number_as_ds(spacing_k)
    ds.Rows, ds.Columns = volume.shape[1], volume.shape[0]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    low, high = np.percentile(volume.array, [1, 99])
    ds.WindowCenter = format_number_as_ds((low + high) / 2)
    ds.WindowWidth = format_number_as_ds(max(high - low, 1e-3))
    return ds
