"""data_prep scripts on tiny fake downloads with the real IXI / BraTS file names."""

from __future__ import annotations

import hashlib
import importlib
import sys
from pathlib import Path
from types import ModuleType

import nibabel as nib
import numpy as np
import pytest

from medsynth.data.layouts import scan_dataset

DATA_PREP = Path(__file__).resolve().parents[1] / "data_prep"


@pytest.fixture
def scripts(monkeypatch: pytest.MonkeyPatch) -> dict[str, ModuleType]:
    """The scripts imported as `python data_prep/x.py` would see them (their folder on sys.path)."""
    monkeypatch.syspath_prepend(str(DATA_PREP))
    for name in ("ixi", "brats", "_common"):
        sys.modules.pop(name, None)
    return {name: importlib.import_module(name) for name in ("ixi", "brats")}


def write_nifti(path: Path, data: np.ndarray | None = None, affine: np.ndarray | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if data is None:
        data = np.random.default_rng(len(path.name)).random((12, 12, 8), dtype=np.float32) * 100 + 1
    nib.save(nib.Nifti1Image(data, np.eye(4) if affine is None else affine), path)
    return path


def fingerprint(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in folder.rglob("*")
        if p.is_file()
    }


@pytest.fixture
def ixi_download(tmp_path: Path) -> Path:
    source = tmp_path / "ixi"
    for name in ("IXI002-Guys-0828", "IXI012-HH-1211", "IXI013-HH-1212"):
        for kind in ("T1", "T2", "PD"):
            write_nifti(source / f"{name}-{kind}.nii.gz")
    write_nifti(source / "IXI002-Guys-0828-MRA.nii.gz")
    return source


def test_ixi_links_into_bids_without_touching_sources(
    scripts: dict[str, ModuleType], ixi_download: Path, tmp_path: Path
) -> None:
    before = fingerprint(ixi_download)
    out = tmp_path / "bids"

    assert scripts["ixi"].main([str(ixi_download), "--out", str(out)]) == 0
    assert scripts["ixi"].main([str(ixi_download), "--out", str(out)]) == 0  # a rerun is a no-op

    assert fingerprint(ixi_download) == before
    t1 = out / "sub-IXI002Guys0828/anat/sub-IXI002Guys0828_T1w.nii.gz"
    assert t1.is_symlink() and t1.resolve() == (ixi_download / "IXI002-Guys-0828-T1.nii.gz").resolve()
    records = scan_dataset(out)
    assert [(r.id, r.modalities, r.layout) for r in records] == [
        (f"sub-{label}", ("t1", "t2", "pd"), "bids")
        for label in ("IXI002Guys0828", "IXI012HH1211", "IXI013HH1212")
    ]
    assert (out / "participants.tsv").read_text().splitlines()[1] == "sub-IXI002Guys0828\tIXI002-Guys-0828"


def test_copy_makes_real_files_and_refuses_foreign_ones(
    scripts: dict[str, ModuleType], ixi_download: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "bids"
    assert scripts["ixi"].main([str(ixi_download), "--out", str(out), "--copy"]) == 0
    copied = out / "sub-IXI012HH1211/anat/sub-IXI012HH1211_PDw.nii.gz"
    assert not copied.is_symlink()
    assert copied.read_bytes() == (ixi_download / "IXI012-HH-1211-PD.nii.gz").read_bytes()
    assert scripts["ixi"].main([str(ixi_download), "--out", str(out), "--copy"]) == 0

    copied.write_bytes(b"someone else's file")
    assert scripts["ixi"].main([str(ixi_download), "--out", str(out), "--copy"]) == 2
    assert "choose an empty --out folder" in capsys.readouterr().err


def test_check_reports_and_exits_1_when_blocking(
    scripts: dict[str, ModuleType], ixi_download: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert scripts["ixi"].main([str(ixi_download), "--check"]) == 0
    assert "3 subjects x 3 modalities (t2, pd, t1); all paired" in capsys.readouterr().out

    (ixi_download / "IXI013-HH-1212-T1.nii.gz").unlink()
    assert scripts["ixi"].main([str(ixi_download), "--check"]) == 1
    assert "IXI013-HH-1212: no t1 image" in capsys.readouterr().out


def phantom(points_mm: np.ndarray) -> np.ndarray:
    """Two ellipsoids of different brightness: asymmetric, so a rigid fit has one answer."""
    x, y, z = points_mm
    big = ((x - 12) / 7) ** 2 + ((y - 12) / 5) ** 2 + ((z - 10) / 4) ** 2 < 1
    small = ((x - 15) / 2.5) ** 2 + ((y - 9) / 2.5) ** 2 + ((z - 12) / 2) ** 2 < 1
    return (100.0 * big + 80.0 * small).astype(np.float32)


def sample(shape: tuple[int, int, int], affine: np.ndarray, shift_mm: np.ndarray) -> np.ndarray:
    grid = np.indices(shape).reshape(3, -1).astype(np.float64)
    world = affine[:3, :3] @ grid + affine[:3, 3:4]
    return phantom(world + shift_mm[:, None]).reshape(shape)


def test_register_puts_t1_on_the_t2_grid(scripts: dict[str, ModuleType], tmp_path: Path) -> None:
    t2_affine = np.eye(4)
    t1_affine = np.diag([1.25, 1.25, 1.25, 1.0])
    t1_affine[:3, 3] = (-3.0, -3.0, -2.0)
    t2 = sample((24, 24, 20), t2_affine, np.zeros(3))
    source = tmp_path / "ixi"
    write_nifti(source / "IXI002-Guys-0828-T2.nii.gz", t2, t2_affine)
    write_nifti(source / "IXI002-Guys-0828-PD.nii.gz", t2, t2_affine)
    # The T1 sees the head 2 mm further along x: its header alone does not line it up with T2.
    t1 = 150.0 - sample((24, 24, 20), t1_affine, np.array([2.0, 0.0, 0.0]))
    write_nifti(source / "IXI002-Guys-0828-T1.nii.gz", t1, t1_affine)
    out = tmp_path / "bids"

    assert scripts["ixi"].main([str(source), "--out", str(out), "--register"]) == 0

    registered = nib.load(out / "sub-IXI002Guys0828/anat/sub-IXI002Guys0828_T1w.nii.gz")
    assert not Path(registered.get_filename()).is_symlink()
    assert registered.shape == t2.shape
    np.testing.assert_allclose(registered.affine, t2_affine, atol=1e-5)
    correlation = np.corrcoef(registered.get_fdata().ravel(), t2.ravel())[0, 1]
    assert correlation < -0.9  # inverted contrast, same place (resampling by header alone gives -0.80)


def test_brats_links_the_four_contrasts_and_skips_seg(scripts: dict[str, ModuleType], tmp_path: Path) -> None:
    source = tmp_path / "BraTS2023"
    for subject in ("BraTS-GLI-00000-000", "BraTS-GLI-00002-000", "BraTS-GLI-00003-001"):
        for suffix in ("t1n", "t1c", "t2w", "t2f", "seg"):
            write_nifti(source / subject / f"{subject}-{suffix}.nii.gz")
    before = fingerprint(source)
    out = tmp_path / "bids"

    assert scripts["brats"].main([str(source), "--check"]) == 0
    assert scripts["brats"].main([str(source), "--out", str(out)]) == 0

    assert fingerprint(source) == before
    records = scan_dataset(out)
    assert [r.id for r in records] == ["sub-BraTSGLI00000000", "sub-BraTSGLI00002000", "sub-BraTSGLI00003001"]
    assert {r.modalities for r in records} == {("t1", "t2", "flair", "t1c")}
    assert not list(out.rglob("*seg*"))


def test_wrong_download_and_missing_out(
    scripts: dict[str, ModuleType], ixi_download: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert scripts["brats"].main([str(ixi_download), "--out", str(tmp_path / "out")]) == 2
    assert "found the ixi layout here, not brats" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        scripts["ixi"].main([str(ixi_download)])
    assert exit_info.value.code == 2
