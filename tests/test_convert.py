"""medsynth convert: discovery, classification, planning and conversion of DICOM exports built in tmp_path."""

from __future__ import annotations

import csv
import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from medsynth.convert import SeriesMapping, Shard, discover, run_convert
from medsynth.convert.classify import classify_series
from medsynth.convert.discovery import SeriesRecord
from medsynth.convert.naming import patient_key, safe_uid
from medsynth.convert.runner import worker_threads
from medsynth.errors import ConfigError, MedsynthError
from medsynth.io.dicom import write_dicom_series
from medsynth.io.readers import read_volume
from medsynth.io.volume import Volume


class FakePredictor:
    """Stands in for a trained T1 -> T2 model: returns a scaled copy of the T1 on its grid."""

    required_modalities = ("t1",)
    target = "t2"

    def predict(self, inputs: dict[str, Volume], target: str | None = None) -> Volume:
        return inputs["t1"].with_array(inputs["t1"].array * 0.5 + 10.0)


def _oblique_volume(seed: int, shape: tuple[int, int, int] = (12, 10, 6)) -> Volume:
    rng = np.random.default_rng(seed)
    theta = 0.2
    rotation = np.array([[np.cos(theta), -np.sin(theta), 0], [np.sin(theta), np.cos(theta), 0], [0, 0, 1]])
    affine = np.eye(4)
    affine[:3, :3] = rotation @ np.diag([0.9, 1.1, 2.5])
    affine[:3, 3] = [-5.0, 12.0, 30.0]
    return Volume(rng.integers(0, 900, size=shape).astype(np.float32), affine)


def _series(root: Path, name: str, study_uid: str, patient: str, description: str, seed: int, **tags) -> Path:
    """Write a tiny MR series, then scatter its files under extension-less names with extra header tags."""
    staging = root.parent / f"staging-{name}"
    files = write_dicom_series(
        _oblique_volume(seed),
        staging,
        series_description=description,
        study_uid=study_uid,
        patient_id=patient,
    )
    target = root / name
    target.mkdir(parents=True)
    for number, path in enumerate(files):
        ds = pydicom.dcmread(path)
        for keyword, value in tags.items():
            setattr(ds, keyword, value)
        ds.save_as(target / f"{number:04d}", enforce_file_format=True)  # no extension, like scanner exports
    shutil.rmtree(staging)
    return target


def _structured_report(path: Path, study_uid: str) -> None:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.88.11"
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, generate_uid()
    ds.Modality, ds.PatientID = "SR", "MRN-0001"
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)


# The export holds a deliberately corrupt file, which pydicom warns about while discovery reports it.
pytestmark = pytest.mark.filterwarnings("ignore:End of file reached:UserWarning")

STUDY_A, STUDY_B, STUDY_C, STUDY_D = (f"1.2.826.0.1.3680043.8.498.{n}" for n in (11, 22, 33, 44))


@pytest.fixture
def export(tmp_path: Path) -> Path:
    """Four studies of two patients, with every awkward thing a real export holds."""
    root = tmp_path / "export"
    # Study A: T1 and T2 (the T1 is chosen), plus a structured report.
    _series(root, "P1/A/s1", STUDY_A, "MRN-0001", "t1_mprage_sag", 1)
    _series(root, "P1/A/s2", STUDY_A, "MRN-0001", "t2_tse_tra", 2)
    _structured_report(root / "P1" / "A" / "sr" / "report", STUDY_A)
    # Study B, same patient: a crafted description and a series known only by its TR/TE.
    _series(root, "P1/B/x", STUDY_B, "MRN-0001", "../../../../escape T1", 3)
    _series(root, "P1/B/y", STUDY_B, "MRN-0001", "series 7", 4, RepetitionTime=2500, EchoTime=90)
    # Study C: no T1 at all.
    _series(root, "P2/C", STUDY_C, "MRN-0002", "AX FLAIR", 5)
    # Study D: a T1 whose pixel data is cut short.
    broken = _series(root, "P2/D", STUDY_D, "MRN-0002", "T1 SE", 6)
    victim = sorted(broken.iterdir())[2]
    victim.write_bytes(victim.read_bytes()[:-150])
    # A file that claims to be DICOM but is garbage, and a stray text file.
    (root / "P2" / "junk").write_bytes(b"\0" * 128 + b"DICM" + b"\xff" * 40)
    (root / "README.txt").write_text("export notes")
    return root


def _hash_tree(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in root.rglob("*")
        if p.is_file()
    }


