"""``medsynth data register``: a data folder in, a registered copy out, with its QC.

Paired training needs each subject's images voxel-aligned, and real ones are not (another day, another
table, a patient who moved). This command registers every subject's other modalities onto its reference
one (:mod:`medsynth.data.registration`) and writes a copy that medsynth trains on like any data folder.
With ``--template`` it instead moves every image of every subject, each on its own, onto one template
(:mod:`medsynth.data.template`): a common pose for unpaired training, which never uses a pair.

* **The same layout.** BIDS-like, IXI and BraTS folders keep every file's relative path (the reference
  image is copied byte for byte, the others are resampled onto its grid; participants.tsv,
  dataset_description.json and JSON sidecars come along). DICOM and manifest inputs come out BIDS-like
  in NIfTI (a manifest input also gets ``manifest.csv``, which keeps its subject ids).
* **Beside each registered image**, its transform (``<image>_to-<reference>_xfm.tfm``, SimpleITK;
  ``_to-template_xfm.tfm`` in template mode, where every image is resampled, the reference too).
* **QC** in ``registration/``: ``qc.csv`` (per subject and modality: normalised mutual information before
  and after, the transform's translation, largest displacement and rotation), one checkerboard PNG per
  subject (each modality against the reference, before and after), ``args.json`` (the settings).
* **Nothing lost.** Inputs are only read; ``--out`` may not be (or be inside) the input folder. Every file
  is written atomically, a subject's files only once all its pairs registered, and its QC record last:
  a re-run skips the subjects that have one. A subject that fails (an unreadable file, a registration
  that diverged) is one line, the others go on, and the command then exits non-zero.
"""

from __future__ import annotations

import csv
import io
import json
import re
import shutil
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np

from .. import __version__
from ..errors import DataError, MedsynthError
from ..io.atomic import atomic_path, atomic_write_text, remove_stale_partials
from ..io.readers import read_volume
from ..io.volume import Volume, to_canonical
from ..io.writers import write_volume
from ..modalities import canonical_modality
from .layouts import SubjectRecord, bids_path, constant_problem, ct_problem, scan_dataset
from .registration import RegisteredPair, RegistrationSettings, register_pair
from .template import MNI152, finest_spacing, load_template, template_on_grid

#: Where the QC goes inside ``--out`` (no layout scans it for images).
QC_FOLDER = "registration"
#: Layouts found by file name under the input folder: the copy keeps each file's relative path.
_MIRRORED = ("bids", "ixi", "brats")
#: Dataset-level files copied from the input folder (BIDS).
_DATASET_FILES = ("participants.tsv", "dataset_description.json")
_IMAGE_ENDINGS = (".nii.gz", ".nii", ".mha", ".mhd", ".nrrd", ".nhdr")
#: The ``reference`` of the QC rows and transform names in template mode.
TEMPLATE = "template"


@dataclass
class QCRow:
    """One line of ``qc.csv``: a modality of a subject registered onto the reference (or a failure)."""

    subject: str
    modality: str
    reference: str
    transform: str
    nmi_before: float | None = None
    nmi_after: float | None = None
    translation_mm: float | None = None
    max_displacement_mm: float | None = None
    rotation_deg: float | None = None
    status: str = "ok"
    message: str = ""

    @classmethod
    def from_pair(
        cls, subject: str, modality: str, reference: str, transform: str, pair: RegisteredPair
    ) -> QCRow:
        return cls(
            subject,
            modality,
            reference,
            transform,
            nmi_before=round(pair.nmi_before, 4),
            nmi_after=round(pair.nmi_after, 4),
            translation_mm=round(pair.size.translation_mm, 3),
            max_displacement_mm=round(pair.size.max_displacement_mm, 3),
            rotation_deg=round(pair.size.rotation_deg, 3),
        )


