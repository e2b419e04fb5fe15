"""``medsynth convert`` end to end with a real trained checkpoint (not a stand-in predictor)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pydicom

from medsynth.cli import main
from medsynth.io.dicom import write_dicom_series
from medsynth.io.readers import read_volume


def _tree_digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in root.rglob("*")
        if p.is_file()
    }


def test_convert_a_dicom_export_with_a_trained_checkpoint(
    tiny_run: Path, tiny_cohort: Path, tmp_path: Path
) -> None:
    export = tmp_path / "export"
    t1 = read_volume(tiny_cohort / "sub-05" / "anat" / "sub-05_T1w.nii.gz")
    files = write_dicom_series(t1, export / "study" / "a", series_description="T1 MPRAGE", patient_id="P1")
    study_uid = pydicom.dcmread(files[0]).StudyInstanceUID
    before = _tree_digest(export)

    out = tmp_path / "out"
    code = main(["convert", str(export), "--checkpoint", str(tiny_run / "checkpoint_best.pt"), "--out", str(out),
                 "--format", "both"])  # fmt: skip
    assert code == 0
    assert _tree_digest(export) == before  # the export is never written to
    report = (out / "report.csv").read_text()
    assert "converted" in report and study_uid in report

    reference = read_volume(export / "study" / "a")
    synthetic_nifti = next(out.rglob("t2.nii.gz"))
    synthetic = read_volume(synthetic_nifti)
    assert synthetic.shape == reference.shape
    np.testing.assert_allclose(synthetic.affine, reference.affine, atol=1e-4)
    derived_folder = next(p.parent for p in out.rglob("*.dcm"))
    derived = read_volume(derived_folder)
    np.testing.assert_allclose(derived.affine, reference.affine, atol=1e-4)
    first = pydicom.dcmread(next(derived_folder.glob("*.dcm")))
    assert first.StudyInstanceUID == study_uid and "DERIVED" in first.ImageType
    assert first.SeriesInstanceUID != pydicom.dcmread(files[0]).SeriesInstanceUID

    assert main(["convert", str(export), "--checkpoint", str(tiny_run), "--out", str(out)]) == 0
    assert "skipped" in (out / "report.csv").read_text()  # done studies are not converted twice
