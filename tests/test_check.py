"""``data check``: every file is read, every problem is listed, and the verdict is right."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medsynth.data.check import check_dataset
from medsynth.errors import DataError


def write_nifti(path: Path, offset_mm: float = 0.0, shape: tuple[int, int, int] = (16, 16, 12)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    affine = np.diag([1.0, 1.0, 2.0, 1.0])
    affine[0, 3] = offset_mm
    data = np.random.default_rng(0).random(shape, dtype=np.float32) * 100 + 1
    nib.save(nib.Nifti1Image(data, affine), path)
    return path


def make_cohort(root: Path, n_subjects: int, modalities: tuple[str, ...] = ("T1w", "T2w")) -> None:
    for n in range(1, n_subjects + 1):
        for suffix in modalities:
            write_nifti(root / f"sub-{n:02d}/anat/sub-{n:02d}_{suffix}.nii.gz")


def test_clean_cohort_is_all_paired(tmp_path: Path) -> None:
    make_cohort(tmp_path, 3, ("T1w", "T2w", "FLAIR"))

    report = check_dataset(tmp_path)

    assert not report.blocking
    assert report.summary() == "3 subjects x 3 modalities (t1, t2, flair); all paired"
    text = report.render()
    assert text.splitlines()[1].split() == [
        "subject",
        "modality",
        "shape",
        "spacing",
        "(mm)",
        "orient",
        "status",
    ]
    assert "sub-03   t1        16x16x12  1.00x1.00x2.00  RAS     ok" in text
    assert text.endswith("all paired")


def test_every_problem_is_listed_not_just_the_first(tmp_path: Path) -> None:
    make_cohort(tmp_path, 5)
    corrupt = tmp_path / "sub-02/anat/sub-02_T2w.nii.gz"
    corrupt.write_bytes(b"not a nifti file at all")
    write_nifti(tmp_path / "sub-03/anat/sub-03_T2w.nii.gz", offset_mm=900.0)  # another place entirely
    write_nifti(tmp_path / "sub-04/anat/sub-04_T2w.nii.gz", offset_mm=1.5)  # same anatomy, other grid
    (tmp_path / "sub-05/anat/sub-05_T1w.nii.gz").write_bytes(b"\x1f\x8b truncated")

    report = check_dataset(tmp_path)

    found = {(p.subject, p.modality, p.blocking) for p in report.problems}
    assert found == {
        ("sub-02", "t2", True),
        ("sub-03", "t2", True),
        ("sub-04", "t2", False),
        ("sub-05", "t1", True),
    }
    assert report.blocking
    statuses = {(s.id, f.modality): f.status for s in report.subjects for f in s.files}
    assert statuses[("sub-02", "t2")] == "unreadable"
    assert statuses[("sub-03", "t2")] == "disjoint"
    assert statuses[("sub-04", "t2")] == "resampled"
    assert statuses[("sub-01", "t2")] == "ok"
    text = report.render()
    assert str(corrupt) in text
    assert "4 problems (3 blocking training)" in text


def test_missing_modality_blocks_only_when_requested(tmp_path: Path) -> None:
    make_cohort(tmp_path, 3)
    write_nifti(tmp_path / "sub-01/anat/sub-01_PDw.nii.gz")

    relaxed = check_dataset(tmp_path)
    strict = check_dataset(tmp_path, modalities=["pd", "T1w"])

    assert not relaxed.blocking
    assert [(p.subject, p.message) for p in relaxed.problems] == [
        ("sub-02", "no pd image"),
        ("sub-03", "no pd image"),
    ]
    assert strict.blocking and strict.modalities == ("pd", "t1")
    assert strict.summary() == "3 subjects x 2 modalities (pd, t1); 2 problems (2 blocking training)"


def test_grids_are_compared_with_the_first_requested_modality(tmp_path: Path) -> None:
    make_cohort(tmp_path, 3)
    write_nifti(tmp_path / "sub-01/anat/sub-01_T1w.nii.gz", offset_mm=900.0)

    report = check_dataset(tmp_path, modalities=["t2", "t1"])

    (problem,) = report.problems
    assert (problem.subject, problem.modality, problem.blocking) == ("sub-01", "t1", True)
    assert "t2 field of view" in problem.message


def test_too_few_subjects_is_blocking(tmp_path: Path) -> None:
    make_cohort(tmp_path, 2)
    report = check_dataset(tmp_path)
    assert report.blocking
    assert "only 2 subject(s)" in report.render()


def test_to_dict_is_json(tmp_path: Path) -> None:
    make_cohort(tmp_path, 3)
    data = json.loads(json.dumps(check_dataset(tmp_path).to_dict()))
    assert data["layout"] == "bids" and data["blocking"] is False
    assert data["subjects"][0]["files"][0] == {
        "modality": "t1",
        "path": str(tmp_path / "sub-01/anat/sub-01_T1w.nii.gz"),
        "shape": [16, 16, 12],
        "spacing": [1.0, 1.0, 2.0],
        "orientation": "RAS",
        "status": "ok",
    }


def test_no_dataset_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="looked for these layouts"):
        check_dataset(tmp_path)


def test_subjects_with_spaces_or_accents_are_checked_not_dropped(tmp_path: Path) -> None:
    for subject in ("sub-01", "sub-0 2é", "sub-Ünï"):
        for suffix in ("T1w", "T2w"):
            write_nifti(tmp_path / subject / "anat" / f"{subject}_{suffix}.nii.gz")

    report = check_dataset(tmp_path)

    assert sorted(s.id for s in report.subjects) == ["sub-0 2é", "sub-01", "sub-Ünï"]
    assert not report.blocking and report.summary().endswith("all paired")


@pytest.mark.parametrize("value", [0.0, 7.5])
def test_constant_volume_is_blocking(tmp_path: Path, value: float) -> None:
    make_cohort(tmp_path, 3)
    blank = tmp_path / "sub-02/anat/sub-02_T2w.nii.gz"
    nib.save(nib.Nifti1Image(np.full((16, 16, 12), value, np.float32), np.diag([1.0, 1.0, 2.0, 1.0])), blank)

    report = check_dataset(tmp_path)

    assert report.blocking
    (problem,) = report.problems
    assert (problem.subject, problem.modality, problem.blocking) == ("sub-02", "t2", True)
    assert f"is constant (every voxel is {value:g})" in problem.message and str(blank) in problem.message
    status = {(s.id, f.modality): f.status for s in report.subjects for f in s.files}
    assert status[("sub-02", "t2")] == "constant"
