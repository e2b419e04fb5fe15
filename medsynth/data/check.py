"""``medsynth data check``: read every file of a dataset once and list every problem it has.

A cohort with one truncated download or one subject whose T2 was never registered to its T1 should fail
here, in one pass that names all such files, not an hour into training and one file at a time. Each file
is read completely (header and voxels, through the same reader training uses), and each failure is
recorded and the scan goes on.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..errors import MedsynthError
from ..io.geometry import MIN_OVERLAP, grid_mismatch, overlap_fraction
from ..io.readers import read_volume
from ..io.volume import Volume
from ..modalities import MODALITIES, canonical_modality
from .alignment import misalignment
from .layouts import SubjectRecord, constant_problem, ct_grid_problem, ct_problem, scan_dataset
from .pairing import subject_role

#: Fewer subjects than this cannot be split into train / validation / test by subject.
MIN_SUBJECTS = 3


@dataclass
class FileCheck:
    """What was found in one image file (geometry is None when it could not be read)."""

    modality: str
    path: Path
    shape: tuple[int, int, int] | None = None
    spacing: tuple[float, float, float] | None = None
    orientation: str | None = None
    #: ok | unreadable | constant (one value) | not HU (a CT without air at -1000) | resampled (other
    #: grid, same anatomy) | off grid (a CT and an MR on different grids: never resampled) | disjoint |
    #: misaligned (one grid, but the pair lines up better shifted by a voxel or two: register it)
    status: str = "ok"


@dataclass
class Problem:
    """One thing wrong; ``blocking`` ones stop training, the others are worth knowing."""

    subject: str
    message: str
    blocking: bool
    modality: str | None = None


@dataclass
class SubjectCheck:
    id: str
    files: list[FileCheck] = field(default_factory=list)
    #: With ``pairing="unpaired"``: what the subject can serve (:func:`medsynth.data.pairing.subject_role`):
    #: ``both`` (either side of training, validation, evaluation), ``source``/``target`` only, or ``none``.
    serves: str | None = None


@dataclass
class DatasetReport:
    """The result of :func:`check_dataset`: a table per file, the problems, and a verdict."""

    root: Path
    layout: str
    modalities: tuple[str, ...]
    subjects: list[SubjectCheck]
    problems: list[Problem]
    pairing: str = "paired"

    @property
    def blocking(self) -> bool:
        """True when training on this dataset would fail or be meaningless."""
        return any(p.blocking for p in self.problems)

    def summary(self) -> str:
        """One line, e.g. ``12 subjects x 4 modalities (t1, t2, pd, flair); all paired``."""
        head = f"{len(self.subjects)} subjects x {len(self.modalities)} modalities ({', '.join(self.modalities)})"
        if self.pairing == "unpaired":
            source, target = self.modalities
            counts = {
                role: sum(s.serves == role for s in self.subjects) for role in ("both", "source", "target")
            }
            head += (
                f"; unpaired {source} -> {target}: {counts['both']} with both (validation, evaluation), "
                f"{counts['source']} {source} only, {counts['target']} {target} only"
            )
        if not self.problems:
            return f"{head}; all paired" if self.pairing == "paired" else head
        n_blocking = sum(p.blocking for p in self.problems)
        verdict = f"{n_blocking} blocking training" if n_blocking else "none blocking training"
        return f"{head}; {len(self.problems)} problem{'s' * (len(self.problems) != 1)} ({verdict})"

    def render(self) -> str:
        """A fixed-width table (one row per file), the problems, then the summary line."""
        unpaired = self.pairing == "unpaired"
        header = ("subject", "modality", "shape", "spacing (mm)", "orient", "status") + (
            ("serves",) if unpaired else ()
        )
        rows = [header]
        for subject in self.subjects:
            for n, item in enumerate(subject.files):
                serves = (SERVES[subject.serves or "none"] if n == 0 else "",) if unpaired else ()
                rows.append(
                    (
                        subject.id if n == 0 else "",
                        item.modality,
                        "x".join(str(s) for s in item.shape) if item.shape else "-",
                        "x".join(f"{s:.2f}" for s in item.spacing) if item.spacing else "-",
                        item.orientation or "-",
                        item.status,
                        *serves,
                    )
                )
        widths = [max(len(row[c]) for row in rows) for c in range(len(header))]
        lines = [f"dataset {self.root} (layout: {self.layout})"]
        lines += [
            "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows
        ]
        if self.problems:
            lines.append("problems:")
            for p in self.problems:
                where = f"{p.subject} {p.modality}" if p.modality else p.subject
                lines.append(f"  [{'blocking' if p.blocking else 'warning'}] {where}: {p.message}")
        lines.append(self.summary())
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (paths as strings) for ``medsynth data check --json``."""
        data = asdict(self)
        data["root"] = str(self.root)
        for subject in data["subjects"]:
            for item in subject["files"]:
                item["path"] = str(item["path"])
        data["modalities"] = list(self.modalities)
        data["blocking"] = self.blocking
        data["summary"] = self.summary()
        return data


