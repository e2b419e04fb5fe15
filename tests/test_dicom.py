"""DICOM series: discovery in messy folders, writing synthetic series, and reading them back exactly."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    BasicTextSRStorage,
    ExplicitVRLittleEndian,
    GrayscaleSoftcopyPresentationStateStorage,
    MRImageStorage,
    generate_uid,
)

from medsynth.errors import DataError, MedsynthError
from medsynth.io.dicom import list_dicom_series, write_dicom_series
from medsynth.io.readers import read_volume
from medsynth.io.volume import LPS_TO_RAS, Volume


def lps_oblique_volume(shape=(6, 7, 5), seed=0, integer=False) -> Volume:
    """An oblique, right-handed grid close to DICOM's usual LPS axes (i: left, j: posterior, k: superior)."""
    a = np.deg2rad(15)
    tilt = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    lps = np.eye(4)
    lps[:3, :3] = tilt @ np.diag([0.8, 0.9, 2.5])
    lps[:3, 3] = (-30.0, 12.5, 40.25)
    values = np.random.default_rng(seed).normal(300, 80, size=shape)
    array = np.round(values) if integer else values
    return Volume(array.astype(np.float32), LPS_TO_RAS @ lps, {"path": "memory", "format": "nifti"})


def write(volume: Volume, folder: Path, **kwargs) -> list[Path]:
    return write_dicom_series(
        volume, folder, series_description=kwargs.pop("series_description", "T2w syn"), **kwargs
    )


def non_image_object(path: Path, sop_class: str, modality: str, study_uid: str) -> None:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = modality
    ds.SeriesDescription = f"a {modality} object"
    ds.save_as(path, enforce_file_format=True)


def quantisation_step(volume: Volume) -> float:
    return float(volume.array.max() - volume.array.min()) / 65535


def test_written_series_reads_back_on_the_same_grid(tmp_path):
    volume = lps_oblique_volume()
    files = write(volume, tmp_path / "series")
    assert [f.name for f in files] == [f"IM{k:05d}.dcm" for k in range(1, 6)]

    back = read_volume(tmp_path / "series")
    assert back.shape == volume.shape
    np.testing.assert_allclose(back.affine, volume.affine, atol=1e-4)
    assert back.orientation == volume.orientation == "LPS"
    step = quantisation_step(volume)
    assert np.max(np.abs(back.array - volume.array)) <= step / 2 + 1e-6 * np.ptp(volume.array)
    assert back.meta["format"] == "dicom" and back.meta["series_description"] == "T2w syn"
    assert back.meta["files"] == [str(f) for f in files]


def test_headers_are_valid_mr_images(tmp_path):
    volume = lps_oblique_volume()
    files = write(volume, tmp_path / "series", series_number=7)
    headers = [pydicom.dcmread(f) for f in files]
    assert {h.SOPClassUID for h in headers} == {MRImageStorage}
    assert {h.file_meta.TransferSyntaxUID for h in headers} == {ExplicitVRLittleEndian}
    assert len({h.SeriesInstanceUID for h in headers}) == 1
    assert len({h.SOPInstanceUID for h in headers}) == 5
    assert headers[0].SeriesNumber == 7 and list(headers[0].ImageType) == ["ORIGINAL", "PRIMARY"]
    first = headers[0]
    assert (first.Rows, first.Columns) == (7, 6)  # rows follow voxel axis j, columns axis i
    np.testing.assert_allclose([float(v) for v in first.PixelSpacing], [0.9, 0.8], atol=1e-9)
    np.testing.assert_allclose(float(first.SliceThickness), 2.5)
    positions = np.array([[float(v) for v in h.ImagePositionPatient] for h in headers])
    np.testing.assert_allclose(np.diff(positions, axis=0), np.tile([0, 0, 2.5], (4, 1)), atol=1e-9)
    # The stored pixels of slice 2 decode (with the rescale) to the volume's slice 2, rows along j.
    decoded = headers[2].pixel_array * float(first.RescaleSlope) + float(first.RescaleIntercept)
    assert np.max(np.abs(decoded - volume.array[:, :, 2].T)) <= quantisation_step(volume)