@dataclass
class RegistrationReport:
    """What :func:`register_dataset` did: the QC rows of every subject, and the ones that failed."""

    out: Path
    rows: list[QCRow]
    failed: dict[str, str]

    def render(self) -> str:
        """The QC table, then one summary line naming the failed subjects."""
        header = ("subject", "modality", "NMI before", "NMI after", "shift mm", "max mm", "rot deg", "status")
        table: list[tuple[str, ...]] = [header]
        for row in self.rows:
            numbers = (
                row.nmi_before,
                row.nmi_after,
                row.translation_mm,
                row.max_displacement_mm,
                row.rotation_deg,
            )
            cells = ("-" if value is None else f"{value:.3f}" for value in numbers)
            table.append((row.subject, row.modality, *cells, row.status))
        widths = [max(len(r[c]) for r in table) for c in range(len(header))]
        lines = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip() for r in table]
        subjects = len({row.subject for row in self.rows})
        summary = f"{subjects - len(self.failed)} of {subjects} subjects registered into {self.out}"
        if self.failed:
            summary += f"; failed: {', '.join(self.failed)}"
        return "\n".join([*lines, summary, f"QC: {self.out / QC_FOLDER} (qc.csv, one PNG per subject)"])


def register_dataset(
    root: str | Path,
    out: str | Path,
    *,
    manifest: str | Path | None = None,
    modalities: Sequence[str] | None = None,
    reference: str | None = None,
    template: str | Path | None = None,
    settings: RegistrationSettings | None = None,
    say: Callable[[str], None] = print,
) -> RegistrationReport:
    """Register every subject of ``root`` onto its ``reference`` modality into ``out``; resumable.

    ``modalities`` limits what is registered and written (default: all a subject has); ``reference``
    defaults to the first of them, else ``t1``. ``template`` (a file or ``mni152``; not with
    ``reference``) moves every image onto the template instead. ``say`` gets one progress line per subject.

    Raises:
        MedsynthError: ``out`` is (inside) the input folder or holds one of its images, ``out`` is a
            folder that is not an earlier registered copy, or it was made with other settings.
        DataError: the dataset cannot be scanned (see :func:`medsynth.data.layouts.scan_dataset`).

    Example:
        >>> report = register_dataset("misreg", "registered", reference="t1")  # doctest: +SKIP
        >>> print(report.render())  # doctest: +SKIP
    """
    settings = settings or RegistrationSettings()
    wanted = tuple(canonical_modality(m) for m in modalities) if modalities else None
    if template is not None and reference is not None:
        raise MedsynthError("--reference and --template exclude each other: choose one")
    template_volume = None if template is None else load_template(template)
    template_grids: dict[tuple[float, ...], Volume] = {}  # the template on each voxel size, resampled once
    if template is not None:
        reference = TEMPLATE
    else:
        reference = canonical_modality(reference or (wanted[0] if wanted else "t1"))
        if wanted and reference not in wanted:
            raise MedsynthError(f"the reference {reference} is not among --modalities {', '.join(wanted)}")
    records = scan_dataset(root, manifest)
    source = Path(root) if Path(root).is_dir() else Path(root).parent
    out = Path(out)
    _check_out(source, out, records)
    _claim(out, source, reference, wanted, settings, template)
    remove_stale_partials(out, recursive=True)
    destinations = _plan(records, wanted, source, out)
    _copy_dataset_files(source, out)
    rows: list[QCRow] = []
    failed: dict[str, str] = {}
    for number, record in enumerate(records, start=1):
        where = f"[{number}/{len(records)}] {record.id}"
        marker = qc_path(out, record.id, ".json")
        if marker.exists():
            rows += [QCRow(**row) for row in json.loads(marker.read_text(encoding="utf-8"))["rows"]]
            say(f"{where}: registered before, skipped")
            continue
        try:
            if template_volume is None:
                done = _register_subject(record, destinations[record.id], reference, settings, out)
            else:
                done = _register_to_template(
                    record, destinations[record.id], template_volume, template_grids, settings, out
                )
        except MedsynthError as exc:
            failed[record.id] = str(exc)
            rows.append(
                QCRow(record.id, "-", reference, settings.transform, status="failed", message=str(exc))
            )
            say(f"{where}: FAILED: {exc}")
            continue
        rows += done
        moves = ", ".join(f"{r.modality} {r.translation_mm:.1f} mm {r.rotation_deg:.1f} deg" for r in done)
        say(
            f"{where}: registered to {reference}"
            + (f" ({moves})" if moves else " (nothing else to register)")
        )
    _write_qc(out, rows)
    if records and records[0].layout == "manifest":
        _write_manifest(out)
    return RegistrationReport(out, rows, failed)


