"""A synthetic CT as a treatment-planning system receives it: DICOM CT in HU on the MR's frame of reference,
and NIfTI in HU (float32 or int16); a scanner's CT export (unsigned, intercept -1024, any slope) reads
back as the same HU as its NIfTI."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from pydicom.uid import generate_uid

from medsynth.convert import run_convert
from medsynth.io.dicom import write_dicom_series
from medsynth.io.readers import read_volume
from medsynth.io.volume import Volume
from medsynth.io.writers import write_volume


def _mr(seed: int = 0) -> Volume:
    rng = np.random.default_rng(seed)
    theta = 0.15
    rotation = np.array([[np.cos(theta), -np.sin(theta), 0], [np.sin(theta), np.cos(theta), 0], [0, 0, 1]])
    affine = np.eye(4)
    affine[:3, :3] = rotation @ np.diag([0.9, 1.1, 2.5])
    affine[:3, 3] = [-5.0, 12.0, 30.0]
    return Volume(rng.uniform(0, 900, size=(14, 12, 6)).astype(np.float32), affine)


def _hounsfield(mr: np.ndarray) -> np.ndarray:
    """A CT-like map of an MR: air -1000 below 100, soft tissue, 'bone' up to ~1700 HU, fractional values."""
    return np.where(mr < 100, -1000.0, (mr - 100.0) * 2.13 - 3.7).astype(np.float32)


class FakeCTPredictor:
    """Stands in for a trained T1w -> CT model: a fixed HU map of the T1w on its grid."""

    required_modalities = ("t1",)
    target = "ct"

    def predict(self, inputs: dict[str, Volume], target: str | None = None) -> Volume:
        return inputs["t1"].with_array(_hounsfield(inputs["t1"].array), modality="ct", synthetic=True)


def test_a_converted_synthetic_ct_reads_back_in_hu_on_the_mr_grid(tmp_path: Path) -> None:
    export, study, frame = tmp_path / "export", generate_uid(), generate_uid()
    mr = _mr()
    write_dicom_series(mr, export / "P1" / "t1", series_description="T1w SE", study_uid=study,
                       frame_of_reference_uid=frame, patient_id="P1")  # fmt: skip
    out = tmp_path / "out"
    report = run_convert(export, FakeCTPredictor(), out, fmt="both")
    assert [s.status for s in report.studies] == ["converted"]

    folder = next(out.rglob("dicom_ct"))
    files = sorted(folder.iterdir())
    headers = [pydicom.dcmread(f) for f in files]
    first = headers[0]
    assert first.SOPClassUID == pydicom.uid.CTImageStorage and first.Modality == "CT"
    assert list(first.ImageType[:2]) == ["DERIVED", "SECONDARY"] and first.RescaleType == "HU"
    assert {h.FrameOfReferenceUID for h in headers} == {frame}  # the MR's frame: planning can fuse them
    assert {h.StudyInstanceUID for h in headers} == {study} and len(
        {h.SeriesInstanceUID for h in headers}
    ) == 1

    expected = _hounsfield(read_volume(export / "P1" / "t1").array)  # the MR as convert read it
    # pydicom: stored values x slope + intercept are HU (to the writer's quantisation step).
    by_position = sorted(headers, key=lambda h: float(np.dot(h.ImagePositionPatient, mr.affine[:3, 2])))
    stack = np.stack([h.pixel_array * float(h.RescaleSlope) + float(h.RescaleIntercept) for h in by_position])
    step = max(float(h.RescaleSlope) for h in headers)
    np.testing.assert_allclose(
        stack.transpose(2, 1, 0), expected, atol=step
    )  # one stored step (the slope is a rounded decimal string)
    # SimpleITK applies the rescale itself, and the grid is the MR's.
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder)))
    image = reader.Execute()
    original = sitk.ReadImage(reader.GetGDCMSeriesFileNames(str(export / "P1" / "t1")))
    assert image.GetSize() == original.GetSize()
    np.testing.assert_allclose(image.GetOrigin(), original.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(image.GetDirection(), original.GetDirection(), atol=1e-5)
    np.testing.assert_allclose(
        sitk.GetArrayFromImage(image).transpose(2, 1, 0), expected, atol=step
    )  # one stored step (the slope is a rounded decimal string)
    # The NIfTI beside it is the same HU in float32.
    nifti = read_volume(next(out.rglob("ct.nii.gz")))
    np.testing.assert_allclose(nifti.array, expected, rtol=0, atol=1e-3)


def test_int16_output_rounds_hu_and_keeps_the_grid(tmp_path: Path) -> None:
    mr = _mr()
    hu = _hounsfield(mr.array)
    path = write_volume(hu, mr, tmp_path / "sct.nii.gz", dtype="int16")
    back = read_volume(path)
    import nibabel as nib

    assert nib.load(path).get_data_dtype() == np.int16
    np.testing.assert_array_equal(back.array, np.rint(hu))
    np.testing.assert_allclose(back.affine, mr.affine, atol=1e-5)


@pytest.mark.parametrize("slope", [1.0, 0.5])
def test_a_scanner_ct_export_with_intercept_minus_1024_reads_as_its_nifti(
    tmp_path: Path, slope: float
) -> None:
    mr = _mr(1)
    hu = np.rint(_hounsfield(mr.array) / slope) * slope  # values the stored integers can represent
    ct = mr.with_array(hu.astype(np.float32))
    files = write_dicom_series(ct, tmp_path / "ct", modality="CT", series_description="CT head")
    for file in files:  # rewrite as scanners store it: unsigned, offset by -1024 HU, scaled by the slope
        ds = pydicom.dcmread(file)
        values = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        stored = np.rint((values + 1024.0) / slope).astype(np.uint16)
        ds.PixelRepresentation, ds.RescaleIntercept, ds.RescaleSlope = 0, -1024, slope
        ds.BitsStored, ds.HighBit = 16, 15
        ds.PixelData = stored.tobytes()
        ds.save_as(file)
    assert pydicom.dcmread(files[0]).RescaleIntercept == -1024
    nifti = write_volume(ct.array, ct, tmp_path / "ct.nii.gz")
    np.testing.assert_allclose(read_volume(tmp_path / "ct").array, read_volume(nifti).array, atol=1e-4)
