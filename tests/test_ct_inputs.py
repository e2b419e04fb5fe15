"""Bad CT input is one line naming the file and the fix: not HU, an MR given as the CT, another grid.

Every case is a real NIfTI cohort written here with nibabel, read through the same paths training,
evaluation (:func:`load_subject`) and ``medsynth data check`` use.
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medsynth.cli import main
from medsynth.data.check import check_dataset
from medsynth.data.layouts import load_subject, scan_dataset
from medsynth.errors import DataError, GeometryError

SHAPE = (24, 24, 16)
AFFINE = np.array([[2.0, 0, 0, -24], [0, 2.0, 0, -24], [0, 0, 3.0, -24], [0, 0, 0, 1]])
NOT_HU = "looks like an MR or an uncalibrated CT"
INTERCEPT = "apply the rescale intercept (usually -1024)"
OFF_GRID = "resample or register the CT onto the t1 grid first"


def head_ct() -> np.ndarray:
    """A head in HU: brain (30) inside a skull (1600), air (-1000) around it, as int16."""
    i, j, k = np.meshgrid(*(np.arange(n) - (n - 1) / 2 for n in SHAPE), indexing="ij")
    radius = np.sqrt(i**2 + j**2 + (k * 1.5) ** 2)
    ct = np.where(radius < 9, 30, np.where(radius < 10.5, 1600, -1000))
    noise = np.random.default_rng(0).normal(0, 10, SHAPE)
    return np.round(ct + noise).astype(np.int16)


def mr() -> np.ndarray:
    return (np.random.default_rng(1).random(SHAPE, dtype=np.float32) * 100 + 1).astype(np.float32)


def save(path: Path, array: np.ndarray, affine: np.ndarray = AFFINE) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = nib.Nifti1Image(array, affine)
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    nib.save(image, path)
    return path


def cohort(root: Path, bad: str | None = None, n_subjects: int = 3) -> Path:
    """``n_subjects`` with a T1w and a CT on one grid; sub-02's CT is replaced by the ``bad`` case.

    ``uncalibrated``: stored values 0..4095 (HU + 1024) without a rescale intercept; ``mr``: the T1w
    written as the CT; ``grid``: the right CT shifted by 1.5 mm (same anatomy, another grid).
    """
    for n in range(1, n_subjects + 1):
        anat = root / f"sub-{n:02d}" / "anat"
        save(anat / f"sub-{n:02d}_T1w.nii.gz", mr())
        ct, affine = head_ct(), AFFINE
        if n == 2 and bad == "uncalibrated":
            ct = np.clip(ct.astype(np.int32) + 1024, 0, 4095).astype(np.uint16)
        elif n == 2 and bad == "mr":
            ct = mr()
        elif n == 2 and bad == "grid":
            affine = AFFINE.copy()
            affine[0, 3] += 1.5
        save(anat / f"sub-{n:02d}_CT.nii.gz", ct, affine)
    return root


def record(root: Path, subject: str = "sub-02"):
    return next(r for r in scan_dataset(root) if r.id == subject)


def ct_path(root: Path, subject: str = "sub-02") -> Path:
    return root / subject / "anat" / f"{subject}_CT.nii.gz"


# ------------------------------------------------------------------------------- load_subject
def test_a_ct_in_hu_on_the_mr_grid_loads_untouched(tmp_path: Path) -> None:
    root = cohort(tmp_path)
    loaded = load_subject(record(root), ["t1", "ct"])
    np.testing.assert_array_equal(loaded["ct"].array, head_ct().astype(np.float32))
    np.testing.assert_allclose(loaded["ct"].affine, AFFINE)
    assert "resampled_to" not in loaded["ct"].meta


@pytest.mark.parametrize(
    ("bad", "modalities"),
    [("uncalibrated", ["t1", "ct"]), ("mr", ["t1", "ct"]), ("mr", ["ct", "t1"]), ("uncalibrated", ["ct"])],
)
def test_a_ct_without_air_at_minus_1000_is_refused(bad: str, modalities: list[str], tmp_path: Path) -> None:
    root = cohort(tmp_path, bad)
    with pytest.raises(DataError) as caught:
        load_subject(record(root), modalities)
    message = str(caught.value)
    assert message.startswith(f"{ct_path(root)}: is not a CT in Hounsfield units")
    assert NOT_HU in message and INTERCEPT in message and "sub-02" in message and "\n" not in message


@pytest.mark.parametrize("modalities", [["t1", "ct"], ["ct", "t1"]])
def test_a_ct_on_another_grid_is_refused_not_resampled(modalities: list[str], tmp_path: Path) -> None:
    root = cohort(tmp_path, "grid")
    with pytest.raises(GeometryError) as caught:
        load_subject(record(root), modalities)
    message = str(caught.value)
    assert message.startswith(f"{ct_path(root)}: the CT is not on the grid of the t1 image")
    assert str(root / "sub-02" / "anat" / "sub-02_T1w.nii.gz") in message
    assert OFF_GRID in message and "grids differ by up to 1.5 mm" in message and "\n" not in message


def test_mr_pairs_on_another_grid_are_still_resampled(tmp_path: Path) -> None:
    root = cohort(tmp_path)
    shifted = AFFINE.copy()
    shifted[0, 3] += 1.5
    save(root / "sub-02" / "anat" / "sub-02_T2w.nii.gz", mr(), shifted)
    loaded = load_subject(record(root), ["t1", "t2", "ct"])
    assert loaded["t2"].meta["resampled_to"].endswith("sub-02_T1w.nii.gz")
    np.testing.assert_allclose(loaded["t2"].affine, AFFINE)


# ---------------------------------------------------------------------------------- data check
@pytest.mark.parametrize(
    ("bad", "status", "phrases"),
    [
        ("uncalibrated", "not HU", (NOT_HU, INTERCEPT)),
        ("mr", "not HU", (NOT_HU, INTERCEPT)),
        ("grid", "off grid", (OFF_GRID,)),
    ],
)
def test_data_check_lists_the_bad_ct(
    bad: str, status: str, phrases: tuple[str, ...], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = cohort(tmp_path, bad)
    report = check_dataset(root, modalities=["t1", "ct"])
    assert [(p.subject, p.modality, p.blocking) for p in report.problems] == [("sub-02", "ct", True)]
    statuses = {(s.id, f.modality): f.status for s in report.subjects for f in s.files}
    assert statuses[("sub-02", "ct")] == status and statuses[("sub-01", "ct")] == "ok"

    assert main(["data", "check", str(root), "--modalities", "t1,ct"]) == 1
    out = capsys.readouterr().out
    line = next(line for line in out.splitlines() if line.startswith("  [blocking] sub-02 ct:"))
    assert str(ct_path(root)) in line and all(phrase in line for phrase in phrases), line
    assert out.rstrip().endswith("1 problem (1 blocking training)")


def test_data_check_passes_a_good_ct_cohort(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = cohort(tmp_path)
    assert main(["data", "check", str(root), "--modalities", "t1,ct"]) == 0
    assert capsys.readouterr().out.rstrip().endswith("3 subjects x 2 modalities (t1, ct); all paired")


# ---------------------------------------------------------------------------------------- train
@pytest.mark.parametrize(
    ("bad", "phrases"),
    [("uncalibrated", (NOT_HU, INTERCEPT)), ("mr", (NOT_HU, INTERCEPT)), ("grid", (OFF_GRID,))],
)
def test_training_on_a_bad_ct_is_one_line(
    bad: str, phrases: tuple[str, ...], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = cohort(tmp_path / "data", bad)
    runs = str(tmp_path / "runs")
    options = ["--config", "demo_cpu", "--set", "data.val=1", "--set", "data.test=1", "--quiet"]
    code = main(["train", "t1->ct", "--data", str(root), "--runs-dir", runs, *options])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.startswith(f"error: {ct_path(root)}: ") and "\n" not in err, err
    assert all(phrase in err for phrase in phrases) and "Traceback" not in err
