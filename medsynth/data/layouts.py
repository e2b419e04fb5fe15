"""Find the subjects of a dataset on disk, in the layout it was downloaded or exported in.

Users bring data as it comes, so medsynth recognises the common shapes instead of asking for a
conversion first (``LAYOUTS`` lists them with an example file each):

* ``bids``: ``sub-01/[ses-01/]anat/sub-01[_ses-01]_T1w.nii.gz`` (``T2w``, ``PDw``, ``FLAIR``; a ``ce-``
  entity on a ``T1w`` makes it ``t1c``);
* ``ixi``: ``IXI002-Guys-0828-T1.nii.gz`` / ``-T2`` / ``-PD`` side by side (MRA and DTI are skipped);
* ``brats``: ``BraTS-GLI-00000-000/BraTS-GLI-00000-000-t1n.nii.gz`` (2023) or
  ``BraTS2021_00000/BraTS2021_00000_t1.nii.gz`` (2021), segmentations skipped;
* ``dicom``: one folder per subject holding one DICOM series per contrast, the contrast decided by the
  rule set ``medsynth convert`` uses (:mod:`medsynth.io.series_modality`);
* ``manifest``: a CSV ``subject,modality,path[,series_uid]`` for anything else.

Scanning only walks folders (and reads DICOM headers); pixels are read later by :func:`load_subject`, so
listing a large cohort is cheap and a corrupt file is reported when it is actually used.
"""

from __future__ import annotations

import csv
import logging
import os
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np

from ..errors import DataError, GeometryError, MedsynthError
from ..io.dicom import list_dicom_series
from ..io.geometry import align_subject, grid_mismatch
from ..io.readers import read_volume
from ..io.series_modality import classify_info, classify_tags
from ..io.volume import Subject, Volume
from ..modalities import MODALITIES, canonical_modality, is_modality

log = logging.getLogger("medsynth")

#: Layout names with an example of what each one looks for (used in error messages).
LAYOUTS: dict[str, str] = {
    "bids": "sub-01/anat/sub-01_T1w.nii.gz",
    "ixi": "IXI002-Guys-0828-T1.nii.gz",
    "brats": "BraTS-GLI-00000-000/BraTS-GLI-00000-000-t1n.nii.gz",
    "dicom": "one folder of DICOM series per subject",
    "manifest": "a CSV with the columns subject,modality,path",
}


@dataclass
class SubjectRecord:
    """Where one subject's images are; nothing is read yet.

    ``paths`` maps canonical modality names to a file, or to a DICOM folder with the series to read in
    ``series_uids``. ``layout`` is the name of the layout it was found in (a key of ``LAYOUTS``).
    """

    id: str
    paths: dict[str, Path]
    series_uids: dict[str, str] = field(default_factory=dict)
    layout: str = field(default="manifest", kw_only=True)

    @property
    def modalities(self) -> tuple[str, ...]:
        """The subject's modalities in canonical order."""
        return tuple(m for m in MODALITIES if m in self.paths)


class _Found(NamedTuple):
    subject: str
    modality: str
    path: Path
    series_uid: str | None = None

    def describe(self) -> str:
        return f"{self.path} (series {self.series_uid})" if self.series_uid else str(self.path)


def scan_dataset(root: str | Path, manifest: str | Path | None = None) -> list[SubjectRecord]:
    """List the subjects under ``root``, sorted by id, auto-detecting the layout.

    ``manifest`` (or ``root`` itself being a ``.csv`` file, or one manifest CSV directly in ``root``) takes
    precedence over file names: it is the user's explicit word. Otherwise exactly one layout must match;
    a folder mixing layouts is refused rather than guessed at.

    Raises:
        DataError: missing/empty/ambiguous root, a bad manifest line, or two images of the same
            modality for one subject (both are named).
    """
    root = Path(root)
    if manifest is not None:
        return _group(_read_manifest(Path(manifest)), "manifest")
    if root.is_file() and root.suffix.lower() == ".csv":
        return _group(_read_manifest(root), "manifest")
    if not root.is_dir():
        what = "is a file, not a dataset folder" if root.exists() else "no such dataset folder"
        raise DataError(f"{what}; pass the folder that holds the subjects (or a manifest .csv)", root)
    layout, found = _detect(root)
    return _group(found, layout)