# ------------------------------------------------------------------------------- the output folder
def _check_out(source: Path, out: Path, records: Sequence[SubjectRecord]) -> None:
    """Refuse an ``out`` that could overwrite, or be scanned as, the input."""
    target, origin = out.resolve(), source.resolve()
    if target == origin or origin in target.parents:
        raise MedsynthError(f"is inside the input folder {source}; choose --out outside it", out)
    for record in records:
        for path in record.paths.values():
            if target in path.resolve().parents:
                raise MedsynthError(f"holds the input image {path}; choose --out elsewhere", out)
    if out.exists() and not out.is_dir():
        raise MedsynthError("is a file; --out is the folder of the registered copy", out)


def _claim(
    out: Path,
    source: Path,
    reference: str,
    wanted: tuple[str, ...] | None,
    settings: RegistrationSettings,
    template: str | Path | None,
) -> None:
    """Write ``args.json`` into a new ``out``, or check that an existing one was made the same way
    (same input, reference or template, modalities and settings), so a resumed copy is one registration."""
    if template is not None:
        template = MNI152 if str(template).lower() == MNI152 else str(Path(template).resolve())
    args = {
        "source": str(source.resolve()),
        "reference": reference,
        "template": template,
        "modalities": list(wanted) if wanted else None,
        "settings": asdict(settings),
    }
    path = out / QC_FOLDER / "args.json"
    if path.exists():
        earlier = json.loads(path.read_text(encoding="utf-8"))
        current = json.loads(json.dumps(args))  # tuples as lists, as the file holds them
        if {key: earlier.get(key) for key in current} != current:
            raise MedsynthError(
                f"was registered with other settings ({path}); rerun with the same options to resume, or "
                "choose a new --out",
                out,
            )
        return
    if out.is_dir() and any(out.iterdir()):
        raise MedsynthError(
            "exists and is not a registered copy; choose a new or empty folder for --out", out
        )
    atomic_write_text(path, json.dumps({**args, "medsynth": __version__}, indent=2) + "\n")


def qc_path(out: Path, subject: str, ending: str) -> Path:
    """A subject's QC file (``.json`` record, ``.png`` figure); ids from a manifest or a DICOM folder
    may hold anything, so only letters, digits, ``.``, ``_`` and ``-`` are kept."""
    return out / QC_FOLDER / (re.sub(r"[^\w.-]", "_", subject) + ending)


def _plan(
    records: Sequence[SubjectRecord], wanted: tuple[str, ...] | None, source: Path, out: Path
) -> dict[str, dict[str, Path]]:
    """Where each subject's images go; two inputs that would land on one file are refused up front."""
    plan: dict[str, dict[str, Path]] = {}
    taken: dict[Path, str] = {}
    for record in records:
        files = {
            m: out / record.paths[m].relative_to(source)
            if record.layout in _MIRRORED
            else bids_path(out, record.id, m)
            for m in wanted or record.modalities
            if m in record.paths
        }
        for what, destination in [*files.items(), ("QC", qc_path(out, record.id, ".json"))]:
            if destination in taken:
                raise MedsynthError(
                    f"{taken[destination]} and {record.id} {what} would both be written to {destination}; "
                    "rename one subject (a manifest's subject ids become BIDS labels of letters and digits)"
                )
            taken[destination] = f"{record.id} {what}"
        plan[record.id] = files
    return plan


def _copy_file(source: Path, destination: Path) -> None:
    with atomic_path(destination) as temp:
        shutil.copyfile(source, temp)