def test_discovery_groups_studies_and_classifies(export: Path) -> None:
    found = discover(export)
    assert [s.study_uid for s in found.studies] == [STUDY_A, STUDY_B, STUDY_C, STUDY_D]
    modalities = {s.study_uid: sorted(str(r.modality) for r in s.series) for s in found.studies}
    assert modalities[STUDY_A] == ["None", "t1", "t2"]
    assert modalities[STUDY_B] == ["t1", "t2"]  # 'series 7' is T2 by its long TR and long TE
    assert modalities[STUDY_C] == ["flair"]
    sr = next(r for r in found.studies[0].series if not r.is_image)
    assert "non-image" in str(sr.unsupported)
    assert any("skipped 1 non-image" in note for note in found.notes)
    assert any(note.startswith("unreadable file P2/junk") for note in found.notes)
    assert not any("MRN" in note for note in found.notes)


def test_convert_writes_outputs_report_and_leaves_input_untouched(export: Path, tmp_path: Path) -> None:
    before = _hash_tree(export)
    out = tmp_path / "out"
    report = run_convert(export, FakePredictor(), out, fmt="both")
    assert _hash_tree(export) == before

    status = {r.study_uid: (r.status, r.reason) for r in report.studies}
    assert status[STUDY_A][0] == status[STUDY_B][0] == "converted"
    assert status[STUDY_C] == ("skipped", "no usable series for t1")
    assert status[STUDY_D][0] == "failed" and "cannot be read" in status[STUDY_D][1]
    assert report.failed

    rows = list(csv.DictReader((out / "report.csv").open()))
    assert [row["status"] for row in rows] == ["converted", "converted", "skipped", "failed"]
    assert json.loads((out / "report.json").read_text())["summary"]["failed"] == 1
    assert "MRN" not in (out / "report.csv").read_text() + (out / "report.json").read_text()

    # Folder names come from hashes and UIDs only: the crafted description went nowhere.
    study_b = out / patient_key("MRN-0001") / STUDY_B
    assert sorted(p.name for p in study_b.iterdir()) == ["dicom_t2", "t2.json", "t2.nii.gz"]
    assert not any("escape" in str(p) for p in tmp_path.rglob("*"))

    reference = read_volume(export / "P1" / "A" / "s1")
    study_a = out / patient_key("MRN-0001") / STUDY_A
    nifti = read_volume(study_a / "t2.nii.gz")
    np.testing.assert_allclose(nifti.affine, reference.affine, atol=1e-4)
    np.testing.assert_allclose(nifti.array, reference.array * 0.5 + 10.0, rtol=1e-6)

    files = sorted((study_a / "dicom_t2").iterdir())
    headers = [pydicom.dcmread(f) for f in files]
    source = pydicom.dcmread(next((export / "P1" / "A" / "s1").iterdir()))
    assert {h.StudyInstanceUID for h in headers} == {STUDY_A}
    assert (
        len({h.SeriesInstanceUID for h in headers}) == 1
        and headers[0].SeriesInstanceUID != source.SeriesInstanceUID
    )
    assert list(headers[0].ImageType[:2]) == ["DERIVED", "SECONDARY"]
    assert "medsynth" in headers[0].SeriesDescription and headers[0].PatientID == "MRN-0001"
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames([str(f) for f in files])
    image, original = (
        reader.Execute(),
        sitk.ReadImage([str(f) for f in sorted((export / "P1/A/s1").iterdir())]),
    )
    assert image.GetSize() == original.GetSize()
    np.testing.assert_allclose(image.GetOrigin(), original.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(image.GetSpacing(), original.GetSpacing(), atol=1e-4)
    np.testing.assert_allclose(image.GetDirection(), original.GetDirection(), atol=1e-5)

    sidecar = json.loads((study_a / "t2.json").read_text())
    assert sidecar["inputs"] == {"t1": source.SeriesInstanceUID} and sidecar["formats"] == ["nifti", "dicom"]


def test_rerun_skips_done_studies_unless_overwrite(export: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    run_convert(export, FakePredictor(), out, fmt="nifti")
    nifti = out / patient_key("MRN-0001") / STUDY_A / "t2.nii.gz"
    stamp = nifti.stat().st_mtime_ns
    again = run_convert(export, FakePredictor(), out, fmt="nifti")
    assert {r.study_uid: r.status for r in again.studies}[STUDY_A] == "skipped"
    assert nifti.stat().st_mtime_ns == stamp
    wider = run_convert(export, FakePredictor(), out, fmt="both")  # DICOM not written yet: not done
    assert {r.study_uid: r.status for r in wider.studies}[STUDY_A] == "converted"
    redo = run_convert(export, FakePredictor(), out, fmt="both", overwrite=True)
    assert {r.study_uid: r.status for r in redo.studies}[STUDY_A] == "converted"
    assert len(list((out / patient_key("MRN-0001") / STUDY_A).glob(".*"))) == 0  # no staging left behind


def test_dry_run_writes_nothing_and_plans(export: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    report = run_convert(export, FakePredictor(), out, dry_run=True)
    assert not out.exists()
    assert [r.status for r in report.studies] == ["planned", "planned", "skipped", "planned"]


def test_mapping_overrides_rules(export: Path, tmp_path: Path) -> None:
    rules = tmp_path / "map.yaml"
    rules.write_text('- "(?i)flair": t1\n- "(?i)^t2_tse": ignore\n')
    found = discover(export, SeriesMapping.from_yaml(rules))
    by_study = {s.study_uid: {r.description: r.modality for r in s.series} for s in found.studies}
    assert by_study[STUDY_C]["AX FLAIR"] == "t1"
    assert by_study[STUDY_A]["t2_tse_tra"] is None
    rules.write_text('"(?i)flair": banana\n')
    with pytest.raises(ConfigError, match="map.yaml"):
        SeriesMapping.from_yaml(rules)


def test_shards_partition_studies(export: Path, tmp_path: Path) -> None:
    seen = []
    for k in (1, 2, 3):
        report = run_convert(export, FakePredictor(), tmp_path / "out", dry_run=True, shard=f"{k}/3")
        seen += [r.study_uid for r in report.studies]
    assert sorted(seen) == [STUDY_A, STUDY_B, STUDY_C, STUDY_D]
    for bad in ("0/3", "4/3", "two"):
        with pytest.raises(MedsynthError, match="shard"):
            Shard.parse(bad)


def test_output_inside_input_is_refused(export: Path) -> None:
    with pytest.raises(MedsynthError, match="inside the input"):
        run_convert(export, FakePredictor(), export / "synthetic")


def test_workers_convert_in_processes(export: Path, tmp_path: Path) -> None:
    report = run_convert(export, FakePredictor(), tmp_path / "out", workers=2)
    assert report.count("converted") == 2 and report.count("failed") == 1
    assert worker_threads(3, cpus=2) == 1 and worker_threads(2, cpus=16) == 8


@pytest.mark.parametrize(
    ("tags", "expected"),
    [
        ({"description": "AX T1 POST GAD"}, "t1c"),
        (
            {"description": "sag 3d", "repetition_time": 8.0, "echo_time": 3.0, "contrast_agent": "Gadovist"},
            "t1c",
        ),
        (
            {"description": "cor", "repetition_time": 9000.0, "echo_time": 120.0, "inversion_time": 2500.0},
            "flair",
        ),
        ({"description": "ax", "repetition_time": 3000.0, "echo_time": 15.0}, "pd"),
        ({"description": "T2 localizer"}, None),
        ({"description": "ep2d_diff T2"}, None),
        ({"description": "T2w synthetic (medsynth)"}, None),
        ({"description": "T1", "dicom_modality": "US"}, None),
        ({"description": "head", "dicom_modality": "CT"}, "ct"),
        ({"description": "mystery"}, None),
    ],
)
def test_classification_rules(tags: dict, expected: str | None) -> None:
    series = SeriesRecord(series_uid="1.2.3", **{"dicom_modality": "MR", **tags})
    decided = classify_series(series)
    assert decided.modality == expected, decided.reason
    assert decided.reason


def test_names_never_come_from_tag_text() -> None:
    assert safe_uid("1.2.3") == "1.2.3"
    assert "/" not in safe_uid("../../etc") and safe_uid("../../etc").startswith("h-")
    assert patient_key("MRN-0001") != patient_key("MRN-0002") and "MRN" not in patient_key("MRN-0001")


def test_command_line_dry_run_and_exit_code(export: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    import argparse

    from medsynth.convert import add_convert_arguments, convert_command, runner

    monkeypatch.setattr(runner, "_load_predictor", lambda *_: FakePredictor())
    checkpoint = tmp_path / "model.pt"
    checkpoint.write_bytes(b"weights")
    parser = argparse.ArgumentParser()
    add_convert_arguments(parser)
    out = tmp_path / "out"
    args = parser.parse_args([str(export), "--checkpoint", str(checkpoint), "--out", str(out), "--dry-run"])
    assert convert_command(args) == 0
    printed = capsys.readouterr().out
    assert f"study {STUDY_C}" in printed and "skip: no usable series for t1" in printed
    assert "MRN" not in printed and not out.exists()
    args = parser.parse_args(
        [str(export), "--checkpoint", str(checkpoint), "--out", str(out), "--shard", "1/1"]
    )
    assert convert_command(args) == 1  # study D failed
    sidecar = json.loads(next(out.rglob("t2.json")).read_text())
    assert sidecar["checkpoint"].startswith("model.pt sha256:")


def test_a_study_whose_outputs_vanished_is_not_done(tmp_path: Path) -> None:
    """A sidecar alone does not mark a study done: a killed overwrite may have removed its DICOM series."""
    from medsynth.convert.runner import _already_done

    (tmp_path / "t2.nii.gz").write_bytes(b"x")
    sidecar = tmp_path / "t2.json"
    sidecar.write_text(json.dumps({"formats": ["nifti", "dicom"], "outputs": ["t2.nii.gz", "dicom_t2"]}))
    assert not _already_done(sidecar, "both")
    (tmp_path / "dicom_t2").mkdir()
    assert _already_done(sidecar, "both")
