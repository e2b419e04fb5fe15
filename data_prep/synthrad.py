"""Bring SynthRAD2023 / SynthRAD2025 MR -> CT cases (task 1) into the BIDS-like layout medsynth reads.

    python data_prep/synthrad.py synthRAD2025_Task1_Train/ --check            # read every case, list problems
    python data_prep/synthrad.py synthRAD2025_Task1_Train/ --out data/synthrad # convert to sub-*/anat/

A case is a folder holding ``mr``, ``ct`` and ``mask`` images, found at any depth below the download:
2023's ``Task1/brain/1BA001/mr.nii.gz`` (and ``pelvis``; the 2023 release ships NIfTI) and 2025's
``Task1/HN/1HNA001/mr.mha`` (``AB``, ``TH``; MetaImage). Each case becomes ``sub-1BA001/anat/`` with
``sub-1BA001_T1w.nii.gz`` (the MR, float32), ``sub-1BA001_CT.nii.gz`` (Hounsfield units, int16 when
every value is a whole number in range) and ``sub-1BA001_mask.nii.gz`` (the body mask; medsynth's BIDS
scanner skips the ``mask`` suffix, so it is never taken for a modality). Images are converted with
SimpleITK, which keeps origin, spacing and direction; MetaImage cannot be linked into a NIfTI layout, so
every output is a real file (``--copy`` changes nothing here). ``participants.tsv`` maps each
``sub-<case id>`` to the case id and region (brain, pelvis, HN, AB, TH).

The MR is imported as medsynth's ``t1``: SynthRAD's MR is T1-weighted for the most part (2023 brain: 3D
T1-weighted gradient echo, many scans after gadolinium), but the contrast agent and sequence are given
per case only in the challenge's parameter sheets, so contrast-enhanced scans land in ``t1`` too. Select
cases by those sheets when the difference matters.

A case is left out, with one line naming the file, when its MR, CT and mask are not on one grid (the
tolerance of ``medsynth data check``), when its CT is not in Hounsfield units (its 0.5th percentile is
above -500 HU, where air is -1000: the rule of ``medsynth data check``), or when an image is unreadable,
constant or holds NaN (a truncated file is named as truncated). A case without a mask is imported
without one, with a line saying so. CBCT -> CT (task 2) cases are listed and skipped: medsynth has no CBCT modality.
So are validation/test inputs, which come without CT. The download is only read. A rerun skips every
output newer than its source or holding the same image, and the import ends with ``medsynth data check``
of the output folder.
"""

from __future__ import annotations

import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from _common import parser, run

from medsynth.data.check import MIN_SUBJECTS, check_dataset
from medsynth.data.layouts import bids_label, bids_path
from medsynth.errors import DataError
from medsynth.io.atomic import atomic_path, atomic_write_text, remove_stale_partials
from medsynth.io.formats.itk import itk_reason
from medsynth.io.geometry import affine_from_itk, grid_mismatch
from medsynth.io.volume import Volume

if TYPE_CHECKING:
    import SimpleITK as sitk

MODALITIES = ("t1", "ct")

#: File names of a case folder (any letter case) and the endings SynthRAD releases use.
KINDS = ("mr", "ct", "cbct", "mask")
ENDINGS = (".mha", ".nii.gz", ".nii")

#: A CT in Hounsfield units has air (-1000 HU) around the body, so its 0.5th percentile lies below this;
#: an unsigned CT (air near 24) or an MR does not. The rule and the percentile are medsynth data check's.
AIR_BELOW_HU = -500.0

_REGION_FOLDERS = {"brain": "brain", "pelvis": "pelvis", "hn": "HN", "ab": "AB", "th": "TH"}
#: ``1BA001`` (2023: task, B/P region, centre, number) or ``1HNA001`` (2025: HN/AB/TH region).
_CASE_ID = re.compile(r"^[12](B|P|HN|AB|TH)[A-Z]\d+$")
_REGION_CODES = {"B": "brain", "P": "pelvis", "HN": "HN", "AB": "AB", "TH": "TH"}

_SKIP_CBCT = "CBCT -> CT (task 2) case(s) skipped, medsynth has no cbct modality"
_SKIP_NO_CT = "case(s) without a ct image skipped (validation/test inputs: the CT is withheld)"
_SKIP_NO_MR = "case(s) without an mr image skipped"


