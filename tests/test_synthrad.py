"""data_prep/synthrad.py on tiny SynthRAD2023 (NIfTI) and SynthRAD2025 (MetaImage) downloads built here."""

from __future__ import annotations

import hashlib
import importlib
import os
import sys
from pathlib import Path
from types import ModuleType

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from medsynth.data.check import check_dataset
from medsynth.data.layouts import scan_dataset
from medsynth.io.geometry import affine_from_itk
from medsynth.io.readers import read_volume

DATA_PREP = Path(__file__).resolve().parents[1] / "data_prep"
SIZE = (12, 10, 8)  # x, y, z voxels (SimpleITK order); arrays are [z, y, x]
SPACING = (0.9, 1.1, 2.5)
ORIGIN = (-51.3, 22.7, 103.9)


def rotation(degrees_z: float, degrees_x: float) -> tuple[float, ...]:
    """An oblique, non-identity direction (rotations about z then x), row-major as ITK wants it."""
    a, b = np.radians(degrees_z), np.radians(degrees_x)
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    return tuple((rz @ rx).ravel().tolist())


DIRECTION = rotation(30.0, 10.0)


def image(array: np.ndarray, origin: tuple[float, ...] = ORIGIN, spacing: tuple[float, ...] = SPACING):
    result = sitk.GetImageFromArray(array)
    result.SetSpacing(spacing)
    result.SetOrigin(origin)
    result.SetDirection(DIRECTION)
    return result


