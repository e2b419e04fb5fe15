"""The demo cohort: layout, geometry, determinism, tissue contrast per sequence, DICOM export, overview."""

from __future__ import annotations

import json
import math
import socket
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest

from medsynth.data import demo
from medsynth.errors import MedsynthError
from medsynth.io.volume import Volume

SPACING = 6.0  # 33 x 39 x 32 voxels: the whole cohort is written in about a second
SUFFIXES = ("T1w", "T2w", "PDw", "FLAIR")
MNI_AFFINE = np.array([[1.0, 0, 0, -98], [0, 1, 0, -134], [0, 0, 1, -72], [0, 0, 0, 1]])
MNI_SHAPE = (197, 233, 189)


def _no_network(*args: object, **kwargs: object) -> None:
    raise AssertionError("the demo cohort tried to open a network connection")


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path]]:
    """Two subjects with DICOM, built from freshly loaded templates while sockets are blocked."""
    out = tmp_path_factory.mktemp("demo") / "cohort"
    demo._anatomy_1mm.cache_clear()
    demo.anatomy.cache_clear()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(socket.socket, "connect", _no_network)
        subjects = demo.make_demo_cohort(
            out, n_subjects=2, spacing_mm=SPACING, seed=7, dicom=True, progress=False
        )
    return out, subjects


def _load(path: Path) -> tuple[np.ndarray, np.ndarray]:
    image = nib.load(path)
    return np.asarray(image.dataobj), image.affine


def test_layout_geometry_and_pairing(cohort: tuple[Path, list[Path]]) -> None:
    out, subjects = cohort
    assert subjects == [out / "sub-01", out / "sub-02"]
    expected_shape = tuple(math.ceil(n / SPACING) for n in MNI_SHAPE)
    expected_affine = MNI_AFFINE @ np.diag([SPACING, SPACING, SPACING, 1.0])
    for subject in subjects:
        for suffix in SUFFIXES:
            array, affine = _load(subject / "anat" / f"{subject.name}_{suffix}.nii.gz")
            assert array.dtype == np.float32
            assert array.shape == expected_shape
            np.testing.assert_allclose(affine, expected_affine)
            assert np.isfinite(array).all() and array.min() >= 0 and array.max() > 0
    sidecar = json.loads((out / "sub-01" / "anat" / "sub-01_FLAIR.json").read_text())
    assert sidecar["MagneticFieldStrength"] == 3.0 and 2.0 < sidecar["InversionTime"] < 3.0
    assert json.loads((out / "dataset_description.json").read_text())["Name"] == demo.DATASET_NAME
    rows = (out / "participants.tsv").read_text().splitlines()
    assert rows[0].startswith("participant_id\t") and [r.split("\t")[0] for r in rows[1:]] == [
        "sub-01",
        "sub-02",
    ]
    assert (out / "overview.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(out.rglob(".*"))  # no temporary files left behind


def test_files_hold_the_seeded_simulation_and_subjects_differ(cohort: tuple[Path, list[Path]]) -> None:
    out, _ = cohort
    written, _ = _load(out / "sub-02" / "anat" / "sub-02_T2w.nii.gz")
    again, _ = demo.simulate_subject(1, SPACING, seed=7)
    np.testing.assert_array_equal(written, again["t2"].array)
    other_seed, _ = demo.simulate_subject(1, SPACING, seed=8)
    other_subject, _ = _load(out / "sub-01" / "anat" / "sub-01_T2w.nii.gz")
    assert not np.allclose(written, other_seed["t2"].array)
    assert not np.allclose(written, other_subject)


@pytest.mark.parametrize("seed", [0, 1])
def test_tissue_contrast_matches_each_sequence(seed: int) -> None:
    fractions = demo.anatomy(SPACING).fractions
    masks = {name: fractions[demo.TISSUE_INDEX[name]] > 0.8 for name in ("csf", "gm", "wm")}
    volumes, _ = demo.simulate_subject(0, SPACING, seed=seed)
    mean = {m: {t: float(v.array[mask].mean()) for t, mask in masks.items()} for m, v in volumes.items()}
    assert mean["t1"]["wm"] > mean["t1"]["gm"] > mean["t1"]["csf"]
    assert mean["t2"]["csf"] > mean["t2"]["gm"] > mean["t2"]["wm"]
    assert mean["pd"]["gm"] > mean["pd"]["wm"]
    assert mean["pd"]["gm"] / mean["pd"]["wm"] < 1.4  # proton density weighting: low contrast
    assert mean["flair"]["gm"] > mean["flair"]["wm"] > mean["flair"]["csf"]


def test_flair_inversion_time_nulls_csf() -> None:
    flair = demo.SEQUENCES[-1]
    csf = demo.TISSUES[demo.TISSUE_INDEX["csf"]]
    signal = flair.signal(np.array([csf.t1_ms]), np.array([csf.t2_ms]), np.array([csf.pd]))
    assert abs(signal[0]) < 1e-3


def test_dicom_series_share_one_study_per_subject(cohort: tuple[Path, list[Path]]) -> None:
    out, _ = cohort
    study_uids = []
    for subject in ("sub-01", "sub-02"):
        folders = sorted((out / "dicom" / subject).iterdir())
        assert [f.name for f in folders] == ["01_T1w", "02_T2w", "03_PDw", "04_FLAIR"]
        headers = [pydicom.dcmread(sorted(f.iterdir())[0], stop_before_pixels=True) for f in folders]
        assert [h.SeriesDescription for h in headers] == ["T1w SE", "T2w TSE", "PD", "FLAIR"]
        assert {h.PatientID for h in headers} == {f"DEMO-{subject[4:]}"}
        assert len({h.StudyInstanceUID for h in headers}) == 1
        assert len({h.SeriesInstanceUID for h in headers}) == 4
        assert all(len(list(f.iterdir())) == math.ceil(MNI_SHAPE[2] / SPACING) for f in folders)
        study_uids.append(headers[0].StudyInstanceUID)
    assert study_uids[0] != study_uids[1]


def test_refuses_a_non_empty_folder_and_bad_arguments(tmp_path: Path) -> None:
    (tmp_path / "mine.txt").write_text("user data")
    with pytest.raises(MedsynthError, match="not empty"):
        demo.make_demo_cohort(tmp_path, n_subjects=1, spacing_mm=SPACING, progress=False)
    assert (tmp_path / "mine.txt").read_text() == "user data"
    with pytest.raises(MedsynthError, match="1 to 8 mm"):
        demo.make_demo_cohort(tmp_path / "new", spacing_mm=0.5, progress=False)
    with pytest.raises(MedsynthError, match="positive integer"):
        demo.make_demo_cohort(tmp_path / "new", n_subjects=0, progress=False)
    assert not (tmp_path / "new").exists()


def test_overview_from_volumes_in_any_orientation(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    lps_affine = np.diag([-2.0, -2.0, 3.0, 1.0])
    volumes = {m: Volume(rng.random((12, 10, 8)), lps_affine) for m in ("t1", "t2")}
    path = demo.save_overview_png(volumes, tmp_path / "figs" / "overview.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(MedsynthError, match="T1w"):
        demo.save_overview_png(tmp_path / "figs", tmp_path / "other.png")