def test_integer_values_are_stored_exactly(tmp_path):
    volume = lps_oblique_volume(integer=True)
    write(volume, tmp_path / "series")
    assert pydicom.dcmread(next((tmp_path / "series").iterdir())).RescaleSlope == 1
    np.testing.assert_array_equal(read_volume(tmp_path / "series").array, volume.array)


def test_reference_datasets_and_derived(tmp_path):
    source = write(lps_oblique_volume(), tmp_path / "t1", patient_id="P042", patient_name="Doe^Jane")
    reference = [pydicom.dcmread(f, stop_before_pixels=True) for f in source]
    files = write(lps_oblique_volume(seed=1), tmp_path / "t2", reference_datasets=reference, derived=True)
    out, ref = pydicom.dcmread(files[0]), reference[0]
    for keyword in ("PatientID", "PatientName", "StudyInstanceUID", "StudyDate", "FrameOfReferenceUID"):
        assert out.data_element(keyword).value == ref.data_element(keyword).value
    assert out.SeriesInstanceUID != ref.SeriesInstanceUID
    assert list(out.ImageType) == ["DERIVED", "SECONDARY"] and out.DerivationDescription
    series = list_dicom_series(tmp_path, recursive=True)
    assert {s.study_uid for s in series} == {ref.StudyInstanceUID} and len(series) == 2


def test_ct_series_and_writer_refusals(tmp_path):
    volume = lps_oblique_volume(integer=True)
    files = write(volume, tmp_path / "ct", modality="CT")
    assert pydicom.dcmread(files[0]).Modality == "CT"
    np.testing.assert_array_equal(read_volume(tmp_path / "ct").array, volume.array)
    with pytest.raises(MedsynthError, match="not empty"):
        write(volume, tmp_path / "ct")
    with pytest.raises(ValueError, match="modality"):
        write(volume, tmp_path / "pet", modality="PT")
    assert not (tmp_path / "pet").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ct"]  # no temporary folders left behind


def test_two_series_need_a_series_uid(tmp_path):
    folder = tmp_path / "study"
    study = generate_uid()
    write(
        lps_oblique_volume(), tmp_path / "a", series_description="T1 MPRAGE", series_number=3, study_uid=study
    )
    write(
        lps_oblique_volume(seed=1),
        tmp_path / "b",
        series_description="T2 TSE",
        series_number=2,
        study_uid=study,
    )
    folder.mkdir()
    for file in [*(tmp_path / "a").iterdir(), *(tmp_path / "b").iterdir()]:
        shutil.copy(file, folder / f"{file.parent.name}_{file.stem}")  # no extension, as scanners write
    series = list_dicom_series(folder)
    assert [s.series_description for s in series] == ["T2 TSE", "T1 MPRAGE"]  # by series number
    with pytest.raises(DataError, match="2 image series") as error:
        read_volume(folder)
    for info in series:
        assert info.series_uid in str(error.value) and "5 files" in str(error.value)
    back = read_volume(folder, series_uid=series[0].series_uid)
    assert back.meta["series_description"] == "T2 TSE"
    with pytest.raises(DataError, match="has no image series 1.2.3"):
        read_volume(folder, series_uid="1.2.3")


def test_non_image_objects_are_skipped(tmp_path):
    folder = tmp_path / "series"
    write(lps_oblique_volume(), folder)
    study_uid = pydicom.dcmread(next(folder.iterdir())).StudyInstanceUID
    non_image_object(folder / "report", BasicTextSRStorage, "SR", study_uid)
    non_image_object(folder / "pstate", GrayscaleSoftcopyPresentationStateStorage, "PR", study_uid)
    assert read_volume(folder).shape == (6, 7, 5)
    assert sorted(s.is_image for s in list_dicom_series(folder)) == [False, False, True]

    only = tmp_path / "only_reports"
    only.mkdir()
    non_image_object(only / "report.dcm", BasicTextSRStorage, "SR", study_uid)
    with pytest.raises(DataError, match=r"only non-image DICOM objects \(SR\)"):
        read_volume(only)