def load_subject(
    record: SubjectRecord,
    modalities: Sequence[str],
    *,
    reference: str | None = None,
    volume_index: int | None = None,
) -> Subject:
    """Read the requested modalities of one subject and put them on one grid.

    ``reference`` (default: the first requested modality) is the grid the others are aligned to by
    :func:`medsynth.io.geometry.align_subject`: identical grids pass untouched, overlapping but different
    ones are resampled with a warning, disjoint ones raise ``GeometryError``. A CT is never resampled:
    it must be on the reference's grid already (or be the reference, with the others on its grid).

    Raises:
        DataError: the subject lacks a requested modality (the message lists what it has), a file
            cannot be read, a volume is constant (:func:`constant_problem`) or a CT is not in
            Hounsfield units (:func:`ct_problem`).
        GeometryError: a CT and another image of the subject are on different grids
            (:func:`ct_grid_problem`), or images do not overlap.
    """
    wanted = [canonical_modality(m) for m in modalities]
    if not wanted:
        raise MedsynthError(f"no modality requested for subject {record.id}; name at least one, e.g. t1")
    missing = [m for m in wanted if m not in record.paths]
    if missing:
        has = ", ".join(record.modalities) or "no images"
        where = next(iter(record.paths.values())).parent if record.paths else None
        raise DataError(
            f"subject {record.id} has no {', '.join(missing)} image (it has: {has}); "
            "add the file or leave the subject out",
            where,
        )
    reference = canonical_modality(reference) if reference is not None else wanted[0]
    if reference not in wanted:
        raise MedsynthError(
            f"reference modality {reference!r} is not among the requested {', '.join(wanted)}"
        )
    subject = {
        m: read_volume(record.paths[m], series_uid=record.series_uids.get(m), volume_index=volume_index)
        for m in wanted
    }
    for modality, volume in subject.items():
        problem = constant_problem(volume)
        if problem:
            raise DataError(f"{problem}; replace the file or leave subject {record.id} out", volume.source)
        problem = ct_problem(volume) if modality == "ct" else None
        if problem:
            raise DataError(f"{problem} (subject {record.id})", volume.source)
    if "ct" in subject:
        for modality, volume in subject.items():
            problem = ct_grid_problem(modality, volume, reference, subject[reference])
            if problem:
                raise GeometryError(f"{problem} (subject {record.id})", subject["ct"].source)
    return align_subject(subject, reference)


def constant_problem(volume: Volume) -> str | None:
    """Why a volume cannot be a training image (every voxel the same value: empty or blank), or None.

    Such a file (an all-zero export, a failed conversion) normalises to nothing and teaches the network
    nothing; it is refused where subjects are loaded for training and evaluation, never at inference.
    """
    low, high = float(volume.array.min()), float(volume.array.max())
    return f"is constant (every voxel is {low:g}), an empty or blank image" if low == high else None


#: A CT in Hounsfield units holds air (-1000 HU) around the body. When even its 0.5th percentile is above
#: this, the image is an MR or a CT whose stored values were never rescaled (0..4095 without the intercept).
CT_AIR_CEILING_HU = -500.0


