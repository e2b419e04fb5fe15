"""Discovery: walk a scanner export and describe its studies and series from headers alone.

The file walk and header parsing are :func:`medsynth.io.dicom.list_dicom_series`'s job; this module
regroups its series by StudyInstanceUID, gives each series a modality (:mod:`.classify`) and says up
front why a series cannot be used (non-image object, single slice, multi-frame object without
per-frame geometry, irregular slices or frames; enhanced and legacy-converted multi-frame files are read
frame by frame, each stack as its own series), so a dry run over thousands of files explains every study without touching a pixel.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import pydicom.uid

from ..io.dicom import DicomSeriesInfo, list_dicom_series
from .classify import SeriesMapping, classify_series

log = logging.getLogger("medsynth")

#: Multi-frame classes whose frames are colour: read per frame, but not a contrast medsynth translates.
_COLOUR_MULTIFRAME = {"1.2.840.10008.5.1.4.1.1.4.3": "Enhanced MR Color"}


@dataclass(frozen=True)
class SeriesRecord:
    """One series as conversion sees it: identifying tags, files, modality and usability.

    ``modality`` is the canonical contrast (``None`` when the series is not an input) and ``reason``
    why; ``unsupported`` says why its pixels cannot become a 3D volume (``None`` when they can).
    """

    series_uid: str
    study_uid: str = ""
    patient_id: str = ""  # protected health information: hashed for names, never logged
    description: str = ""
    series_number: int | None = None
    protocol: str = ""
    sequence_name: str = ""
    scanning_sequence: tuple[str, ...] = ()
    sequence_variant: tuple[str, ...] = ()
    echo_time: float | None = None
    repetition_time: float | None = None
    inversion_time: float | None = None
    contrast_agent: str = ""
    dicom_modality: str = ""
    image_type: tuple[str, ...] = ()
    sop_class_uid: str = ""
    transfer_syntax: str = ""
    is_image: bool = True
    files: tuple[Path, ...] = ()
    unsupported: str | None = None
    modality: str | None = None
    reason: str = ""

    @classmethod
    def from_info(cls, info: DicomSeriesInfo) -> SeriesRecord:
        """Adapter from the I/O layer's header summary.

        ``series_uid`` is what the reader takes: the UID, or ``UID#stack`` for one stack of a multi-frame
        file that holds several.
        """
        return cls(
            series_uid=info.selector,
            study_uid=info.study_uid,
            patient_id=info.patient_id,
            description=info.series_description,
            series_number=info.series_number,
            protocol=info.protocol_name,
            sequence_name=info.sequence_name,
            scanning_sequence=info.scanning_sequence,
            sequence_variant=info.sequence_variant,
            echo_time=info.echo_time,
            repetition_time=info.repetition_time,
            inversion_time=info.inversion_time,
            contrast_agent=info.contrast_bolus_agent.strip(),
            dicom_modality=info.modality,
            image_type=tuple(t.upper() for t in info.image_type),
            sop_class_uid=info.sop_class_uid,
            transfer_syntax=info.transfer_syntax_uid,
            is_image=info.is_image,
            files=info.files,
            unsupported=_unsupported(info),
        )


@dataclass(frozen=True)
class Study:
    """The series of one StudyInstanceUID (a patient may have several studies)."""

    study_uid: str
    patient_id: str
    series: tuple[SeriesRecord, ...]


@dataclass
class Export:
    """Everything discovery found: studies sorted by UID, and notes about what it set aside."""

    studies: list[Study] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def _unsupported(info: DicomSeriesInfo) -> str | None:
    if not info.is_image:
        kind = _sop_class_name(info.sop_class_uid) or info.modality or "unknown class"
        if kind.endswith("Image Storage"):
            return f"no pixel matrix (Rows/Columns missing) in {kind} objects"
        return f"non-image object ({kind})"
    if info.sop_class_uid in _COLOUR_MULTIFRAME:
        return f"multi-frame {_COLOUR_MULTIFRAME[info.sop_class_uid]} object (colour frames)"
    if info.geometry_problem:
        return info.geometry_problem
    if info.number_of_frames > 1 and not info.is_multiframe:
        return f"multi-frame object ({info.number_of_frames} frames of {_sop_class_name(info.sop_class_uid)})"
    if info.n_slices < 2:
        return "a single slice, not a 3D volume"
    return None


def _sop_class_name(uid: str) -> str:
    return pydicom.uid.UID(uid).name if uid else ""


def discover(root: str | Path, mapping: SeriesMapping | None = None) -> Export:
    """Find every study and series under ``root`` (any depth, any file names, DICOMDIR or not).

    Symbolic links are followed while they stay inside ``root`` (each real folder is walked once, so
    links cannot loop); links that lead out of it, or nowhere, are not followed: a warning says how
    many, and a note names each.

    Example::

        export = discover("/data/export")
        for study in export.studies:
            print(study.study_uid, [s.modality for s in study.series])
    """
    listing = list_dicom_series(root, recursive=True)
    by_study: dict[str, list[SeriesRecord]] = {}
    for info in listing:
        record = SeriesRecord.from_info(info)
        decided = classify_series(record, mapping)
        record = replace(record, modality=decided.modality, reason=decided.reason)
        by_study.setdefault(record.study_uid, []).append(record)
    export = Export()
    for study_uid in sorted(by_study):
        series = tuple(by_study[study_uid])
        export.studies.append(Study(study_uid, series[0].patient_id, series))
    export.notes = _notes(export, listing.unreadable, Path(root), listing.links)
    if listing.links:
        link, reason = listing.links[0]
        log.warning(
            "%d symbolic link(s) under %s not followed (first: %s %s); the export is read only inside "
            "its own folder: copy the linked files in, or convert the linked folder as its own export",
            len(listing.links), root, link, reason,
        )  # fmt: skip
    return export


def _notes(
    export: Export,
    unreadable: list[tuple[Path, str]],
    root: Path,
    links: Sequence[tuple[Path, str]] = (),
) -> list[str]:
    """Say what was set aside: non-image objects by class, unusable series by UID, unreadable files,
    symbolic links not followed (broken, or leading out of the export).

    Notes name series by UID and files by their path inside the export; no tag text is repeated.
    """
    notes: list[str] = []
    skipped = Counter(
        s.unsupported for study in export.studies for s in study.series if s.unsupported and not s.is_image
    )
    notes += [f"skipped {count} {kind} series" for kind, count in sorted(skipped.items())]
    for study in export.studies:
        for series in study.series:
            if series.is_image and series.unsupported:
                notes.append(f"series {series.series_uid} not usable: {series.unsupported}")
    for path, reason in unreadable:
        where = path.relative_to(root) if path.is_relative_to(root) else path
        notes.append(f"unreadable file {where}: {reason.splitlines()[0][:200]}")
    for path, reason in links:
        where = path.relative_to(root) if path.is_relative_to(root) else path
        notes.append(f"link {where} not followed: {reason}")
    return notes