def test_discovery_skips_noise_and_reports_broken_files(tmp_path):
    folder = tmp_path / "export"
    write(lps_oblique_volume(), folder / "nested" / "series")
    (folder / "README.txt").write_text("exported by the scanner")
    (folder / "DICOMDIR").write_bytes(b"\0" * 128 + b"DICM")
    (folder / "broken.dcm").write_bytes(b"\0" * 128 + b"DICM" + b"\x02\x00\x10\x00garbage")
    assert list_dicom_series(folder) == []
    found = list_dicom_series(folder, recursive=True)
    assert len(found) == 1 and found[0].n_files == 5
    assert [path.name for path, _ in found.unreadable] == ["broken.dcm"]
    np.testing.assert_allclose(np.diff(found[0].slice_positions), 2.5, atol=1e-6)
    with pytest.raises(DataError, match="only in subfolders"):
        read_volume(folder / "nested")
    shutil.copy(folder / "broken.dcm", folder / "nested" / "series" / "IM00009.dcm")
    with pytest.raises(DataError, match="1 DICOM file.* cannot be parsed .*IM00009.dcm"):
        read_volume(folder / "nested" / "series")


def test_series_folder_refusals(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="holds no DICOM files"):
        read_volume(empty)

    single = tmp_path / "single"
    write(lps_oblique_volume(shape=(6, 7, 1)), single)
    with pytest.raises(DataError, match="single 2D slice"):
        read_volume(single)

    gap = tmp_path / "gap"
    write(lps_oblique_volume(), gap)
    (gap / "IM00003.dcm").unlink()
    with pytest.raises(DataError, match="uneven slice spacing"):
        read_volume(gap)

    echoes = tmp_path / "echoes"
    write(lps_oblique_volume(), echoes)
    twin = pydicom.dcmread(echoes / "IM00002.dcm")
    twin.SOPInstanceUID = twin.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    twin.save_as(echoes / "IM00002_echo2.dcm")
    with pytest.raises(DataError, match="repeat a position"):
        read_volume(echoes)


def test_series_tags_for_classification(tmp_path):
    files = write(lps_oblique_volume(), tmp_path / "s", patient_id="P7")
    header = pydicom.dcmread(files[0])
    header.EchoTime, header.RepetitionTime, header.ProtocolName = 98.0, 4200.0, "t2_tse_tra"
    header.save_as(files[0])
    info = list_dicom_series(tmp_path / "s")[0]
    assert (info.echo_time, info.repetition_time, info.protocol_name) == (98.0, 4200.0, "t2_tse_tra")
    assert info.patient_id == "P7" and info.modality == "MR" and info.scanning_sequence == ("RM",)
    assert info.transfer_syntax_uid == ExplicitVRLittleEndian and info.number_of_frames == 1


def test_reading_a_series_leaves_it_untouched(tmp_path):
    files = write(lps_oblique_volume(), tmp_path / "s")
    before = [(hashlib.sha256(f.read_bytes()).hexdigest(), f.stat().st_mtime_ns) for f in files]
    read_volume(tmp_path / "s")
    list_dicom_series(tmp_path / "s")
    assert [(hashlib.sha256(f.read_bytes()).hexdigest(), f.stat().st_mtime_ns) for f in files] == before
    assert len(list((tmp_path / "s").iterdir())) == 5


def test_series_folder_mode_follows_the_umask(tmp_path):
    import os
    import stat

    old = os.umask(0o022)
    try:
        files = write(lps_oblique_volume(), tmp_path / "series")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "series").stat().st_mode) == 0o755
    assert stat.S_IMODE(files[0].stat().st_mode) == 0o644


def test_a_series_that_fails_midway_leaves_nothing_and_its_staging_is_a_partial(tmp_path, monkeypatch):
    """An error mid-series removes the hidden staging folder; a killed writer's would be swept, so it
    carries a partial name (its process and machine)."""
    from medsynth.io.atomic import is_partial

    staged: list[str] = []
    real_save = Dataset.save_as

    def failing_save(self, filename, *args, **kwargs):
        staged.append(Path(filename).parent.name)
        if len(staged) == 3:
            raise OSError(28, "No space left on device")
        return real_save(self, filename, *args, **kwargs)

    monkeypatch.setattr(Dataset, "save_as", failing_save)
    with pytest.raises((MedsynthError, OSError)):
        write(lps_oblique_volume(), tmp_path / "series")
    assert staged and is_partial(staged[0])
    assert list(tmp_path.iterdir()) == []
