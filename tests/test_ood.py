"""Out-of-distribution checks (medsynth.model.ood) and their infer options (--strict, sidecar ``ood``)."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medsynth.cli import main
from medsynth.data.fingerprint import Fingerprint
from medsynth.data.masks import foreground_mask
from medsynth.io.readers import read_volume
from medsynth.io.volume import Volume
from medsynth.model.ood import OODChecker, check_inputs, js_divergence
from medsynth.model.synthesis import SynthesisModel


def _held_out(tiny_run: Path) -> list[str]:
    splits = json.loads((tiny_run / "splits.json").read_text())
    return [*splits["val"], *splits["test"]]


def _image(cohort: Path, subject: str, suffix: str) -> Path:
    return cohort / subject / "anat" / f"{subject}_{suffix}.nii.gz"


def _write(path: Path, array: np.ndarray, affine: np.ndarray) -> Path:
    nib.save(nib.Nifti1Image(array.astype(np.float32), affine), path)
    return path


def _finer(volume: Volume, path: Path) -> Path:
    """The same head at half the voxel size (each voxel split in 2 x 2 x 2)."""
    array = volume.array.repeat(2, 0).repeat(2, 1).repeat(2, 2)
    affine = volume.affine.copy()
    affine[:3, :3] /= 2
    return _write(path, array, affine)


def _ct_like(volume: Volume, path: Path) -> Path:
    """Air at -1000 HU, soft tissue around 40 HU, on the volume's grid."""
    mask = foreground_mask([volume.array])
    noise = np.random.default_rng(0).normal(0, 10, volume.shape)
    return _write(path, np.where(mask, 40 + noise, -1000 + noise), volume.affine)


@pytest.fixture(scope="module")
def model(tiny_run: Path) -> SynthesisModel:
    return SynthesisModel.from_checkpoint(tiny_run)


def test_js_divergence_is_symmetric_and_bounded() -> None:
    p, q = np.array([1.0, 0.0]), np.array([0.0, 1.0])
    assert js_divergence(p, q) == pytest.approx(np.log(2))
    assert js_divergence(p, q) == js_divergence(q, p)


def test_held_out_subjects_are_in_distribution(
    model: SynthesisModel, tiny_run: Path, tiny_cohort: Path
) -> None:
    checker = OODChecker(model.fingerprint)
    for subject in _held_out(tiny_run):
        report = checker.check({"t1": read_volume(_image(tiny_cohort, subject, "T1w"))})
        assert report.status == "ok", (subject, report.reasons)
        assert report.score is not None and report.score <= report.threshold


@pytest.mark.parametrize(
    ("case", "reason"),
    [
        ("t2_as_t1", "matches the training T2w images"),
        ("finer_spacing", "voxel spacing 3x3x3 mm is outside the training range"),
        ("ct_like", "looks like a CT"),
    ],
)
def test_unlike_inputs_are_flagged(
    case: str, reason: str, model: SynthesisModel, tiny_run: Path, tiny_cohort: Path, tmp_path: Path
) -> None:
    subject = _held_out(tiny_run)[0]
    t1 = read_volume(_image(tiny_cohort, subject, "T1w"))
    path = {
        "t2_as_t1": lambda: _image(tiny_cohort, subject, "T2w"),
        "finer_spacing": lambda: _finer(t1, tmp_path / "fine.nii.gz"),
        "ct_like": lambda: _ct_like(t1, tmp_path / "ct.nii.gz"),
    }[case]()
    report = check_inputs(model.fingerprint, {"t1": read_volume(path)})
    assert report.status == "out_of_distribution"
    assert any(reason in r and str(path) in r for r in report.reasons), report.reasons