@dataclass
class Case:
    """One SynthRAD case folder: its id, region and image files by kind (``mr``, ``ct``, ``mask``)."""

    id: str
    folder: Path
    files: dict[str, Path]
    region: str

    @property
    def sources(self) -> dict[str, Path]:
        """The source of each output: ``t1`` (the MR), ``ct`` and, when there is one, ``mask``."""
        names = {"t1": "mr", "ct": "ct", "mask": "mask"}
        return {out: self.files[kind] for out, kind in names.items() if kind in self.files}

    def targets(self, out: Path) -> dict[str, Path]:
        """Where each output goes under ``out``: ``sub-<id>/anat/sub-<id>_{T1w,CT,mask}.nii.gz``."""
        t1 = bids_path(out, self.id, "t1")
        paths = {
            "t1": t1,
            "ct": bids_path(out, self.id, "ct"),
            "mask": t1.with_name(f"sub-{self.label}_mask.nii.gz"),
        }
        return {name: paths[name] for name in self.sources}

    @property
    def label(self) -> str:
        return bids_label(self.id)


@dataclass
class Survey:
    """What a walk over the download found: usable cases, skipped ids by reason, and problems."""

    cases: list[Case] = field(default_factory=list)
    skipped: dict[str, list[str]] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)


def find_cases(source: Path) -> Survey:
    """Every case folder below ``source`` (sorted; hidden folders and ``__MACOSX`` are not entered).

    ``overview`` folders of PNGs and parameter sheets hold no ``mr``/``ct`` files and are passed over.

    Raises:
        DataError: ``source`` is not a folder, or holds no SynthRAD case at all.
    """
    if not source.is_dir():
        what = "is a file, not a folder" if source.exists() else "no such folder"
        raise DataError(f"{what}; pass the extracted SynthRAD download (the folder holding Task1/)", source)
    survey = Survey()
    seen: dict[str, Path] = {}  # BIDS label -> the case folder that claimed it
    for folder_name, subfolders, names in os.walk(source):
        subfolders[:] = sorted(d for d in subfolders if not d.startswith(".") and d != "__MACOSX")
        folder = Path(folder_name)
        files: dict[str, list[Path]] = {}
        for name in sorted(names):
            kind = _kind(name)
            if kind:
                files.setdefault(kind, []).append(folder / name)
        if not files:
            continue
        doubles = {kind: paths for kind, paths in files.items() if len(paths) > 1}
        if doubles:
            kind, paths = next(iter(doubles.items()))
            listed = ", ".join(p.name for p in paths)
            survey.problems.append(str(DataError(f"has two {kind} images ({listed}); keep one", folder)))
            continue
        if "mr" not in files:
            survey.skipped.setdefault(_SKIP_CBCT if "cbct" in files else _SKIP_NO_MR, []).append(folder.name)
            continue
        if "ct" not in files:
            survey.skipped.setdefault(_SKIP_NO_CT, []).append(folder.name)
            continue
        case = Case(folder.name, folder, {k: p[0] for k, p in files.items() if k != "cbct"}, _region(folder))
        if case.label in seen:
            first = seen[case.label]
            survey.problems.append(
                str(DataError(f"is another case {case.id} (first: {first}); keep one", folder))
            )
            continue
        seen[case.label] = folder
        survey.cases.append(case)
    if not (survey.cases or survey.skipped or survey.problems):
        raise DataError(
            "no SynthRAD case folders found (a folder with mr and ct .mha/.nii.gz files, e.g. "
            "Task1/HN/1HNA001/mr.mha); pass the extracted download",
            source,
        )
    return survey


def _kind(name: str) -> str | None:
    lower = name.lower()
    for ending in ENDINGS:
        if lower.endswith(ending) and lower[: -len(ending)] in KINDS:
            return lower[: -len(ending)]
    return None


def _region(folder: Path) -> str:
    """The region from the parent folder (``Task1/brain``, ``Task1/HN``), else from the case id."""
    region = _REGION_FOLDERS.get(folder.parent.name.lower())
    if region:
        return region
    match = _CASE_ID.match(folder.name)
    return _REGION_CODES[match.group(1)] if match else "n/a"


# ------------------------------------------------------------------------------------ reading a case