def ct_problem(volume: Volume) -> str | None:
    """Why a volume given as a CT is not one in Hounsfield units, or None.

    The rule is air: a head or body CT has voxels near -1000 HU, so its 0.5th percentile is far below
    ``CT_AIR_CEILING_HU``. An MR (never negative) or a CT stored as 0..4095 without its RescaleIntercept
    (air near 24) fails it. Training, evaluation and ``medsynth data check`` refuse such a file, because
    a fixed HU window would squash it into the soft-tissue range and every HU metric would be wrong.
    """
    values = volume.array.ravel()
    values = values[:: max(1, values.size // 4_000_000)]  # a strided sample: the same answer, less memory
    low = float(np.percentile(values, 0.5))
    if low <= CT_AIR_CEILING_HU:
        return None
    return (
        f"is not a CT in Hounsfield units: its 0.5th percentile is {low:.4g}, a CT has air near -1000, so it "
        "looks like an MR or an uncalibrated CT; give the CT, or apply the rescale intercept (usually "
        "-1024) to its stored values"
    )


def ct_grid_problem(modality: str, volume: Volume, reference: str, target: Volume) -> str | None:
    """Why ``volume`` cannot be paired with ``target`` (the ``reference`` modality) when one is a CT.

    A planning CT is registered and resampled once, by the user, with the interpolation and padding
    (-1024 HU) they choose and check; resampling it silently here would blur the skull and shift HU where
    dose is computed. SynthRAD-style data come on one grid already. So a CT on another grid than the MR
    is refused with the fix, where MR pairs on different grids are resampled with a warning.
    """
    if modality == reference or "ct" not in (modality, reference):
        return None
    mismatch = grid_mismatch(volume, target)
    if mismatch is None:
        return None
    mr, mr_volume = (modality, volume) if reference == "ct" else (reference, target)
    return (
        f"the CT is not on the grid of the {mr} image {mr_volume.source} ({mismatch}); medsynth does not "
        f"interpolate a CT: resample or register the CT onto the {mr} grid first (medsynth data register "
        f"DATA_DIR --out REGISTERED --reference {mr} does it, in HU with air outside the CT)"
    )


# --------------------------------------------------------------------------------------------- BIDS

#: BIDS labels are alphanumeric, but users' folders are not: a label is anything but ``_`` (the entity
#: separator), so ``sub-0 2é`` or ``sub-Ünï`` are read as they are named.
_BIDS_FILE = re.compile(r"^(sub-[^_/]+?)(_ses-[^_/]+)?((?:_[A-Za-z]+-[^_/]+)*)_([A-Za-z0-9]+)\.nii(?:\.gz)?$")
_BIDS_SUFFIX: dict[str, str] = {
    "t1": "T1w", "t2": "T2w", "pd": "PDw", "flair": "FLAIR", "t1c": "ce-gd_T1w", "ct": "CT",
}  # fmt: skip


def bids_label(text: str) -> str:
    """A BIDS label (letters and digits only) for a subject id such as ``IXI002-Guys-0828``."""
    label = re.sub(r"[^A-Za-z0-9]", "", text)
    if not label:
        raise MedsynthError(f"subject id {text!r} has no letters or digits to build a BIDS label from")
    return label


def bids_path(root: str | Path, subject: str, modality: str, extension: str = ".nii.gz") -> Path:
    """Where the ``bids`` layout expects ``subject``'s ``modality`` image; the inverse of the scanner.

    >>> bids_path("out", "IXI002-Guys-0828", "T2").as_posix()
    'out/sub-IXI002Guys0828/anat/sub-IXI002Guys0828_T2w.nii.gz'
    """
    label = bids_label(subject.removeprefix("sub-"))
    suffix = _BIDS_SUFFIX[canonical_modality(modality)]
    return Path(root) / f"sub-{label}" / "anat" / f"sub-{label}_{suffix}{extension}"


def _scan_bids(root: Path) -> list[_Found]:
    found = []
    candidates = sorted(root.glob("sub-*/anat/*.nii*")) + sorted(root.glob("sub-*/ses-*/anat/*.nii*"))
    for path in candidates:
        match = _BIDS_FILE.match(path.name)
        if not match:
            log.warning("skipping %s: not named sub-<label>[_ses-<label>]_<suffix>.nii[.gz]", path)
            continue
        subject, session, entities, suffix = match.groups()
        if not is_modality(suffix):
            log.info("skipping %s: %s is not a modality medsynth translates", path, suffix)
            continue
        modality = canonical_modality(suffix)
        if modality == "t1" and "_ce-" in entities:
            modality = "t1c"
        found.append(_Found(subject + (session or ""), modality, path))
    return found


# ---------------------------------------------------------------------------------------------- IXI

_IXI_FILE = re.compile(r"^(IXI\d+-[A-Za-z]+-\d+)-([A-Za-z][A-Za-z0-9]*)(?:-\d+)?\.nii(?:\.gz)?$")
_IXI_MODALITIES = {"T1": "t1", "T2": "t2", "PD": "pd"}


def _scan_ixi(root: Path) -> list[_Found]:
    found, skipped = [], 0
    for path in sorted(root.glob("IXI*.nii*")):
        match = _IXI_FILE.match(path.name)
        if not match:
            continue
        subject, kind = match.groups()
        if kind in _IXI_MODALITIES:
            found.append(_Found(subject, _IXI_MODALITIES[kind], path))
        else:
            skipped += 1
    if found and skipped:
        log.info(
            "IXI: skipped %d MRA/DTI files in %s (angiography and diffusion are not translated)",
            skipped,
            root,
        )
    return found


# -------------------------------------------------------------------------------------------- BraTS

_BRATS_FILE = re.compile(
    r"^(BraTS.+?)[-_](t1n|t1c|t1ce|t1|t2w|t2f|t2|flair|seg)\.nii(?:\.gz)?$", re.IGNORECASE
)


def _scan_brats(root: Path) -> list[_Found]:
    found = []
    for path in sorted(root.glob("BraTS*/*.nii*")):
        match = _BRATS_FILE.match(path.name)
        if match and match.group(2).lower() != "seg":
            found.append(_Found(match.group(1), canonical_modality(match.group(2)), path))
    return found


# -------------------------------------------------------------------------------------------- DICOM


def series_modality(description: str, dicom_modality: str = "MR", contrast_agent: str = "") -> str | None:
    """The contrast of a DICOM series from its description, or None when it is not clear.

    A thin wrapper over the rule set ``medsynth convert`` uses
    (:func:`medsynth.io.series_modality.classify_tags`); the ``dicom`` layout passes all of a series'
    tags (protocol, sequence, TR/TE/TI, ImageType) to that rule set.

    >>> series_modality("t1_mprage_sag_p2"), series_modality("AX T2 FLAIR"), series_modality("T1 +C")
    ('t1', 'flair', 't1c')
    """
    return classify_tags(
        description=description, dicom_modality=dicom_modality, contrast_agent=contrast_agent
    ).modality


def _holds_dicom(folder: Path) -> bool:
    """True when some file below ``folder`` carries the DICOM preamble (or a .dcm name)."""
    for path in folder.rglob("*"):
        if path.suffix.lower() == ".dcm":
            return True
        if path.is_file() and not path.name.endswith((".nii", ".nii.gz", ".csv", ".json", ".txt")):
            try:
                with open(path, "rb") as stream:
                    stream.seek(128)
                    if stream.read(4) == b"DICM":
                        return True
            except OSError:
                continue
    return False


def _scan_dicom(root: Path) -> list[_Found]:
    found = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        if not _holds_dicom(folder):
            continue
        for info in list_dicom_series(folder, recursive=True):
            if not info.is_image:
                continue
            decided = classify_info(info)
            series_folder = Path(os.path.commonpath([Path(f).parent for f in info.files]))
            if decided.modality is None:
                log.info(
                    "skipping DICOM series %r in %s: %s",
                    info.series_description,
                    series_folder,
                    decided.reason,
                )
                continue
            found.append(_Found(folder.name, decided.modality, series_folder, info.selector))
    return found


# ----------------------------------------------------------------------------------------- manifest

_MANIFEST_COLUMNS = ("subject", "modality", "path")


def _is_manifest(path: Path) -> bool:
    try:
        with open(path, encoding="utf-8-sig", newline="") as stream:
            header = next(csv.reader(stream), [])
    except (OSError, UnicodeDecodeError):
        return False
    return tuple(h.strip().lower() for h in header[:3]) == _MANIFEST_COLUMNS


def _read_manifest(path: Path) -> list[_Found]:
    """Rows of ``subject,modality,path[,series_uid]``; relative paths are relative to the CSV's folder."""
    try:
        with open(path, encoding="utf-8-sig", newline="") as stream:
            rows = list(csv.reader(stream))
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read the manifest ({exc}); pass a UTF-8 CSV file", path) from exc
    header = [h.strip().lower() for h in rows[0]] if rows else []
    if not set(_MANIFEST_COLUMNS) <= set(header):
        raise DataError("a manifest's first line must be the header subject,modality,path", path)
    columns = {name: header.index(name) for name in (*_MANIFEST_COLUMNS, "series_uid") if name in header}
    found = []
    for line, row in enumerate(rows[1:], start=2):
        if not any(cell.strip() for cell in row):
            continue
        cells = {name: row[i].strip() if i < len(row) else "" for name, i in columns.items()}
        if not (cells["subject"] and cells["modality"] and cells["path"]):
            raise DataError(f"line {line}: subject, modality and path must all be filled in", path)
        if not is_modality(cells["modality"]):
            raise DataError(
                f"line {line}: unknown modality {cells['modality']!r}; use one of {', '.join(MODALITIES)}",
                path,
            )
        image = Path(cells["path"]).expanduser()
        image = image if image.is_absolute() else Path(os.path.normpath(path.parent / image))
        if not image.exists():
            raise DataError(
                f"line {line}: {image} does not exist (relative paths start at the manifest's folder)", path
            )
        found.append(
            _Found(
                cells["subject"],
                canonical_modality(cells["modality"]),
                image,
                cells.get("series_uid") or None,
            )
        )
    if not found:
        raise DataError("the manifest lists no images; add lines subject,modality,path", path)
    return found


# ---------------------------------------------------------------------------------------- detection

#: Name-based layouts, tried together; DICOM is tried only when none matches (it reads file headers, and
#: a BIDS tree may keep its DICOM originals in ``sourcedata/``).
_NAMED_SCANNERS: dict[str, Callable[[Path], list[_Found]]] = {
    "bids": _scan_bids,
    "ixi": _scan_ixi,
    "brats": _scan_brats,
}


def _detect(root: Path) -> tuple[str, list[_Found]]:
    manifests = [p for p in sorted(root.glob("*.csv")) if _is_manifest(p)]
    if len(manifests) > 1:
        names = ", ".join(p.name for p in manifests)
        raise DataError(f"several manifest CSVs ({names}); pass the one to use with --manifest", root)
    if manifests:
        log.info("using the manifest %s", manifests[0])
        return "manifest", _read_manifest(manifests[0])
    hits = {name: found for name, scan in _NAMED_SCANNERS.items() if (found := scan(root))}
    if len(hits) > 1:
        examples = "; ".join(f"{name}: {found[0].path.relative_to(root)}" for name, found in hits.items())
        raise DataError(
            f"files of several layouts found ({examples}); keep one layout per folder or list the images "
            "in a manifest CSV (subject,modality,path)",
            root,
        )
    if not hits:
        dicom = _scan_dicom(root)
        if dicom:
            return "dicom", dicom
        looked_for = "; ".join(f"{name} ({example})" for name, example in LAYOUTS.items())
        raise DataError(f"no images found; looked for these layouts: {looked_for}", root)
    ((layout, found),) = hits.items()
    return layout, found


def _group(found: Iterable[_Found], layout: str) -> list[SubjectRecord]:
    """One record per subject; a second image of the same modality is an error naming both."""
    by_subject: dict[str, dict[str, _Found]] = {}
    for item in found:
        images = by_subject.setdefault(item.subject, {})
        if item.modality in images:
            raise DataError(
                f"subject {item.subject} has two {item.modality} images: {images[item.modality].describe()} "
                f"and {item.describe()}; keep one, or list the one to use in a manifest CSV"
            )
        images[item.modality] = item
    return [
        SubjectRecord(
            subject,
            {m: images[m].path for m in MODALITIES if m in images},
            {m: item.series_uid for m, item in images.items() if item.series_uid},
            layout=layout,
        )
        for subject, images in sorted(by_subject.items())
    ]
