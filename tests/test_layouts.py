"""Dataset layouts: each layout is recognised from real file names, and user mistakes are named."""

from __future__ import annotations

import logging
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medsynth.data.layouts import LAYOUTS, bids_path, load_subject, scan_dataset, series_modality
from medsynth.errors import DataError, GeometryError, MedsynthError
from medsynth.io.dicom import write_dicom_series
from medsynth.io.volume import Volume


def write_nifti(
    path: Path, affine: np.ndarray | None = None, shape: tuple[int, int, int] = (16, 16, 12)
) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = np.random.default_rng(len(path.name)).random(shape, dtype=np.float32) * 100 + 1
    nib.save(nib.Nifti1Image(data, np.eye(4) if affine is None else affine), path)
    return path


def test_bids_with_sessions_plain_nii_and_contrast_entity(tmp_path: Path) -> None:
    write_nifti(tmp_path / "sub-01/anat/sub-01_T1w.nii.gz")
    write_nifti(tmp_path / "sub-01/anat/sub-01_T2w.nii")
    write_nifti(tmp_path / "sub-01/anat/sub-01_T2starw.nii.gz")  # not a translated modality: skipped
    write_nifti(tmp_path / "sub-02/ses-a/anat/sub-02_ses-a_FLAIR.nii.gz")
    write_nifti(tmp_path / "sub-02/ses-a/anat/sub-02_ses-a_ce-gd_T1w.nii.gz")
    write_nifti(tmp_path / "sub-02/ses-a/anat/sub-02_ses-a_PDw.nii.gz")

    records = scan_dataset(tmp_path)

    assert [r.id for r in records] == ["sub-01", "sub-02_ses-a"]
    assert {r.layout for r in records} == {"bids"}
    assert records[0].modalities == ("t1", "t2")
    assert records[0].paths["t2"] == tmp_path / "sub-01/anat/sub-01_T2w.nii"
    assert records[1].modalities == ("pd", "flair", "t1c")


def test_ixi_flat_files_skip_mra_and_dti(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    for name in ("IXI002-Guys-0828-T1", "IXI002-Guys-0828-T2", "IXI002-Guys-0828-PD", "IXI002-Guys-0828-MRA"):
        write_nifti(tmp_path / f"{name}.nii.gz")
    write_nifti(tmp_path / "IXI012-HH-1211-T2.nii.gz")
    write_nifti(tmp_path / "IXI012-HH-1211-DTI-00.nii.gz")

    with caplog.at_level(logging.INFO, logger="medsynth"):
        records = scan_dataset(tmp_path)

    assert [(r.id, r.modalities, r.layout) for r in records] == [
        ("IXI002-Guys-0828", ("t1", "t2", "pd"), "ixi"),
        ("IXI012-HH-1211", ("t2",), "ixi"),
    ]
    assert "skipped 2 MRA/DTI" in caplog.text


@pytest.mark.parametrize(
    ("subject", "separator", "suffixes"),
    [
        ("BraTS-GLI-00000-000", "-", ("t1n", "t1c", "t2w", "t2f")),
        ("BraTS2021_00000", "_", ("t1", "t1ce", "t2", "flair")),
    ],
)
def test_brats_2023_and_2021(tmp_path: Path, subject: str, separator: str, suffixes: tuple[str, ...]) -> None:
    for suffix in (*suffixes, "seg"):
        write_nifti(tmp_path / subject / f"{subject}{separator}{suffix}.nii.gz")

    (record,) = scan_dataset(tmp_path)

    assert record.id == subject and record.layout == "brats"
    assert record.modalities == ("t1", "t2", "flair", "t1c")
    assert record.paths["t1c"].name == f"{subject}{separator}{suffixes[1]}.nii.gz"


def test_manifest_resolves_relative_paths_against_its_folder(tmp_path: Path) -> None:
    t1 = write_nifti(tmp_path / "images/a_t1.nii.gz")
    t2 = write_nifti(tmp_path / "elsewhere/a_t2.nii.gz")
    manifest = tmp_path / "lists/cohort.csv"
    manifest.parent.mkdir()
    manifest.write_text(
        f"Subject,Modality,Path\na,T1w,../images/a_t1.nii.gz\na,t2,{t2}\n\n", encoding="utf-8"
    )

    for records in (scan_dataset(tmp_path / "unused", manifest=manifest), scan_dataset(manifest)):
        assert [(r.id, r.paths, r.layout) for r in records] == [("a", {"t1": t1, "t2": t2}, "manifest")]


def test_manifest_in_root_is_detected_and_wins_over_file_names(tmp_path: Path) -> None:
    write_nifti(tmp_path / "sub-01/anat/sub-01_T1w.nii.gz")
    (tmp_path / "medsynth.csv").write_text("subject,modality,path\nx,pd,sub-01/anat/sub-01_T1w.nii.gz\n")

    (record,) = scan_dataset(tmp_path)

    assert (record.id, record.modalities, record.layout) == ("x", ("pd",), "manifest")


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("a,t7,a.nii.gz", "line 2: unknown modality 't7'"),
        ("a,t1,missing.nii.gz", "line 2: "),
        ("a,,x", "line 2"),
    ],
)
def test_manifest_errors_name_the_line(tmp_path: Path, line: str, expected: str) -> None:
    write_nifti(tmp_path / "a.nii.gz")
    manifest = tmp_path / "m.csv"
    manifest.write_text(f"subject,modality,path\n{line}\n")

    with pytest.raises(DataError, match=expected) as error:
        scan_dataset(tmp_path, manifest=manifest)
    assert error.value.path == manifest


