"""Real scanner files from pydicom-data through discovery and conversion: each is used or explained."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

from medsynth.convert import discover, run_convert
from medsynth.io.volume import Volume

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # pydicom warns about its own odd samples


class FakePredictor:
    required_modalities = ("t1",)
    target = "t2"

    def predict(self, inputs: dict[str, Volume], target: str | None = None) -> Volume:
        return inputs["t1"].with_array(inputs["t1"].array + 1.0)


def _stack(source: str, folder: Path, slices: int = 3) -> str:
    """Turn one real single-slice file into a 3-slice series, keeping its transfer syntax and byte order."""
    folder.mkdir(parents=True)
    series_uid, study_uid = generate_uid(), generate_uid()
    for k in range(slices):
        ds = pydicom.dcmread(get_testdata_file(source))
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.SeriesDescription = f"T1 from {source}"
        ds.ImagePositionPatient = [
            float(v) + (2.0 * k if i == 2 else 0.0) for i, v in enumerate(ds.ImagePositionPatient)
        ]
        ds.InstanceNumber = k + 1
        ds.ImageType = ["ORIGINAL", "PRIMARY", "OTHER"]  # the sample is marked DERIVED, which convert skips
        ds.save_as(folder / f"slice{k}", enforce_file_format=True)
    return study_uid


SUPPORTED = [
    "MR_small.dcm",
    "MR_small_bigendian.dcm",
    "MR_small_RLE.dcm",
    "MR_small_jp2klossless.dcm",
    "MR_small_jpeg_ls_lossless.dcm",
]


def test_transfer_syntaxes_convert(tmp_path: Path) -> None:
    export = tmp_path / "export"
    studies = {_stack(name, export / name.removesuffix(".dcm")): name for name in SUPPORTED}
    report = run_convert(export, FakePredictor(), tmp_path / "out")
    outcome = {studies[r.study_uid]: r.status for r in report.studies}
    assert outcome == dict.fromkeys(SUPPORTED, "converted"), [r.reason for r in report.studies]
    plain = next(r for r in report.studies if studies[r.study_uid] == "MR_small.dcm")
    compressed = next(r for r in report.studies if studies[r.study_uid] == "MR_small_RLE.dcm")
    from medsynth.io.readers import read_volume

    a = read_volume(tmp_path / "out" / plain.outputs[0])
    b = read_volume(tmp_path / "out" / compressed.outputs[0])
    np.testing.assert_array_equal(a.array, b.array)  # lossless codecs decode to the same voxels


def test_every_real_file_is_handled_or_explained(tmp_path: Path) -> None:
    export = tmp_path / "export"
    shutil.copytree(Path(get_testdata_file("DICOMDIR")).parent, export / "dicomdir")  # nested, no extensions
    for name in ["emri_small.dcm", "emri_small_RLE.dcm", "reportsi.dcm", "rtplan.dcm", "liver.dcm", "waveform_ecg.dcm",
                 "693_J2KR.dcm", "SC_rgb_expb.dcm", "examples_ybr_color.dcm"]:  # fmt: skip
        shutil.copy(get_testdata_file(name), export / name)
    found = discover(export)
    series = [s for study in found.studies for s in study.series]
    assert series
    for record in series:
        assert record.modality or record.unsupported or record.reason
        if record.modality is None:
            assert (record.unsupported or record.reason).strip()
    reasons = " | ".join(str(s.unsupported) for s in series)
    assert "multi-frame Enhanced MR" in reasons
    assert "non-image object (RT Plan Storage)" in reasons
    assert "non-image object (Segmentation Storage)" in reasons
    assert "single slice" in reasons and "different orientations" in reasons
    usable = [s for s in series if s.unsupported is None]
    assert all(s.dicom_modality in ("CT", "MR", "OT", "US") for s in usable)
