"""Enhanced and legacy-converted enhanced multi-frame DICOM: read with per-frame geometry, or refused why."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import generate_uid

from medsynth.errors import DataError
from medsynth.io.dicom import list_dicom_series, write_dicom_series
from medsynth.io.readers import read_volume
from medsynth.io.volume import LPS_TO_RAS, Volume

highdicom = pytest.importorskip("highdicom")

ENHANCED_MR = "1.2.840.10008.5.1.4.1.1.4.1"


def grid_volume(lps_matrix: np.ndarray, shape=(7, 6, 5), seed=0) -> Volume:
    lps = np.eye(4)
    lps[:3, :3] = lps_matrix
    lps[:3, 3] = (-30.0, 12.5, 40.25)
    values = np.random.default_rng(seed).normal(300, 80, size=shape).astype(np.float32)
    return Volume(values, LPS_TO_RAS @ lps)


def oblique(handed: int = 1) -> np.ndarray:
    a, b = np.deg2rad(15), np.deg2rad(10)
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    return rz @ rx @ np.diag([0.8, 0.9, 2.5 * handed])


def convert(classic: Path, out: Path, sop_class: str | None = None) -> Path:
    """Write the classic series as one legacy-converted enhanced MR file (optionally relabelled)."""
    datasets = [pydicom.dcmread(f) for f in sorted(classic.iterdir())]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # highdicom warns about single-component person names
        converted = highdicom.legacy.LegacyConvertedEnhancedMRImage(
            legacy_datasets=datasets,
            series_instance_uid=generate_uid(),
            series_number=7,
            sop_instance_uid=generate_uid(),
            instance_number=1,
        )
    if sop_class is not None:
        converted.SOPClassUID = converted.file_meta.MediaStorageSOPClassUID = sop_class
    out.mkdir(parents=True)
    converted.save_as(out / "multiframe.dcm", enforce_file_format=True)
    return out


@pytest.mark.parametrize("sop_class", [None, ENHANCED_MR], ids=["legacy-converted", "enhanced"])
def test_multiframe_reads_like_the_classic_series(tmp_path, sop_class):
    volume = grid_volume(np.diag([0.8, 0.9, 2.5]))
    write_dicom_series(volume, tmp_path / "classic", series_description="t2_tse")
    folder = convert(tmp_path / "classic", tmp_path / "enhanced", sop_class)

    classic, enhanced = read_volume(tmp_path / "classic"), read_volume(folder)

    assert enhanced.shape == classic.shape == volume.shape
    np.testing.assert_allclose(enhanced.affine, classic.affine, atol=1e-4)
    np.testing.assert_allclose(enhanced.array, classic.array, rtol=1e-6, atol=1e-4)
    assert enhanced.meta["format"] == "dicom" and sorted(enhanced.meta["frames"]) == list(range(5))
    (info,) = list_dicom_series(folder)
    assert info.number_of_frames == 5 and info.n_slices == 5 and info.geometry_problem is None


@pytest.mark.parametrize("handed", [1, -1], ids=["oblique", "oblique-left-handed"])
def test_oblique_and_left_handed_grids_round_trip(tmp_path, handed):
    volume = grid_volume(oblique(handed))
    write_dicom_series(volume, tmp_path / "classic", series_description="t1")
    classic = read_volume(tmp_path / "classic")
    enhanced = read_volume(convert(tmp_path / "classic", tmp_path / "enhanced"))

    np.testing.assert_allclose(enhanced.affine, classic.affine, atol=1e-4)
    np.testing.assert_allclose(enhanced.array, classic.array, rtol=1e-6, atol=1e-4)
    if handed == 1:  # right-handed grids come back as written; left-handed ones with k reversed
        np.testing.assert_allclose(enhanced.affine, volume.affine, atol=1e-4)
    else:
        np.testing.assert_allclose(enhanced.array, volume.array[:, :, ::-1], atol=0.01)


def _edit_frames(folder: Path, edit) -> None:
    path = folder / "multiframe.dcm"
    ds = pydicom.dcmread(path)
    edit(ds)
    ds.save_as(path)


def test_uneven_frames_and_mixed_orientations_are_refused(tmp_path):
    write_dicom_series(grid_volume(np.diag([0.8, 0.9, 2.5])), tmp_path / "classic", series_description="t1")
    uneven = convert(tmp_path / "classic", tmp_path / "uneven")

    def shift_one(ds):
        position = ds.PerFrameFunctionalGroupsSequence[2].PlanePositionSequence[0]
        position.ImagePositionPatient = [
            *position.ImagePositionPatient[:2],
            position.ImagePositionPatient[2] + 1,
        ]

    _edit_frames(uneven, shift_one)
    with pytest.raises(DataError, match="uneven slice spacing"):
        read_volume(uneven)

    tilted = convert(tmp_path / "classic", tmp_path / "tilted")

    def tilt_one(ds):
        frame = ds.PerFrameFunctionalGroupsSequence[0]
        plane = pydicom.Dataset()
        plane.ImageOrientationPatient = [0, 1, 0, 0, 0, -1]
        frame.PlaneOrientationSequence = [plane]

    _edit_frames(tilted, tilt_one)
    stacks = list_dicom_series(tilted)
    assert [s.stack for s in stacks] == ["1", "2"] and "by orientation" in stacks[0].series_description
    with pytest.raises(DataError, match=r"holds 2 stacks: .*#1 .*#2 .*choose one with --series-uid"):
        read_volume(tilted)
    lone, rest = sorted(stacks, key=lambda s: s.n_slices)
    assert read_volume(tilted, series_uid=rest.selector).shape[2] == 4
    with pytest.raises(DataError, match="a single frame, not a 3D volume"):
        read_volume(tilted, series_uid=lone.selector)  # the one tilted frame


def test_stacks_by_dimension_index_values(tmp_path):
    """Two echoes in one file: frames repeat positions, DimensionIndexValues tell the stacks apart."""
    shared = {"study_uid": generate_uid(), "frame_of_reference_uid": generate_uid()}
    for echo in (1, 2):
        volume = grid_volume(np.diag([0.8, 0.9, 2.5]), seed=echo)
        write_dicom_series(volume, tmp_path / f"echo{echo}", series_description="dual echo", **shared)
    datasets = [pydicom.dcmread(f) for echo in (1, 2) for f in sorted((tmp_path / f"echo{echo}").iterdir())]
    series_uid = datasets[0].SeriesInstanceUID
    for ds in datasets:
        ds.SeriesInstanceUID = series_uid
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        converted = highdicom.legacy.LegacyConvertedEnhancedMRImage(
            legacy_datasets=datasets, series_instance_uid=generate_uid(), series_number=7,
            sop_instance_uid=generate_uid(), instance_number=1,
        )  # fmt: skip
    # Frames at repeated positions get no dimensions from the converter; describe (position, echo) here.
    dimensions = []
    for pointer, group in ((0x00200032, 0x00209113), (0x00209128, 0x00209111)):
        item = pydicom.Dataset()
        item.DimensionIndexPointer, item.FunctionalGroupPointer = pointer, group
        dimensions.append(item)
    converted.DimensionIndexSequence = dimensions
    echo_of = {ds.SOPInstanceUID: 1 + n // 5 for n, ds in enumerate(datasets)}
    for frame in converted.PerFrameFunctionalGroupsSequence:
        source = frame.ConversionSourceAttributesSequence[0].ReferencedSOPInstanceUID
        content = pydicom.Dataset()
        content.DimensionIndexValues = [
            1 + round(float(frame.PlanePositionSequence[0].ImagePositionPatient[2]) / 2.5),
            echo_of[source],
        ]
        frame.FrameContentSequence = [content]
    (tmp_path / "dual").mkdir()
    converted.save_as(tmp_path / "dual" / "multiframe.dcm", enforce_file_format=True)

    stacks = list_dicom_series(tmp_path / "dual")
    assert [s.stack for s in stacks] == ["1", "2"]
    assert all(s.geometry_problem is None and s.n_slices == 5 for s in stacks)
    assert "DimensionIndexValues" in stacks[0].series_description
    with pytest.raises(DataError, match="holds 2 stacks"):
        read_volume(tmp_path / "dual")
    for stack, echo in zip(stacks, (1, 2), strict=True):
        back = read_volume(tmp_path / "dual", series_uid=stack.selector)
        np.testing.assert_allclose(back.array, read_volume(tmp_path / f"echo{echo}").array, atol=1e-3)


@pytest.mark.parametrize(
    "name",
    ["emri_small.dcm", "emri_small_big_endian.dcm", "emri_small_RLE.dcm", "emri_small_jpeg_ls_lossless.dcm"],
)
def test_pydicom_enhanced_mr_files_are_refused_with_the_reason(tmp_path, name):
    """These test files carry no functional groups at all: their frames have no position to stack by."""
    pydicom_data = pytest.importorskip("pydicom.data")
    source = Path(pydicom_data.get_testdata_file(name))
    (tmp_path / name).mkdir()
    (tmp_path / name / "image.dcm").write_bytes(source.read_bytes())

    (info,) = list_dicom_series(tmp_path / name)
    assert info.number_of_frames == 10 and info.sop_class_uid == ENHANCED_MR
    assert "without per-frame position and orientation" in info.geometry_problem
    with pytest.raises(DataError, match=r"10 frames\) without per-frame position and orientation"):
        read_volume(tmp_path / name)


def test_convert_discovery_accepts_multiframe_series(tmp_path):
    from medsynth.convert.discovery import discover

    volume = grid_volume(np.diag([0.8, 0.9, 2.5]))
    write_dicom_series(volume, tmp_path / "classic", series_description="t2_tse_tra")
    convert(tmp_path / "classic", tmp_path / "export" / "enhanced", ENHANCED_MR)

    (study,) = discover(tmp_path / "export").studies
    (record,) = study.series
    assert record.unsupported is None and record.modality == "t2", (record.unsupported, record.reason)
    back = read_volume(record.files[0].parent, series_uid=record.series_uid)
    np.testing.assert_allclose(back.affine, read_volume(tmp_path / "classic").affine, atol=1e-4)