def body(seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """CT in HU (air -1000, tissue ~40, a bone blob at 1000+), a T1-like MR and the body mask."""
    z, y, x = np.indices(SIZE[::-1])
    inside = ((x - 5.5) / 5) ** 2 + ((y - 4.5) / 4) ** 2 < 1
    bone = ((x - 4 - seed % 3) / 2) ** 2 + ((y - 4) / 1.5) ** 2 + ((z - 4) / 2) ** 2 < 1
    rng = np.random.default_rng(seed)
    ct = np.where(inside, 40 + rng.integers(-20, 20, SIZE[::-1]), -1000)
    ct = np.where(bone, 1000 + 5 * seed, ct).astype(np.int16)
    mr = np.where(inside, 300 + 50 * rng.random(SIZE[::-1]), 2 * rng.random(SIZE[::-1]))
    mr = np.where(bone, 30.0, mr).astype(np.float32)
    return ct, mr, inside.astype(np.uint8)


def write_case(
    folder: Path, seed: int, ending: str, *, kinds: tuple[str, ...] = ("mr", "ct", "mask")
) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    ct, mr, mask = body(seed)
    arrays = {"ct": ct, "mr": mr, "mask": mask, "cbct": (ct + 7).astype(np.int16)}
    for kind in kinds:
        sitk.WriteImage(image(arrays[kind]), str(folder / f"{kind}{ending}"), useCompression=True)
    return folder


@pytest.fixture
def synthrad(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    """The script imported as `python data_prep/synthrad.py` would see it (its folder on sys.path)."""
    monkeypatch.syspath_prepend(str(DATA_PREP))
    for name in ("synthrad", "_common"):
        sys.modules.pop(name, None)
    return importlib.import_module("synthrad")


@pytest.fixture
def download(tmp_path: Path) -> Path:
    """Both releases side by side: 2023 ships NIfTI per case, 2025 MetaImage plus an overviews folder."""
    root = tmp_path / "synthrad"
    write_case(root / "2023/Task1/brain/1BA001", 1, ".nii.gz")
    write_case(root / "2023/Task1/pelvis/1PA004", 2, ".nii.gz")
    write_case(root / "2023/Task2/brain/2BA001", 3, ".nii.gz", kinds=("cbct", "ct", "mask"))
    write_case(root / "2025/synthRAD2025_Task1_Train/Task1/HN/1HNA001", 4, ".mha")
    write_case(root / "2025/synthRAD2025_Task1_Train/Task1/AB/1ABA005", 5, ".mha")
    overviews = root / "2025/synthRAD2025_Task1_Train/Task1/HN/overviews"
    overviews.mkdir()
    (overviews / "1HNA001_overview.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    (overviews / "1_HN_train_parameters.xlsx").write_bytes(b"PK\x03\x04")
    write_case(root / "2025/synthRAD2025_Task1_Val_Input/Task1/HN/1HNA002", 6, ".mha", kinds=("mr", "mask"))
    return root


CASES = {  # case id -> (source folder below the download, ending, region)
    "1BA001": ("2023/Task1/brain/1BA001", ".nii.gz", "brain"),
    "1PA004": ("2023/Task1/pelvis/1PA004", ".nii.gz", "pelvis"),
    "1HNA001": ("2025/synthRAD2025_Task1_Train/Task1/HN/1HNA001", ".mha", "HN"),
    "1ABA005": ("2025/synthRAD2025_Task1_Train/Task1/AB/1ABA005", ".mha", "AB"),
}


def fingerprint(folder: Path) -> dict[str, tuple[str, int]]:
    return {
        str(p.relative_to(folder)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def test_converts_2023_and_2025_cases_exactly(
    synthrad: ModuleType, download: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    before = fingerprint(download)
    out = tmp_path / "bids"

    assert synthrad.main([str(download), "--out", str(out)]) == 0

    assert fingerprint(download) == before
    printed = capsys.readouterr().out
    assert "1 CBCT -> CT (task 2) case(s) skipped, medsynth has no cbct modality: 2BA001" in printed
    assert (
        "1 case(s) without a ct image skipped (validation/test inputs: the CT is withheld): 1HNA002"
        in printed
    )
    assert "; all paired" in printed  # medsynth data check of the output, at the end of the import
    for case, (folder, ending, _) in CASES.items():
        anat = out / f"sub-{case}/anat"
        assert sorted(p.name for p in anat.iterdir()) == [
            f"sub-{case}_CT.nii.gz",
            f"sub-{case}_T1w.nii.gz",
            f"sub-{case}_mask.nii.gz",
        ]
        for kind, suffix, dtype in (
            ("mr", "T1w", np.float32),
            ("ct", "CT", np.int16),
            ("mask", "mask", np.uint8),
        ):
            source = sitk.ReadImage(str(download / folder / f"{kind}{ending}"))
            written = read_volume(anat / f"sub-{case}_{suffix}.nii.gz")
            expected = sitk.GetArrayFromImage(source).transpose(2, 1, 0)
            np.testing.assert_array_equal(written.array, expected.astype(np.float32))
            itk_affine = affine_from_itk(source.GetSpacing(), source.GetOrigin(), source.GetDirection())
            np.testing.assert_allclose(written.affine, itk_affine, rtol=0, atol=1e-4)  # float32 header
            np.testing.assert_allclose(written.spacing, SPACING, rtol=0, atol=1e-5)
            assert nib.load(anat / f"sub-{case}_{suffix}.nii.gz").get_data_dtype() == dtype
    assert written.orientation != "RAS"  # the oblique direction went through, not an identity
    assert (out / "participants.tsv").read_text().splitlines() == [
        "participant_id\tsource_id\tregion",
        "sub-1ABA005\t1ABA005\tAB",
        "sub-1BA001\t1BA001\tbrain",
        "sub-1HNA001\t1HNA001\tHN",
        "sub-1PA004\t1PA004\tpelvis",
    ]
    records = scan_dataset(out)
    assert [(r.id, r.modalities, r.layout) for r in records] == [
        (f"sub-{case}", ("t1", "ct"), "bids") for case in sorted(CASES)
    ]
    report = check_dataset(out, modalities=("t1", "ct"))
    assert not report.problems, report.render()


def test_rerun_is_a_no_op_even_when_sources_look_newer(
    synthrad: ModuleType, download: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "bids"
    assert synthrad.main([str(download), "--out", str(out)]) == 0
    written = fingerprint(out)

    assert synthrad.main([str(download), "--out", str(out)]) == 0
    assert fingerprint(out) == written
    assert "(4 already there, 0 files written)" in capsys.readouterr().out

    # Extracting the download again makes its files newer: same images, so nothing is rewritten.
    later = max(mtime for _, mtime in written.values()) + 10**9
    for path in download.rglob("*.*"):
        os.utime(path, ns=(later, later))
    assert synthrad.main([str(download), "--out", str(out)]) == 0
    assert fingerprint(out) == written

    # A newer source holding another image is not silently overwritten over an older output.
    ct, _, _ = body(1)
    changed = download / CASES["1BA001"][0] / "ct.nii.gz"
    sitk.WriteImage(image((ct + 1).astype(np.int16)), str(changed))
    capsys.readouterr()
    assert synthrad.main([str(download), "--out", str(out)]) == 1
    assert f"sub-1BA001_CT.nii.gz: already exists, is older than {changed}" in capsys.readouterr().out
    assert fingerprint(out) == written


def broken_download(root: Path) -> dict[str, Path]:
    """Three good 2025 cases, one MR off the CT grid and one CT not in Hounsfield units."""
    for n, case in enumerate(("1HNA001", "1HNA003", "1THA001")):
        write_case(root / "Task1" / case[1:3] / case, n, ".mha")
    shifted = write_case(root / "Task1/TH/1THA002", 7, ".mha")
    _, mr, _ = body(7)
    sitk.WriteImage(image(mr, origin=(ORIGIN[0] + 2.0, *ORIGIN[1:])), str(shifted / "mr.mha"))
    unsigned = write_case(root / "Task1/AB/1ABA009", 8, ".mha")
    ct, _, _ = body(8)
    sitk.WriteImage(image((ct + 1024).astype(np.uint16)), str(unsigned / "ct.mha"))
    return {"grid": shifted / "mr.mha", "hu": unsigned / "ct.mha"}


def test_mismatched_grid_and_non_hu_ct_are_reported_and_left_out(
    synthrad: ModuleType, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = broken_download(tmp_path / "synthrad")
    out = tmp_path / "bids"

    assert synthrad.main([str(tmp_path / "synthrad"), "--out", str(out)]) == 1

    lines = capsys.readouterr().out.splitlines()
    assert "2 case(s) left out:" in lines
    grid = [line for line in lines if str(bad["grid"]) in line]
    assert len(grid) == 1 and "is not on the grid of ct.mha (grids differ by up to 2 mm" in grid[0]
    hu = [line for line in lines if str(bad["hu"]) in line]
    assert len(hu) == 1 and "is not a CT in Hounsfield units (0.5th percentile 24" in hu[0]
    assert sorted(p.name for p in out.glob("sub-*")) == ["sub-1HNA001", "sub-1HNA003", "sub-1THA001"]
    assert "1THA002" not in (out / "participants.tsv").read_text()
    assert not check_dataset(out, modalities=("t1", "ct")).blocking


def test_check_validates_and_writes_nothing(
    synthrad: ModuleType, download: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    before = fingerprint(download)
    out = tmp_path / "bids"

    assert synthrad.main([str(download), "--check", "--out", str(out)]) == 0
    assert "4 MR -> CT cases ready (AB, HN, brain, pelvis)" in capsys.readouterr().out

    bad = broken_download(tmp_path / "broken")
    assert synthrad.main([str(tmp_path / "broken"), "--check"]) == 1
    printed = capsys.readouterr().out
    assert "3 MR -> CT cases ready" in printed
    assert str(bad["grid"]) in printed and str(bad["hu"]) in printed
    assert not out.exists()
    assert fingerprint(download) == before


def test_float_ct_with_fractions_stays_float32(synthrad: ModuleType, tmp_path: Path) -> None:
    source = tmp_path / "synthrad"
    for n, case in enumerate(("1BA001", "1BA002", "1BA003")):
        write_case(source / "Task1/brain" / case, n, ".nii.gz")
    ct, _, _ = body(0)
    resampled = ct.astype(np.float32) + 0.25
    sitk.WriteImage(image(resampled), str(source / "Task1/brain/1BA001/ct.nii.gz"))
    out = tmp_path / "bids"

    assert synthrad.main([str(source), "--out", str(out)]) == 0

    written = out / "sub-1BA001/anat/sub-1BA001_CT.nii.gz"
    assert nib.load(written).get_data_dtype() == np.float32
    np.testing.assert_array_equal(read_volume(written).array, resampled.transpose(2, 1, 0))
    assert nib.load(out / "sub-1BA002/anat/sub-1BA002_CT.nii.gz").get_data_dtype() == np.int16


def test_user_mistakes_are_one_line_errors(
    synthrad: ModuleType, download: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    assert synthrad.main([str(empty), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {empty}: no SynthRAD case folders found") and "\n" not in err

    assert synthrad.main([str(download), "--out", str(download / "bids")]) == 2
    assert "is inside the download, which is never modified" in capsys.readouterr().err
    assert not (download / "bids").exists()

    with pytest.raises(SystemExit) as exit_info:
        synthrad.main([str(download)])
    assert exit_info.value.code == 2


def test_a_truncated_mha_is_named_as_truncated(
    synthrad: ModuleType, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Issue 31, item 16: ITK's stale "No such file or directory" was the reason given for a cut-off file."""
    source = tmp_path / "synthrad"
    for n, case in enumerate(("1HNA001", "1HNA002", "1HNA003", "1HNA004")):
        write_case(source / "Task1/HN" / case, n, ".mha")
    cut = source / "Task1/HN/1HNA002/ct.mha"
    cut.write_bytes(cut.read_bytes()[: cut.stat().st_size // 2])

    for argv in (["--check"], ["--out", str(tmp_path / "bids")]):
        assert synthrad.main([str(source), *argv]) == 1
        named = [line for line in capsys.readouterr().out.splitlines() if str(cut) in line]
        assert len(named) == 1 and "truncated" in named[0] and "No such file" not in named[0], named


def test_a_case_without_a_mask_is_said_once(
    synthrad: ModuleType, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Issue 31, item 16: a case without its body mask was imported without a word."""
    source = tmp_path / "synthrad"
    for n, case in enumerate(("1HNA001", "1HNA002", "1HNA003")):
        write_case(
            source / "Task1/HN" / case, n, ".mha", kinds=("mr", "ct") if n == 1 else ("mr", "ct", "mask")
        )
    out = tmp_path / "bids"

    for argv in (["--check"], ["--out", str(out)]):
        assert synthrad.main([str(source), *argv]) == 0
        said = [line for line in capsys.readouterr().out.splitlines() if "no mask" in line]
        assert (
            said == [line for line in said if line.startswith("1HNA002: no mask image in ")]
            and len(said) == 1
        )
    assert not (out / "sub-1HNA002/anat/sub-1HNA002_mask.nii.gz").exists()
    assert (out / "sub-1HNA002/anat/sub-1HNA002_CT.nii.gz").exists()