def test_empty_or_missing_root_lists_the_layouts(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("nothing here")
    with pytest.raises(DataError) as error:
        scan_dataset(tmp_path)
    for name in LAYOUTS:
        assert name in str(error.value)
    with pytest.raises(DataError, match="no such dataset folder"):
        scan_dataset(tmp_path / "absent")


def test_mixed_layouts_are_refused(tmp_path: Path) -> None:
    write_nifti(tmp_path / "sub-01/anat/sub-01_T1w.nii.gz")
    write_nifti(tmp_path / "IXI002-Guys-0828-T1.nii.gz")
    with pytest.raises(DataError, match=r"several layouts.*bids.*ixi"):
        scan_dataset(tmp_path)


def test_duplicate_modality_names_both_files(tmp_path: Path) -> None:
    first = write_nifti(tmp_path / "sub-01/anat/sub-01_T1w.nii.gz")
    second = write_nifti(tmp_path / "sub-01/anat/sub-01_acq-fast_T1w.nii.gz")
    with pytest.raises(DataError) as error:
        scan_dataset(tmp_path)
    assert str(first) in str(error.value) and str(second) in str(error.value)


@pytest.mark.parametrize(
    ("description", "modality", "agent", "expected"),
    [
        ("t1_mprage_sag_p2", "MR", "", "t1"),
        ("T1W_3D_TFE", "MR", "Gadovist", "t1c"),
        ("t1_fl3d_post_gd", "MR", "", "t1c"),
        ("AX T2 FSE", "MR", "", "t2"),
        ("t2_tirm_tra_dark-fluid FLAIR", "MR", "", "flair"),
        ("PD_TSE", "MR", "", "pd"),
        ("PD_T2_dual_echo", "MR", "", None),
        ("AAHead_Scout", "MR", "", None),
        ("diffusion ep2d", "MR", "", None),
        ("Head 5.0", "CT", "", "ct"),
    ],
)
def test_series_modality_keywords(description: str, modality: str, agent: str, expected: str | None) -> None:
    assert series_modality(description, modality, agent) == expected


def test_dicom_folder_per_subject(tmp_path: Path) -> None:
    volume = Volume(np.random.default_rng(0).random((12, 10, 6), dtype=np.float32) * 500, np.eye(4))
    for subject in ("patient_b", "patient_a"):
        write_dicom_series(volume, tmp_path / subject / "s1", series_description="t1_mprage_sag")
        write_dicom_series(
            volume, tmp_path / subject / "s2", series_description="t2_tse_tra", series_number=2
        )
        write_dicom_series(volume, tmp_path / subject / "s3", series_description="localizer", series_number=3)

    records = scan_dataset(tmp_path)

    assert [r.id for r in records] == ["patient_a", "patient_b"]
    assert records[0].layout == "dicom" and records[0].modalities == ("t1", "t2")
    assert records[0].paths == {"t1": tmp_path / "patient_a/s1", "t2": tmp_path / "patient_a/s2"}
    assert records[0].series_uids["t1"] != records[0].series_uids["t2"]
    subject = load_subject(records[0], ["t2"])
    assert subject["t2"].shape == (12, 10, 6)
    assert subject["t2"].meta["series_uid"] == records[0].series_uids["t2"]


def test_load_subject_reads_and_aligns_to_the_first_requested(tmp_path: Path) -> None:
    write_nifti(tmp_path / "sub-01/anat/sub-01_T1w.nii.gz")
    shifted = np.eye(4)
    shifted[:3, 3] = (2.0, 0.0, 0.0)  # same anatomy, 2 mm off: resampled, not refused
    write_nifti(tmp_path / "sub-01/anat/sub-01_T2w.nii.gz", shifted)
    (record,) = scan_dataset(tmp_path)

    subject = load_subject(record, ["T2w", "t1"])
    assert list(subject) == ["t2", "t1"]
    np.testing.assert_array_equal(subject["t1"].affine, shifted)

    subject = load_subject(record, ["t2", "t1"], reference="t1")
    np.testing.assert_array_equal(subject["t2"].affine, np.eye(4))
    np.testing.assert_array_equal(
        subject["t1"].array, nib.load(record.paths["t1"]).get_fdata(dtype=np.float32)
    )


def test_load_subject_errors(tmp_path: Path) -> None:
    write_nifti(tmp_path / "sub-01/anat/sub-01_T1w.nii.gz")
    far = np.eye(4)
    far[:3, 3] = (500.0, 0.0, 0.0)
    write_nifti(tmp_path / "sub-01/anat/sub-01_T2w.nii.gz", far)
    (record,) = scan_dataset(tmp_path)

    with pytest.raises(DataError, match=r"sub-01 has no flair image \(it has: t1, t2\)"):
        load_subject(record, ["t1", "flair"])
    with pytest.raises(GeometryError):
        load_subject(record, ["t1", "t2"])
    with pytest.raises(MedsynthError, match="not among the requested"):
        load_subject(record, ["t1"], reference="t2")


def test_bids_path_is_read_back_by_the_scanner(tmp_path: Path) -> None:
    for modality in ("t1", "t1c", "t2", "pd", "flair", "ct"):
        write_nifti(bids_path(tmp_path, "IXI002-Guys-0828", modality))

    (record,) = scan_dataset(tmp_path)

    assert record.id == "sub-IXI002Guys0828"
    assert record.modalities == ("t1", "t2", "pd", "flair", "t1c", "ct")


def test_bids_subjects_with_spaces_or_accents_are_read(tmp_path: Path) -> None:
    for subject in ("sub-01", "sub-0 2é", "sub-Ünï"):
        for suffix in ("T1w", "T2w"):
            path = tmp_path / subject / "ses-1 a" / "anat" / f"{subject}_ses-1 a_{suffix}.nii.gz"
            path.parent.mkdir(parents=True, exist_ok=True)
            nib.save(nib.Nifti1Image(np.ones((4, 4, 4), np.float32), np.eye(4)), path)

    records = scan_dataset(tmp_path)

    assert [r.id for r in records] == ["sub-0 2é_ses-1 a", "sub-01_ses-1 a", "sub-Ünï_ses-1 a"]
    assert all(r.modalities == ("t1", "t2") for r in records)


def test_constant_volume_is_refused_for_training(tmp_path: Path) -> None:
    from medsynth.data.layouts import SubjectRecord

    t1, t2 = tmp_path / "t1.nii.gz", tmp_path / "t2.nii.gz"
    nib.save(nib.Nifti1Image(np.random.default_rng(0).random((6, 6, 6), np.float32), np.eye(4)), t1)
    nib.save(nib.Nifti1Image(np.zeros((6, 6, 6), np.float32), np.eye(4)), t2)
    record = SubjectRecord("s1", {"t1": t1, "t2": t2})

    assert set(load_subject(record, ["t1"])) == {"t1"}
    with pytest.raises(
        DataError, match=r"t2\.nii\.gz: is constant \(every voxel is 0\).*leave subject s1 out"
    ):
        load_subject(record, ["t1", "t2"])