def _copy_dataset_files(source: Path, out: Path) -> None:
    """participants.tsv as it is; dataset_description.json with this step added to ``GeneratedBy``."""
    for name in _DATASET_FILES:
        if not (source / name).is_file():
            continue
        if name != "dataset_description.json":
            _copy_file(source / name, out / name)
            continue
        try:
            description = json.loads((source / name).read_text(encoding="utf-8"))
            steps = description.get("GeneratedBy")
            step = {"Name": "medsynth data register", "Version": __version__}
            description["GeneratedBy"] = [*(steps if isinstance(steps, list) else []), step]
            atomic_write_text(out / name, json.dumps(description, indent=2) + "\n")
        except (ValueError, AttributeError):  # not JSON we understand: keep it as it was
            _copy_file(source / name, out / name)


def _stem(path: Path) -> str:
    name = path.name
    ending = next((e for e in _IMAGE_ENDINGS if name.lower().endswith(e)), "")
    return name[: len(name) - len(ending)]


def transform_path(image: Path, reference: str) -> Path:
    """Where the transform of a registered image is saved: beside it, named after it and the reference.

    >>> transform_path(Path("sub-01/anat/sub-01_T2w.nii.gz"), "t1").as_posix()
    'sub-01/anat/sub-01_T2w_to-t1_xfm.tfm'
    """
    return image.with_name(f"{_stem(image)}_to-{reference}_xfm.tfm")


# --------------------------------------------------------------------------------- one subject
def _read(record: SubjectRecord, modalities: Sequence[str]) -> dict[str, Volume]:
    """The subject's images, with the checks training applies (not blank, a CT in HU)."""
    volumes = {}
    for modality in modalities:
        volume = read_volume(record.paths[modality], series_uid=record.series_uids.get(modality))
        problem = constant_problem(volume) or (ct_problem(volume) if modality == "ct" else None)
        if problem:
            raise DataError(problem, volume.source)
        volumes[modality] = volume
    return volumes


def _dtype(modality: str, array: np.ndarray) -> str:
    """int16 for a CT of integer HU (as scanners store it), float32 for everything else."""
    info = np.iinfo(np.int16)
    whole = modality == "ct" and np.array_equal(array, np.rint(array))
    return "int16" if whole and info.min <= array.min() and array.max() <= info.max else "float32"


def _sidecar(image: Path, destination: Path) -> None:
    """Copy a JSON sidecar (acquisition parameters) along with its image."""
    sidecar = image.with_name(f"{_stem(image)}.json")
    if image.is_file() and sidecar.is_file():
        _copy_file(sidecar, destination.with_name(f"{_stem(destination)}.json"))


def _register_subject(
    record: SubjectRecord, files: dict[str, Path], reference: str, settings: RegistrationSettings, out: Path
) -> list[QCRow]:
    """Register, then write the subject's images, transforms, figure and (last) its QC record."""
    if reference not in record.paths:
        has = ", ".join(record.modalities) or "no images"
        raise DataError(f"subject {record.id} has no {reference} image, the reference (it has: {has})")
    volumes = _read(record, list(files))
    fixed = volumes[reference]
    pairs = {
        m: register_pair(fixed, v, ct=m == "ct", settings=settings)
        for m, v in volumes.items()
        if m != reference
    }
    source = record.paths[reference]
    if record.layout in _MIRRORED:
        _copy_file(source, files[reference])  # the reference is not resampled: its bytes are kept
    else:
        write_volume(fixed.array, fixed, files[reference], dtype=_dtype(reference, fixed.array))
    _sidecar(source, files[reference])
    _write_registered(record, files, fixed, pairs, volumes, reference)
    return _finish_subject(record.id, files, fixed, pairs, reference, settings, out)