def test_infer_warns_writes_the_block_and_strict_refuses(
    tiny_run: Path, tiny_cohort: Path, tmp_path: Path, capsys
) -> None:
    subject = _held_out(tiny_run)[0]
    t2 = _image(tiny_cohort, subject, "T2w")
    out = tmp_path / "syn.nii.gz"
    argv = ["infer", "--volume", f"t1={t2}", "--checkpoint", str(tiny_run), "--out", str(out), "--quiet"]
    assert main(argv) == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if "out of distribution" in line]
    assert len(warnings) == 1 and str(t2) in warnings[0] and warnings[0].startswith("WARNING")
    block = json.loads((tmp_path / "syn.json").read_text())["ood"]
    assert block["status"] == "out_of_distribution" and block["score"] > block["threshold"]
    assert block["reasons"] and "histogram" in block["checks"]

    strict_out = tmp_path / "strict.nii.gz"
    assert main([*argv[:-3], "--out", str(strict_out), "--quiet", "--strict"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: refused (--strict)") and str(t2) in err and "\n" not in err
    assert not strict_out.exists()


def test_held_out_infer_has_an_ok_block(tiny_run: Path, tiny_cohort: Path, tmp_path: Path) -> None:
    t1 = _image(tiny_cohort, _held_out(tiny_run)[1], "T1w")
    out = tmp_path / "syn.nii.gz"
    argv = [
        "infer",
        "--volume",
        str(t1),
        "--checkpoint",
        str(tiny_run),
        "--out",
        str(out),
        "--quiet",
        "--strict",
    ]
    assert main(argv) == 0
    assert json.loads((tmp_path / "syn.json").read_text())["ood"]["status"] == "ok"


def test_fingerprint_without_statistics_is_skipped_with_a_note(
    model: SynthesisModel, tiny_cohort: Path
) -> None:
    old = model.fingerprint.to_dict()
    for entry in old["subjects"].values():
        for stats in entry.values():
            stats.pop("appearance")
    report = check_inputs(
        Fingerprint.from_dict(old), {"t1": read_volume(_image(tiny_cohort, "sub-01", "T1w"))}
    )
    assert report.status == "skipped" and report.ok and "no training statistics" in report.notes[0]


def test_convert_records_the_check_per_study(tiny_run: Path, tiny_cohort: Path, tmp_path: Path) -> None:
    from medsynth.io.dicom import write_dicom_series

    t1 = read_volume(_image(tiny_cohort, _held_out(tiny_run)[0], "T1w"))
    ct = read_volume(_ct_like(t1, tmp_path / "ct.nii.gz"))
    export = tmp_path / "export"
    write_dicom_series(t1, export / "a" / "s", series_description="T1 MPRAGE", patient_id="P1")
    write_dicom_series(ct, export / "b" / "s", series_description="T1 MPRAGE", patient_id="P2")
    out = tmp_path / "out"
    assert main(["convert", str(export), "--checkpoint", str(tiny_run), "--out", str(out)]) == 0
    rows = json.loads((out / "report.json").read_text())["studies"]
    assert sorted(row["ood"]["status"] for row in rows) == ["ok", "out_of_distribution"]
    assert "looks like a CT" in (out / "report.csv").read_text()
    sidecars = [json.loads(p.read_text()) for p in out.rglob("t2.json")]
    assert sorted(s["ood"]["status"] for s in sidecars) == ["ok", "out_of_distribution"]


def test_an_augmented_run_accepts_the_protocols_its_training_covered(tiny_cohort: Path) -> None:
    """An MPRAGE T1w is a false alarm for a model trained with intensity augmentation; a T2w is not.

    The plain reference (the training subjects' mean histogram) flags both held-out MPRAGE T1w; the
    fingerprint of a ``data.augment: robust`` run keeps 16 augmented appearances per training subject and
    compares with the nearest, which accepts them and still calls a T2w given as the T1w unlike.
    """
    from medsynth.data import demo
    from medsynth.data.augment import APPEARANCE_DRAWS, appearance_draws
    from medsynth.data.fingerprint import NormalizationSpec

    def training():
        for subject in ("sub-01", "sub-02", "sub-03"):
            yield subject, {"t1": read_volume(_image(tiny_cohort, subject, "T1w"))}

    specs = {"t1": NormalizationSpec.for_modality("t1")}
    draws = appearance_draws("robust", ("t1",), spatial_dims=2, axis=2)
    augmented = Fingerprint.compute(training(), specs, augmented=draws)
    appearance = augmented.subjects["sub-01"]["t1"]["appearance"]
    assert len(appearance["augmented_histograms"]) == APPEARANCE_DRAWS
    # The reference samples the recipe's kinds, not how often the recipe applies them.
    rare = appearance_draws({"intensity": True, "bias": True, "probability": 0.02}, ("t1",), 2, axis=2)
    assert Fingerprint.compute(training(), specs, augmented=rare).to_dict() == augmented.to_dict()
    assert Fingerprint.compute(training(), specs, augmented=draws).to_dict() == augmented.to_dict()
    plain, robust = OODChecker(Fingerprint.compute(training(), specs)), OODChecker(augmented)
    for index in (3, 4):  # sub-04 and sub-05, acquired as an MPRAGE (cohort seed 3)
        mprage = demo.simulate_subject(index, 6.0, seed=3, protocol="mprage")[0]["t1"]
        assert not plain.check({"t1": mprage}).ok
        report = robust.check({"t1": mprage})
        assert report.ok, report.reasons
        assert "augment" in report.checks["histogram"]["t1"]["reference"]
    t2 = robust.check({"t1": read_volume(_image(tiny_cohort, "sub-04", "T2w"))})
    assert not t2.ok and "unlike the training T1w" in t2.summary()


def test_histogram_standardisation_leaves_the_screen_its_view(tiny_cohort: Path) -> None:
    """A ``histogram`` spec would match any input's deciles to the training ones, a T2w given as the
    T1w included; the screen compares the percentile scheme's view, so its verdicts do not change."""
    from medsynth.data.fingerprint import NormalizationSpec

    training = [
        (s, {"t1": read_volume(_image(tiny_cohort, s, "T1w"))}) for s in ("sub-01", "sub-02", "sub-03")
    ]
    plain = OODChecker(Fingerprint.compute(training, {"t1": NormalizationSpec()}))
    standardised = OODChecker(Fingerprint.compute(training, {"t1": NormalizationSpec(scheme="histogram")}))
    for suffix in ("T1w", "T2w"):
        volume = read_volume(_image(tiny_cohort, "sub-04", suffix))
        expected, report = plain.check({"t1": volume}), standardised.check({"t1": volume})
        assert (report.ok, report.score) == (expected.ok, expected.score)
        assert report.ok is (suffix == "T1w")


def test_a_standardised_source_is_screened_against_the_protocols_it_covers() -> None:
    """Without ``data.augment``, a ``histogram`` source's reference still spans the robust preset's
    appearances (the changes standardisation takes out); a percentile source's does not."""
    from medsynth.config import load_config
    from medsynth.data.augment import PRESETS
    from medsynth.engine.setup import normalization_specs, screen_draws
    from medsynth.task import Task

    histogram = load_config("demo_cpu", ["data.normalization={t1: {scheme: histogram}}"])
    task = Task.parse(histogram.task)
    draws = screen_draws(histogram, task, normalization_specs(histogram, ("t1", "t2")))
    assert draws is not None and draws.modalities == ("t1",) and draws.spec == PRESETS["robust"]
    plain = load_config("demo_cpu")
    assert screen_draws(plain, task, normalization_specs(plain, ("t1", "t2"))) is None
    augmented = load_config("demo_cpu", ["data.augment=robust"])
    assert screen_draws(augmented, task, normalization_specs(augmented, ("t1", "t2"))).modalities == ("t1",)
