"""Second fault battery (issue 26), items 1, 7 and 8: damaged DICOM pixels are refused, messages say what
is really wrong, and no record of an output gets lost. Real files throughout (DICOM damaged the way the
battery found it), through the command line's ``main`` where the user meets the behaviour (in this
process: a subprocess adds ~10 s of imports per call)."""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.uid import generate_uid
from test_convert import FakePredictor, _series

from medsynth.cli import main
from medsynth.convert import Shard, discover, run_convert
from medsynth.convert.report import ALREADY_CONVERTED, UNREADABLE_REPORT
from medsynth.errors import DataError
from medsynth.inference.run import is_medsynth_output
from medsynth.io.dicom import write_dicom_series
from medsynth.io.readers import read_volume
from medsynth.io.volume import Volume
from medsynth.model.ood import HistogramReference, OODChecker, _is_other_contrast
from medsynth.model.synthesis import SynthesisModel

# The damaged files below are what this battery is about; pydicom warns about some of them on its own.
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


# ----------------------------------------------------------------------------------------- helpers
def _error_line(stderr: str) -> str:
    lines = [line for line in stderr.strip().splitlines() if line]
    assert len(lines) == 1 and lines[0].startswith("error:") and "Traceback" not in stderr, stderr
    return lines[0]


def _held_out_t1(tiny_run: Path, tiny_cohort: Path) -> Volume:
    subject = json.loads((tiny_run / "splits.json").read_text())["test"][0]
    return read_volume(tiny_cohort / subject / "anat" / f"{subject}_T1w.nii.gz")


def _scanner_values(shape: tuple[int, int, int] = (9, 8, 6)) -> Volume:
    """Integer intensities 40..666 on a 1 x 1 x 2 mm grid (stored exactly: slope 1, intercept 0)."""
    values = np.random.default_rng(26).integers(40, 667, size=shape).astype(np.float32)
    return Volume(values, np.diag([1.0, 1.0, 2.0, 1.0]))