#: How ``data check --pairing unpaired`` says what a subject serves.
SERVES = {
    "both": "both: training, validation, evaluation",
    "source": "source only: unpaired training",
    "target": "target only: unpaired training",
    "none": "neither: not used",
}


def check_dataset(
    root: str | Path,
    manifest: str | Path | None = None,
    modalities: Sequence[str] | None = None,
    *,
    pairing: str = "paired",
) -> DatasetReport:
    """Scan ``root`` and read every file of every subject, collecting all problems.

    ``modalities`` are the ones training will need: a subject missing one is blocking. Without them, the
    union of what subjects have is reported and gaps are warnings. Grids are compared with each
    subject's first modality (the first requested one it has), the grid training aligns to.

    ``pairing="unpaired"`` (``modalities`` = source, target): a subject with one of the two serves one
    side of unpaired training (:mod:`medsynth.data.pairing`), so a missing one is no problem; the report
    says what each subject serves, and it is blocking only when no subject has the source, or none the
    target.

    Raises:
        DataError: only when no dataset can be found at all (see :func:`scan_dataset`).
    """
    records = scan_dataset(root, manifest)
    wanted = tuple(canonical_modality(m) for m in modalities) if modalities else ()
    if pairing == "unpaired" and len(wanted) != 2:
        raise MedsynthError(
            "--pairing unpaired checks one source and one target: give --modalities SOURCE,TARGET"
        )
    shown = wanted or tuple(m for m in MODALITIES if any(m in r.paths for r in records))
    layout = records[0].layout if records else "none"
    problems: list[Problem] = []
    paired = pairing == "paired"
    subjects = [_check_subject(record, wanted, problems, paired=paired, root=root) for record in records]
    if pairing == "unpaired":
        _unpaired_roles(records, subjects, wanted, problems)
    for record in records if pairing == "paired" else []:
        missing = [m for m in shown if m not in record.paths]
        if missing:
            problems.append(Problem(record.id, f"no {', '.join(missing)} image", blocking=bool(wanted)))
    if len(records) < MIN_SUBJECTS:
        problems.append(
            Problem(
                "dataset",
                f"only {len(records)} subject(s); training needs at least {MIN_SUBJECTS} "
                "(train, validation and test are split by subject)",
                blocking=True,
            )
        )
    return DatasetReport(Path(root), layout, shown, subjects, problems, pairing)


def _unpaired_roles(
    records: list[SubjectRecord],
    subjects: list[SubjectCheck],
    wanted: tuple[str, ...],
    problems: list[Problem],
) -> None:
    """Say what each subject serves; blocking only when one side has no subject at all."""
    source, target = wanted
    for record, subject in zip(records, subjects, strict=True):
        subject.serves = subject_role(record.paths, source, target) or "none"
        if subject.serves == "none":
            problems.append(
                Problem(record.id, f"has neither {source} nor {target}: not used", blocking=False)
            )
    for side, name in (("source", source), ("target", target)):
        if not any(s.serves in ("both", side) for s in subjects):
            problems.append(
                Problem(
                    "dataset", f"no subject has {name}: unpaired training needs both sides", blocking=True
                )
            )
    if not any(s.serves == "both" for s in subjects):
        problems.append(
            Problem(
                "dataset",
                f"no subject has both {source} and {target}: synthetic images cannot be scored (validation falls "
                "back to the round-trip error; add a few complete subjects to evaluate)",
                blocking=False,
            )
        )