def _register_to_template(
    record: SubjectRecord,
    files: dict[str, Path],
    template: Volume,
    grids: dict[tuple[float, ...], Volume],
    settings: RegistrationSettings,
    out: Path,
) -> list[QCRow]:
    """Every image of the subject onto ``template`` at the subject's finest voxel size, each on its own
    (never onto another image of the subject); written as :func:`_register_subject` writes. ``grids``
    keeps the template resampled per voxel size across subjects."""
    volumes = _read(record, list(files))
    spacing = tuple(round(s, 6) for s in finest_spacing(list(volumes.values())))
    if spacing not in grids:
        grids[spacing] = template_on_grid(template, spacing)
    fixed = grids[spacing]
    pairs = {m: register_pair(fixed, v, ct=m == "ct", settings=settings) for m, v in volumes.items()}
    _write_registered(record, files, fixed, pairs, volumes, TEMPLATE)
    return _finish_subject(record.id, files, fixed, pairs, TEMPLATE, settings, out)


def _write_registered(
    record: SubjectRecord,
    files: dict[str, Path],
    fixed: Volume,
    pairs: dict[str, RegisteredPair],
    volumes: dict[str, Volume],
    reference: str,
) -> None:
    """Each registered image on ``fixed``'s grid, its transform and its JSON sidecar."""
    for modality, pair in pairs.items():
        write_volume(
            pair.after.array, fixed, files[modality], dtype=_dtype(modality, volumes[modality].array)
        )
        _write_transform(pair, transform_path(files[modality], reference))
        _sidecar(record.paths[modality], files[modality])


def _finish_subject(
    subject: str,
    files: dict[str, Path],
    fixed: Volume,
    pairs: dict[str, RegisteredPair],
    reference: str,
    settings: RegistrationSettings,
    out: Path,
) -> list[QCRow]:
    """The subject's checkerboard figure and, last, its QC record (the resume marker)."""
    if pairs:
        _figure(fixed, pairs, qc_path(out, subject, ".png"))
    rows = [QCRow.from_pair(subject, m, reference, settings.transform, pair) for m, pair in pairs.items()]
    written = {m: path.relative_to(out).as_posix() for m, path in files.items()}
    record_json = {"subject": subject, "files": written, "rows": [asdict(row) for row in rows]}
    atomic_write_text(qc_path(out, subject, ".json"), json.dumps(record_json, indent=2) + "\n")
    return rows


def _write_transform(pair: RegisteredPair, path: Path) -> None:
    import SimpleITK as sitk

    with atomic_path(path) as temp:
        sitk.WriteTransform(pair.transform, str(temp))


def _figure(fixed: Volume, pairs: dict[str, RegisteredPair], path: Path) -> None:
    """Checkerboards of the reference with each modality, before and after (canonical RAS views)."""
    from ..viz import checkerboard_figure

    canonical, orientation = to_canonical(fixed)
    others = {}
    for modality, pair in pairs.items():
        others[f"{modality} before"] = orientation.apply(pair.before.array)
        others[f"{modality} after"] = orientation.apply(pair.after.array)
    checkerboard_figure(canonical.array, others, path, spacing=canonical.spacing)


# ------------------------------------------------------------------------------------ the tables
def _write_qc(out: Path, rows: Sequence[QCRow]) -> None:
    stream = io.StringIO()
    writer = csv.writer(stream, lineterminator="\n")
    names = [field.name for field in fields(QCRow)]
    writer.writerow(names)
    for row in rows:
        writer.writerow(["" if (value := getattr(row, name)) is None else value for name in names])
    atomic_write_text(out / QC_FOLDER / "qc.csv", stream.getvalue())


def _write_manifest(out: Path) -> None:
    """``manifest.csv`` of every registered subject (a manifest input keeps its subject ids)."""
    stream = io.StringIO()
    writer = csv.writer(stream, lineterminator="\n")
    writer.writerow(["subject", "modality", "path"])
    for marker in sorted((out / QC_FOLDER).glob("*.json")):
        record: dict[str, Any] = json.loads(marker.read_text(encoding="utf-8"))
        for modality, path in record.get("files", {}).items():  # args.json has none
            writer.writerow([record["subject"], modality, path])
    atomic_write_text(out / "manifest.csv", stream.getvalue())
