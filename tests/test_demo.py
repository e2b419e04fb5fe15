"""The demo cohort: layout, geometry, determinism, tissue contrast per sequence, the CT, DICOM, overview."""

from __future__ import annotations

import hashlib
import json
import math
import socket
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest

from medsynth.data import demo
from medsynth.data.check import check_dataset
from medsynth.data.layouts import ct_problem, load_subject, scan_dataset
from medsynth.errors import MedsynthError
from medsynth.io.readers import read_volume
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
        ct_image = nib.load(subject / "anat" / f"{subject.name}_CT.nii.gz")
        t1_image = nib.load(subject / "anat" / f"{subject.name}_T1w.nii.gz")
        assert ct_image.get_data_dtype() == np.int16 and ct_image.shape == expected_shape
        np.testing.assert_array_equal(ct_image.affine, t1_image.affine)
        for header in (ct_image.header, t1_image.header):
            assert header.get_qform(coded=True)[1] == header.get_sform(coded=True)[1] == 1
        np.testing.assert_array_equal(ct_image.header.get_qform(), t1_image.header.get_qform())
        np.testing.assert_array_equal(ct_image.header.get_sform(), t1_image.header.get_sform())
    ct_sidecar = json.loads((out / "sub-01" / "anat" / "sub-01_CT.json").read_text())
    assert ct_sidecar["Modality"] == "CT" and ct_sidecar["KVP"] == 120.0 and ct_sidecar["Units"] == "HU"
    assert ct_sidecar["ConvolutionKernel"] and "tissue fractions" in ct_sidecar["SimulatedFrom"]
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
    written_ct, _ = _load(out / "sub-02" / "anat" / "sub-02_CT.nii.gz")
    np.testing.assert_array_equal(written_ct, again["ct"].array)
    assert not np.array_equal(written_ct, other_seed["ct"].array)


#: sha256 of subject 0's T1w and T2w float32 arrays at 8 mm, seed 0, as the cohort produced them before it
#: had a CT (commit edb3961). They pin the pre-CT cohort: the CT draws from its own Generator, so every MR
#: volume (and the README's figures) must stay bit-identical.
PRE_CT_SHA256 = {
    "t1": "93f325aef9223e34260feaaa6c37306fafe5775e33edf6444f6288a5eb13b765",
    "t2": "c67cd5de4e0cf99feee1db264742f5d4afe41314fec4c3514c8d3e2c13a8e187",
}


def test_the_mr_volumes_are_those_of_the_cohort_before_the_ct() -> None:
    volumes, _ = demo.simulate_subject(0, 8.0, seed=0)
    for modality, expected in PRE_CT_SHA256.items():
        assert hashlib.sha256(volumes[modality].array.tobytes()).hexdigest() == expected, modality


def test_ct_is_the_partial_volume_sum_of_tissue_hu() -> None:
    """Pure-tissue voxels get the table's HU (+ noise of the stated sd); the diploe is marrow, not fat."""
    n = 20_000
    names = [t.name for t in demo.TISSUES]
    fractions = np.zeros((len(names), len(names) + 2, n), dtype=np.float32)
    for column in range(len(names)):
        fractions[column, column] = 1.0
    diploe = np.zeros(fractions.shape[1:], dtype=np.float32)
    fractions[demo.TISSUE_INDEX["fat"], -2] = diploe[-2] = 1.0  # a diploe voxel; the last one is air
    ct = demo.simulate_ct(fractions, diploe, demo.CT_HU, np.random.default_rng(0))
    assert np.array_equal(ct, np.round(ct))
    for column, name in enumerate([*names, "diploe", "air"]):
        assert abs(ct[column].mean() - demo.CT_HU[name]) < 1.0, name
    assert abs(ct[demo.TISSUE_INDEX["wm"]].std() - demo.CT_NOISE_HU) < 0.5
    half = np.zeros((len(names), n), dtype=np.float32)
    half[demo.TISSUE_INDEX["gm"]] = 0.5  # half grey matter, half air
    mixed = demo.simulate_ct(half, np.zeros(n, np.float32), demo.CT_HU, np.random.default_rng(1))
    assert abs(mixed.mean() - (demo.CT_HU["gm"] + demo.CT_HU["air"]) / 2) < 1.0


def test_subject_ct_is_co_registered_with_its_mr() -> None:
    volumes, _ = demo.simulate_subject(0, SPACING, seed=0)
    base = demo.anatomy(SPACING)
    coords, _ = demo.warp_coordinates(base, np.random.default_rng((0, 0)))
    warped = demo.warp(base.fractions, coords)
    ct, t1 = volumes["ct"].array, volumes["t1"].array
    assert np.array_equal(volumes["ct"].affine, volumes["t1"].affine) and ct.shape == t1.shape
    brain = warped[demo.TISSUE_INDEX["wm"]] + warped[demo.TISSUE_INDEX["gm"]] > 0.9
    air = warped.sum(axis=0) < 0.01
    assert 20 < ct[brain].mean() < 45 and abs(ct[air].mean() + 1000) < 2
    assert ct.max() > 300 and ct.min() >= -1024  # the skull, blurred at 6 mm
    assert np.percentile(t1[air], 99) < np.percentile(t1[brain], 1)  # air dark in MR as in CT
    assert ct_problem(volumes["ct"]) is None


def test_cohort_ct_is_found_and_accepted_for_training(cohort: tuple[Path, list[Path]]) -> None:
    out, _ = cohort
    records = scan_dataset(out)
    assert [r.modalities for r in records] == [("t1", "t2", "pd", "flair", "ct")] * 2
    loaded = load_subject(records[0], ["t1", "ct"])
    assert "resampled_to" not in loaded["ct"].meta
    report = check_dataset(out, modalities=["t1", "ct"])
    assert [p.message for p in report.problems if p.subject != "dataset"] == []


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
        assert [f.name for f in folders] == ["01_T1w", "02_T2w", "03_PDw", "04_FLAIR", "05_CT"]
        headers = [pydicom.dcmread(sorted(f.iterdir())[0], stop_before_pixels=True) for f in folders]
        assert [h.SeriesDescription for h in headers] == ["T1w SE", "T2w TSE", "PD", "FLAIR", "CT head"]
        assert [h.Modality for h in headers] == ["MR"] * 4 + ["CT"]
        assert headers[-1].SOPClassUID == pydicom.uid.CTImageStorage and headers[-1].RescaleType == "HU"
        assert {h.PatientID for h in headers} == {f"DEMO-{subject[4:]}"}
        assert len({h.StudyInstanceUID for h in headers}) == 1
        assert len({h.FrameOfReferenceUID for h in headers}) == 1
        assert len({h.SeriesInstanceUID for h in headers}) == 5
        assert all(len(list(f.iterdir())) == math.ceil(MNI_SHAPE[2] / SPACING) for f in folders)
        study_uids.append(headers[0].StudyInstanceUID)
    assert study_uids[0] != study_uids[1]
    ct_series = read_volume(out / "dicom" / "sub-01" / "05_CT")
    ct_nifti = read_volume(out / "sub-01" / "anat" / "sub-01_CT.nii.gz")
    np.testing.assert_array_equal(ct_series.array, ct_nifti.array)  # HU exactly, through the rescale
    np.testing.assert_allclose(ct_series.affine, ct_nifti.affine, atol=1e-4)


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