def load_case(case: Case) -> dict[str, sitk.Image]:
    """Read and validate one case; return the images to write (``t1`` float32, ``ct``, ``mask``).

    Raises:
        DataError: naming the file: unreadable, not 3D, NaN, constant, not on the CT's grid, or a CT
            that is not in Hounsfield units.
    """
    import SimpleITK as sitk

    images = {name: _read(path) for name, path in case.sources.items()}
    ct_path = case.sources["ct"]
    for name, image in images.items():
        if name != "ct":
            mismatch = grid_mismatch(_grid(image), _grid(images["ct"]))
            if mismatch:
                raise DataError(
                    f"is not on the grid of {ct_path.name} ({mismatch}); a SynthRAD case shares one grid, "
                    "download the case again or leave it out",
                    case.sources[name],
                )
    for name in ("t1", "ct"):
        _check_values(images[name], case.sources[name])
    ct_values = sitk.GetArrayViewFromImage(images["ct"])
    sample = ct_values.ravel()[:: max(1, ct_values.size // 4_000_000)]  # a strided sample is enough
    low = float(np.percentile(sample, 0.5))
    if low > AIR_BELOW_HU:
        raise DataError(
            f"is not a CT in Hounsfield units (0.5th percentile {low:.4g}, where air is -1000 HU); "
            "convert it to HU (e.g. add the rescale intercept, usually -1024) or leave the case out",
            ct_path,
        )
    converted = {
        "t1": sitk.Cast(images["t1"], sitk.sitkFloat32),
        "ct": sitk.Cast(
            images["ct"], sitk.sitkInt16 if _whole(ct_values, -32768, 32767) else sitk.sitkFloat32
        ),
    }
    if "mask" in images:
        mask = images["mask"]
        whole = _whole(sitk.GetArrayViewFromImage(mask), 0, 255)
        converted["mask"] = sitk.Cast(mask, sitk.sitkUInt8) if whole else mask
    return converted


def _read(path: Path) -> sitk.Image:
    import SimpleITK as sitk

    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as exc:
        raise DataError(
            f"cannot be read ({itk_reason(exc, path)}); the file is truncated or corrupt, download it again",
            path,
        ) from exc
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        raise DataError(
            f"is a {image.GetDimension()}D image with {image.GetNumberOfComponentsPerPixel()} value(s) per "
            "voxel, not a 3D scalar volume; replace the file or leave the case out",
            path,
        )
    return image


def _grid(image: sitk.Image) -> Volume:
    """The image's grid as a Volume without voxels (a broadcast zero), for medsynth's grid comparison."""
    affine = affine_from_itk(image.GetSpacing(), image.GetOrigin(), image.GetDirection())
    return Volume(np.broadcast_to(np.float32(0), image.GetSize()), affine)


def _check_values(image: sitk.Image, path: Path) -> None:
    """NaN/Inf or a single value everywhere: ``medsynth data check`` would block training on it."""
    import SimpleITK as sitk

    values = sitk.GetArrayViewFromImage(image)
    if np.issubdtype(values.dtype, np.floating) and not np.isfinite(values).all():
        raise DataError("has NaN/Inf voxels; replace the file or leave the case out", path)
    low, high = float(values.min()), float(values.max())
    if low == high:
        raise DataError(f"is constant (every voxel is {low:g}), an empty image; leave the case out", path)


def _whole(values: np.ndarray, low: int, high: int) -> bool:
    """True when every value is a whole number within [low, high] (so an integer type keeps it exactly)."""
    if float(values.min()) < low or float(values.max()) > high:
        return False
    return bool(np.issubdtype(values.dtype, np.integer) or np.array_equal(values, np.rint(values)))


# ----------------------------------------------------------------------------------------- writing


def convert(source: Path, out: Path) -> int:
    """Convert every case under ``source`` into ``out``; 1 when a case was left out or the check blocks."""
    if out.resolve() == source.resolve() or source.resolve() in out.resolve().parents:
        raise DataError(
            "is inside the download, which is never modified; choose an --out folder outside it", out
        )
    survey = find_cases(source)
    remove_stale_partials(out, recursive=True)  # left by a killed earlier run
    written, current, imported = 0, 0, []
    for case in survey.cases:
        try:
            count = _convert_case(case, out)
        except DataError as exc:
            survey.problems.append(str(exc))
            continue
        written, current = written + count, current + (count == 0)
        imported.append(case)
    print(
        f"SynthRAD: {len(imported)} MR -> CT cases in {out} ({current} already there, {written} files written)"
    )
    _print_survey(survey)
    _print_missing_masks(imported, "imported")
    if not imported:
        raise DataError("no case could be converted; fix the problems listed above", source)
    _write_participants(out, imported)
    print(
        "the MR is imported as t1 (T1-weighted; some scans are contrast-enhanced, see the parameter sheets)"
    )
    report = check_dataset(out, modalities=MODALITIES)
    for problem in report.problems:
        where = f"{problem.subject} {problem.modality}" if problem.modality else problem.subject
        print(f"  [{'blocking' if problem.blocking else 'warning'}] {where}: {problem.message}")
    print(f"medsynth data check {out}: {report.summary()}")
    return 1 if survey.problems or report.blocking else 0


def _convert_case(case: Case, out: Path) -> int:
    """Write the case's missing or outdated outputs; return how many files were written (0: all current).

    An output newer than its source is kept without reading anything. An older one is kept when it
    holds the same image; otherwise the case is refused rather than overwriting a file this run did not
    write (delete it to convert again).
    """
    sources, targets = case.sources, case.targets(out)
    if all(_newer(targets[n], sources[n]) for n in targets):
        return 0
    images = load_case(case)
    stale = [n for n in targets if targets[n].exists() and not _newer(targets[n], sources[n])]
    for name in stale:
        if not _same_image(images[name], targets[name]):
            raise DataError(
                f"already exists, is older than {sources[name]} and holds another image; delete it to "
                "convert again, or choose an empty --out folder",
                targets[name],
            )
    import SimpleITK as sitk

    missing = [n for n in targets if not targets[n].exists()]
    for name in missing:
        with atomic_path(targets[name]) as temp:
            sitk.WriteImage(images[name], str(temp), useCompression=True)
    return len(missing)


def _newer(target: Path, source: Path) -> bool:
    return target.exists() and target.stat().st_mtime_ns >= source.stat().st_mtime_ns


def _same_image(image: sitk.Image, path: Path) -> bool:
    """Same pixel type, voxels and grid (NIfTI keeps the geometry in float32: compared in mm)."""
    import SimpleITK as sitk

    try:
        other = sitk.ReadImage(str(path))
    except RuntimeError:
        return False
    return (
        other.GetPixelID() == image.GetPixelID()
        and other.GetSize() == image.GetSize()
        and grid_mismatch(_grid(other), _grid(image)) is None
        and np.array_equal(sitk.GetArrayViewFromImage(other), sitk.GetArrayViewFromImage(image))
    )


def _write_participants(out: Path, cases: list[Case]) -> None:
    """``participants.tsv``: ``participant_id``, ``source_id`` (the case id) and ``region``.

    Rows of an earlier run whose subject folder is still there are kept, so importing 2023 and 2025
    downloads one after the other into one folder lists both. The file is only rewritten when it changes.
    """
    path = out / "participants.tsv"
    rows: dict[str, tuple[str, str]] = {}
    lines = path.read_text(encoding="utf-8").splitlines() if path.exists() else []
    header = lines[0].split("\t") if lines else []
    if header[:1] == ["participant_id"]:
        for line in lines[1:]:
            cells = dict(zip(header, line.split("\t"), strict=False))
            subject = cells.get("participant_id", "")
            if subject and (out / subject).is_dir():
                rows[subject] = (cells.get("source_id", "n/a"), cells.get("region", "n/a"))
    rows.update({f"sub-{case.label}": (case.id, case.region) for case in cases})
    text = "participant_id\tsource_id\tregion\n" + "".join(
        f"{subject}\t{source_id}\t{region}\n" for subject, (source_id, region) in sorted(rows.items())
    )
    if not lines or path.read_text(encoding="utf-8") != text:
        atomic_write_text(path, text)


# ----------------------------------------------------------------------------------------- checking


def validate(source: Path) -> int:
    """Read every case as the import would and list what it would skip or leave out; write nothing."""
    survey = find_cases(source)
    ready = []
    for case in survey.cases:
        try:
            load_case(case)
        except DataError as exc:
            survey.problems.append(str(exc))
            continue
        ready.append(case)
    regions = sorted({case.region for case in ready})
    print(f"SynthRAD download {source}: {len(ready)} MR -> CT cases ready ({', '.join(regions) or 'none'})")
    _print_survey(survey)
    _print_missing_masks(ready, "would be imported")
    if len(ready) < MIN_SUBJECTS:
        print(f"only {len(ready)} usable case(s); training needs at least {MIN_SUBJECTS}")
    return 1 if survey.problems or len(ready) < MIN_SUBJECTS else 0


def _print_survey(survey: Survey, shown: int = 10) -> None:
    for reason, ids in survey.skipped.items():
        more = f", ... ({len(ids) - shown} more)" if len(ids) > shown else ""
        print(f"{len(ids)} {reason}: {', '.join(ids[:shown])}{more}")
    if survey.problems:
        print(f"{len(survey.problems)} case(s) left out:")
        for problem in survey.problems:
            print(f"  {problem}")


def _print_missing_masks(cases: list[Case], verb: str) -> None:
    """One line per case that has no body mask: it is imported without one, which SynthRAD's own
    metrics need (medsynth's evaluation masks by the inputs' foreground and does not read it)."""
    for case in cases:
        if "mask" not in case.files:
            print(f"{case.id}: no mask image in {case.folder}; {verb} without sub-{case.label}_mask.nii.gz")


def main(argv: list[str] | None = None) -> int:
    cli = parser(__doc__.splitlines()[0])
    args = cli.parse_args(argv)
    if args.check:
        return run(lambda: validate(args.source))
    if args.out is None:
        cli.error("give --out DST to convert, or --check to validate")
    return run(lambda: convert(args.source, args.out))


if __name__ == "__main__":
    sys.exit(main())