def _half_the_pixel_data(path: Path) -> None:
    """Keep half of a slice's PixelData with a consistent element length, as a broken export writes it."""
    ds = pydicom.dcmread(path)
    ds.PixelData = ds.PixelData[: len(ds.PixelData) // 2]
    ds.save_as(path)


def _slope_zero(path: Path) -> None:
    ds = pydicom.dcmread(path)
    ds.RescaleSlope = "0"
    ds.save_as(path)


DAMAGE = {"short_pixel_data": _half_the_pixel_data, "slope_zero": _slope_zero}
REASON = {"short_pixel_data": "pixel data holds 72 of the 144 bytes", "slope_zero": "RescaleSlope is 0"}


# ------------------------------------------------------------------------ item 1: damaged pixels
@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_a_damaged_classic_slice_is_refused_naming_the_file(damage: str, tmp_path: Path) -> None:
    """SimpleITK reads both without a word: half a slice made up, or slope 0 read as slope 1."""
    files = write_dicom_series(_scanner_values(), tmp_path / "t1", series_description="t1")
    DAMAGE[damage](files[3])
    with pytest.raises(DataError) as error:
        read_volume(tmp_path / "t1")
    message = str(error.value)
    assert message.startswith(f"{files[3]}: slice of series") and REASON[damage] in message, message


@pytest.mark.parametrize("damage", ["short_pixel_data", "slope_zero"])
def test_a_damaged_enhanced_multiframe_file_is_refused(damage: str, tmp_path: Path) -> None:
    pytest.importorskip("highdicom")
    from test_dicom_multiframe import convert

    write_dicom_series(_scanner_values(), tmp_path / "classic", series_description="t1")
    folder = convert(tmp_path / "classic", tmp_path / "enhanced")
    path = folder / "multiframe.dcm"
    ds = pydicom.dcmread(path)
    if damage == "short_pixel_data":
        ds.PixelData = ds.PixelData[: len(ds.PixelData) // 2]
    else:
        shared = ds.SharedFunctionalGroupsSequence[0]
        shared.PixelValueTransformationSequence[0].RescaleSlope = 0  # every frame flat at the intercept
    ds.save_as(path)
    with pytest.raises(DataError) as error:
        read_volume(folder)
    message = str(error.value)
    assert message.startswith(f"{path}: multi-frame series") and "cannot be read" in message, message
    assert REASON[damage].replace("72 of the 144", "432 of the 864") in message


def test_infer_volume_dir_refuses_a_short_slice(
    tiny_run: Path, tiny_cohort: Path, tmp_path: Path, capsys
) -> None:
    files = write_dicom_series(_held_out_t1(tiny_run, tiny_cohort), tmp_path / "t1", series_description="T1")
    _half_the_pixel_data(files[10])
    out = tmp_path / "t2.nii.gz"
    argv = ["infer", "--volume", str(tmp_path / "t1"), "--checkpoint", str(tiny_run), "--out", str(out)]
    assert main([*argv, "--quiet"]) == 2
    line = _error_line(capsys.readouterr().err)
    assert f"{files[10]}: slice of series" in line and "pixel data holds" in line
    assert not out.exists() and not (tmp_path / "t2.json").exists()


def test_convert_fails_damaged_studies_with_the_reason_and_names_studies_in_warnings(
    tiny_run: Path, tiny_cohort: Path, tmp_path: Path, capsys
) -> None:
    """Items 1 and 7: a batch over four studies with the trained checkpoint, as research IT runs it."""
    t1 = _held_out_t1(tiny_run, tiny_cohort)
    air = np.random.default_rng(0).normal(-1000, 10, t1.shape)
    ct_like = t1.with_array(np.where(t1.array > np.percentile(t1.array, 60), 40.0, air).astype(np.float32))
    export, studies = tmp_path / "export", {}
    for name, volume in {"intact": t1, "short": t1, "slope0": t1, "ct_like": ct_like}.items():
        studies[name] = generate_uid()
        files = write_dicom_series(
            volume, export / name, series_description="T1 MPRAGE", study_uid=studies[name], patient_id=name
        )
        if name in ("short", "slope0"):
            (_half_the_pixel_data if name == "short" else _slope_zero)(files[7])
    series_uid = pydicom.dcmread(next((export / "ct_like").iterdir())).SeriesInstanceUID

    out = tmp_path / "out"
    assert main(["convert", str(export), "--checkpoint", str(tiny_run), "--out", str(out)]) == 1  # 2 failed
    stderr = capsys.readouterr().err
    rows = {row["study_uid"]: row for row in csv.DictReader((out / "report.csv").open())}
    assert rows[studies["intact"]]["status"] == rows[studies["ct_like"]]["status"] == "converted"
    assert rows[studies["short"]]["status"] == rows[studies["slope0"]]["status"] == "failed"
    assert "pixel data holds" in rows[studies["short"]]["reason"]
    assert "RescaleSlope is 0" in rows[studies["slope0"]]["reason"]

    # The out-of-distribution warning and record name the study and series, never a temporary link folder.
    warnings = [line for line in stderr.splitlines() if "out of distribution" in line]
    assert warnings and all(f"study {studies['ct_like']}, t1 series {series_uid}" in w for w in warnings)
    assert "medsynth-series-links" not in stderr + (out / "report.csv").read_text()
    assert "looks like a CT" in rows[studies["ct_like"]]["ood"]


# --------------------------------------------------------------------- item 7: misleading messages
@pytest.fixture(scope="module")
def checker(tiny_run: Path) -> OODChecker:
    return OODChecker(SynthesisModel.from_checkpoint(tiny_run).fingerprint)


def _write(path: Path, array: np.ndarray, affine: np.ndarray) -> Path:
    nib.save(nib.Nifti1Image(array.astype(np.float32), affine), path)
    return path


def test_contrast_identity_is_claimed_only_on_a_clear_win(
    checker: OODChecker, tiny_run: Path, tiny_cohort: Path, tmp_path: Path
) -> None:
    t1 = _held_out_t1(tiny_run, tiny_cohort)
    subject = Path(t1.source).name.split("_")[0]
    noise = _write(tmp_path / "noise.nii.gz", np.random.default_rng(0).uniform(0, 1000, t1.shape), t1.affine)
    flair = tiny_cohort / subject / "anat" / f"{subject}_FLAIR.nii.gz"
    for path in (noise, flair):  # far from every training contrast: no contrast is named as the match
        (reason,) = checker.check({"t1": read_volume(path)}).reasons
        assert (
            "matches the training" not in reason
            and "no other training contrast matches it clearly (T2w:" in reason
        )
    t2 = tiny_cohort / subject / "anat" / f"{subject}_T2w.nii.gz"
    (reason,) = checker.check({"t1": read_volume(t2)}).reasons
    assert "matches the training T2w images, not T1w" in reason  # a real swap is still called one

    # The battery's near tie (0.042 to T2w vs 0.043 to T1w) is no contrast swap, even within the threshold.
    reference = HistogramReference(np.ones(4) / 4, threshold=0.05, leave_one_out=())
    assert not _is_other_contrast(own=0.043, other=0.042, reference=reference)
    assert _is_other_contrast(own=0.065, other=0.003, reference=reference)


def test_the_histogram_reason_says_what_else_is_off(
    checker: OODChecker, tiny_run: Path, tiny_cohort: Path, tmp_path: Path
) -> None:
    t1 = _held_out_t1(tiny_run, tiny_cohort)
    affine = t1.affine.copy()
    affine[:3, :3] /= 2
    fine = _write(tmp_path / "fine.nii.gz", t1.array.repeat(2, 0).repeat(2, 1).repeat(2, 2), affine)
    reasons = checker.check({"t1": read_volume(fine)}).reasons
    histogram = next(r for r in reasons if "intensity histogram" in r)
    assert "also off: voxel spacing" in histogram and "matches the training" not in histogram


def _two_shard_uids() -> list[str]:
    uids = [f"1.2.826.0.1.3680043.8.498.26{n}" for n in range(4)]
    assert {Shard.owner(uid, 2).index for uid in uids} == {1, 2}
    return uids


def test_a_garbled_shard_report_is_said_to_be_unreadable(tmp_path: Path, capsys) -> None:
    export, out = tmp_path / "export", tmp_path / "out"
    uids = _two_shard_uids()
    for number, uid in enumerate(uids):
        _series(export, f"P{number}", uid, f"MRN-{number}", "T1 MPRAGE", seed=number)
    for k in (1, 2):
        run_convert(export, FakePredictor(), out, shard=f"{k}/2")
    report = out / "report-shard-2-of-2.json"
    report.write_bytes(report.read_bytes()[:200])  # cut mid-write: not JSON any more
    second = [uid for uid in uids if Shard.owner(uid, 2).index == 2]

    assert main(["convert", str(export), "--out", str(out), "--merge-reports"]) == 1
    err = capsys.readouterr().err
    assert "report-shard-2-of-2.json cannot be read" in err and f"its {len(second)} studies" in err
    assert "run shard 2/2 again" in err and "no shard report yet" not in err
    rows = {row["study_uid"]: row for row in json.loads((out / "report.json").read_text())["studies"]}
    for uid in second:
        assert rows[uid]["status"] == "unreported" and rows[uid]["reason"].startswith(UNREADABLE_REPORT)


def test_pick_messages_name_the_command_line_flags(
    tiny_run: Path, tiny_cohort: Path, tmp_path: Path, capsys
) -> None:
    t1 = _held_out_t1(tiny_run, tiny_cohort)
    four_d = _write(tmp_path / "t1_4d.nii.gz", np.stack([t1.array, t1.array], axis=-1), t1.affine)
    base = ["infer", "--checkpoint", str(tiny_run), "--quiet"]
    assert main([*base, "--volume", str(four_d), "--out", str(tmp_path / "a.nii.gz")]) == 2
    assert "pick one with --volume-index N" in _error_line(capsys.readouterr().err)
    assert (
        main([*base, "--volume", str(four_d), "--volume-index", "1", "--out", str(tmp_path / "a.nii.gz")])
        == 0
    )
    capsys.readouterr()

    folder = tmp_path / "two_series"
    write_dicom_series(t1, folder / "a", series_description="T1 one")
    write_dicom_series(t1, folder / "b", series_description="T1 two")
    for sub in ("a", "b"):
        for file in (folder / sub).iterdir():
            file.rename(folder / f"{sub}_{file.name}")
        (folder / sub).rmdir()
    assert main([*base, "--volume", str(folder), "--out", str(tmp_path / "b.nii.gz")]) == 2
    assert "choose one with --series-uid UID" in _error_line(capsys.readouterr().err)
    uid = pydicom.dcmread(next(folder.glob("a_*"))).SeriesInstanceUID
    assert (
        main([*base, "--volume", str(folder), "--series-uid", uid, "--out", str(tmp_path / "b.nii.gz")]) == 0
    )


def test_a_shard_in_other_digits_is_one_line(tmp_path: Path, capsys) -> None:
    (tmp_path / "export").mkdir()
    argv = ["convert", str(tmp_path / "export"), "--checkpoint", str(tmp_path / "model.pt")]
    assert main([*argv, "--out", str(tmp_path / "o"), "--shard", "²/2"]) == 2  # "²".isdigit() is True
    assert "cannot read --shard '²/2'; write it as K/N" in _error_line(capsys.readouterr().err)


# ------------------------------------------------------------------------- item 8: lost records
def test_a_rerun_keeps_the_record_of_each_conversion(tmp_path: Path) -> None:
    export, out = tmp_path / "export", tmp_path / "out"
    uid = "1.2.826.0.1.3680043.8.498.2681"
    _series(export, "P1/A", uid, "MRN-1", "T1 MPRAGE", seed=1)
    series_uid = pydicom.dcmread(next((export / "P1/A").iterdir())).SeriesInstanceUID
    (first,) = run_convert(export, FakePredictor(), out).studies
    assert first.status == "converted" and len(first.outputs) == 2

    rules = tmp_path / "map.yaml"
    rules.write_text('- "(?i)t1": ignore\n')  # the export as seen now offers no input: the record stands
    for mapping in (None, rules):
        run_convert(export, FakePredictor(), out, mapping=mapping)
        (row,) = csv.DictReader((out / "report.csv").open())
        assert (row["status"], row["reason"]) == ("skipped", ALREADY_CONVERTED)
        assert row["inputs"] == f"t1={series_uid}" and row["outputs"].split(";") == first.outputs
        assert json.loads((out / "report.json").read_text())["studies"][0]["outputs"] == first.outputs
        assert row["checkpoint"] == first.checkpoint == "FakePredictor"  # and by which model


def test_mha_and_nifti_outputs_keep_their_own_sidecar_and_uncertainty(
    tiny_run: Path, tiny_cohort: Path, tmp_path: Path
) -> None:
    subject = json.loads((tiny_run / "splits.json").read_text())["test"][0]
    t1 = tiny_cohort / subject / "anat" / f"{subject}_T1w.nii.gz"
    outs = [tmp_path / "X.mha", tmp_path / "X.nii.gz"]
    for out in outs:
        argv = ["infer", "--volume", str(t1), "--checkpoint", str(tiny_run), "--out", str(out), "--quiet"]
        assert main([*argv, "--uncertainty"]) == 0
    where = {outs[0]: tmp_path / "X.mha.json", outs[1]: tmp_path / "X.json"}
    sidecars = {out: json.loads(where[out].read_text()) for out in outs}
    for out, sidecar in sidecars.items():
        assert sidecar["output"] == str(out) and is_medsynth_output(out)
        assert Path(sidecar["uncertainty"]["path"]).exists()
    maps = {Path(s["uncertainty"]["path"]).name for s in sidecars.values()}
    assert maps == {"X_uncertainty.mha", "X_uncertainty.nii.gz"}


def test_an_exported_models_sidecar_carries_the_source_checkpoint_hash(
    tiny_run: Path, tiny_cohort: Path, tmp_path: Path
) -> None:
    exported = tmp_path / "model_ts.pt"
    assert (
        main(["export", "--checkpoint", str(tiny_run), "--format", "torchscript", "--out", str(exported)])
        == 0
    )
    subject = json.loads((tiny_run / "splits.json").read_text())["test"][0]
    t1 = tiny_cohort / subject / "anat" / f"{subject}_T1w.nii.gz"
    out = tmp_path / "syn.nii.gz"
    assert (
        main(["infer", "--volume", str(t1), "--checkpoint", str(exported), "--out", str(out), "--quiet"]) == 0
    )
    described = json.loads((tmp_path / "syn.json").read_text())["checkpoint"]
    assert described["source_checkpoint_sha256"] == SynthesisModel.from_checkpoint(tiny_run).digest
    assert (
        described["sha256"] != described["source_checkpoint_sha256"]
    )  # the export's own hash, and its source's


def test_links_are_followed_inside_the_export_and_reported_when_they_leave_it(tmp_path: Path, caplog) -> None:
    export, elsewhere = tmp_path / "export", tmp_path / "elsewhere"
    inside, outside = "1.2.826.0.1.3680043.8.498.2691", "1.2.826.0.1.3680043.8.498.2692"
    _series(export, "store/A", inside, "MRN-1", "T1 MPRAGE", seed=1)
    _series(elsewhere, "B", outside, "MRN-2", "T1 MPRAGE", seed=2)
    (export / "by_name").mkdir()
    (export / "by_name" / "A").symlink_to(export / "store" / "A")  # walked first: followed, counted once
    (export / "by_name" / "loop").symlink_to(export)  # back to the top: no endless walk
    (export / "by_name" / "B").symlink_to(elsewhere / "B")  # out of the export: not followed, reported
    (export / "by_name" / "gone").symlink_to(tmp_path / "nowhere")

    with caplog.at_level(logging.WARNING, logger="medsynth"):
        found = discover(export)
    notes = [n for n in found.notes if n.startswith("link ")]
    assert any(
        n.startswith("link by_name/B not followed: leads out of") and str(elsewhere / "B") in n for n in notes
    )
    assert any(n.startswith("link by_name/gone not followed: leads nowhere") for n in notes)
    assert "2 symbolic link(s)" in caplog.text
    assert [s.study_uid for s in found.studies] == [inside]
    (series,) = found.studies[0].series
    assert len(series.files) == 6 and all("by_name/A" in str(f) for f in series.files)

    report = run_convert(export, FakePredictor(), tmp_path / "out")
    assert [r.status for r in report.studies] == ["converted"]
    assert any(
        "by_name/B not followed" in n
        for n in json.loads((tmp_path / "out" / "report.json").read_text())["notes"]
    )