def _misaligned(root: str | Path, ref_name: str, reference: Volume, volume: Volume) -> str | None:
    """A warning when a pair on one grid lines up better shifted by a voxel or two, naming the fix."""
    found = misalignment(reference.array, volume.array)
    if found is None:
        return None
    return (
        f"looks misaligned with {ref_name}: normalised mutual information rises from {found.identity:.3f} to "
        f"{found.shifted:.3f} when it is shifted {-found.shift:+d} voxel(s) along axis {'ijk'[found.axis]}; "
        f"register the pairs first: medsynth data register {root} --out REGISTERED --reference TARGET (the "
        "modality you will synthesise: it keeps its own voxels, the other is moved onto it)"
    )


def _check_subject(
    record: SubjectRecord,
    wanted: tuple[str, ...],
    problems: list[Problem],
    *,
    paired: bool,
    root: str | Path,
) -> SubjectCheck:
    """Read each file of one subject; compare each grid with the reference (first) modality's and, for
    paired training, whether an image on that grid looks aligned with it (:func:`_misaligned`)."""
    order = [m for m in wanted if m in record.paths] + [m for m in record.modalities if m not in wanted]
    result = SubjectCheck(record.id)
    reference: tuple[str, Volume] | None = None
    for modality in order:
        item = FileCheck(modality, record.paths[modality])
        result.files.append(item)
        try:
            volume = read_volume(item.path, series_uid=record.series_uids.get(modality))
        except MedsynthError as exc:
            item.status = "unreadable"
            problems.append(Problem(record.id, str(exc), blocking=True, modality=modality))
            continue
        item.shape, item.spacing, item.orientation = volume.shape, volume.spacing, volume.orientation
        constant = constant_problem(volume)
        if constant:
            item.status = "constant"
            message = (
                f"{item.path} {constant}; training refuses it, replace the file or leave the subject out"
            )
            problems.append(Problem(record.id, message, blocking=True, modality=modality))
            continue
        not_hu = ct_problem(volume) if modality == "ct" else None
        if not_hu:
            item.status = "not HU"
            problems.append(Problem(record.id, f"{item.path} {not_hu}", blocking=True, modality=modality))
            continue
        if reference is None:
            reference = (modality, volume)
            continue
        ref_name, ref_volume = reference
        mismatch = grid_mismatch(volume, ref_volume)
        if mismatch is None:
            shifted = _misaligned(root, ref_name, ref_volume, volume) if paired else None
            if shifted:
                item.status = "misaligned"
                problems.append(Problem(record.id, shifted, blocking=False, modality=modality))
            continue
        overlap = overlap_fraction(volume, ref_volume)
        off_grid = ct_grid_problem(modality, volume, ref_name, ref_volume)
        if off_grid and overlap >= MIN_OVERLAP:
            item.status = "off grid"
            ct_path = item.path if modality == "ct" else record.paths["ct"]
            problems.append(Problem(record.id, f"{ct_path}: {off_grid}", blocking=True, modality=modality))
        elif overlap >= MIN_OVERLAP:
            item.status = "resampled"
            message = f"not on the {ref_name} grid ({mismatch}); training resamples it onto that grid"
            problems.append(Problem(record.id, message, blocking=False, modality=modality))
        else:
            item.status = "disjoint"
            message = (
                f"covers only {overlap:.0%} of the {ref_name} field of view ({mismatch}); "
                f"check it belongs to this subject, or register it to {ref_name} first"
            )
            problems.append(Problem(record.id, message, blocking=True, modality=modality))
    return result
