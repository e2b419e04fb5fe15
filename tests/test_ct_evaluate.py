"""MR -> CT end to end on the tiny demo cohort: a two-input CT model trains, and `medsynth evaluate` scores it
and the radiotherapy baselines in Hounsfield units, with the range-error figure; nothing in training knew
the target was a CT."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from conftest import tiny_config

from medsynth.baselines import BoneThresholdBaseline, BulkDensityBaseline
from medsynth.cli import main
from medsynth.data.layouts import load_subject, scan_dataset
from medsynth.engine.run import claim_run_dir, train
from medsynth.io.volume import to_canonical
from medsynth.model.synthesis import SynthesisModel


@pytest.fixture(scope="module")
def ct_run(tiny_cohort: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("ct") / "t1t2_ct"
    config = tiny_config(tiny_cohort, task="t1,t2->ct", extra=["data.normalization={ct: {scheme: window}}"])
    claim_run_dir(run, config)
    train(config, run, quiet=True)
    return run


def test_a_ct_model_returns_calibrated_hu(ct_run: Path, tiny_cohort: Path) -> None:
    model = SynthesisModel.from_checkpoint(ct_run, precision="fp32")
    record = scan_dataset(tiny_cohort)[0]
    volumes = load_subject(record, ["t1", "t2", "ct"])
    prediction = model.predict({"t1": volumes["t1"], "t2": volumes["t2"]})
    # The window normaliser's inverse is the only map back: normalised -1..1 is exactly -1024..3071 HU.
    expected = (prediction.normalised.astype(np.float64) + 1.0) * 2047.5 - 1024.0
    canonical, _ = to_canonical(prediction.volume)
    np.testing.assert_allclose(canonical.array, expected, atol=1e-3)
    assert canonical.array.min() >= -1024.0 - 1e-3 and canonical.array.max() <= 3071.0 + 1e-3


def test_evaluate_scores_a_ct_target_in_hu_against_the_baselines(
    ct_run: Path, tmp_path: Path, capsys
) -> None:
    out = tmp_path / "eval"
    assert main(["evaluate", "--run", str(ct_run), "--baselines", "--out", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "Hounsfield units" in printed and "bone Dice" in printed
    rows = list(csv.DictReader((out / "metrics.csv").open()))
    methods = {row["method"] for row in rows}
    assert methods == {"model", "lut", "bulk", "bone_threshold"}  # no "identity": an MR is no CT estimate
    for row in rows:
        for column in ("mae_hu", "me_hu", "psnr_hu", "ms_ssim", "bone_dice", "bone_hd95_mm",
                       "range_error_mean_mm", "range_error_p95_mm"):  # fmt: skip
            assert row[column] != "", (row["method"], column)
    bulk = next(r for r in rows if r["method"] == "bulk")
    # Water inside the head: the mean error is minus the mean HU of the real head, bone Dice is zero.
    assert float(bulk["bone_dice"]) == 0.0 and float(bulk["me_hu"]) < 0
    summary = json.loads((out / "summary.json").read_text())
    assert any("mae_hu" in group for group in summary["groups"])
    assert sorted(p.name for p in out.glob("*.png")) == [f"{row['subject']}_t1-t2_to_ct.png" for row in rows
                                                          if row["method"] == "model"]  # fmt: skip
    card = (ct_run / "model_card.md").read_text()
    assert "In Hounsfield units" not in card  # evaluated elsewhere: the run's card is not rewritten
    assert main(["evaluate", "--run", str(ct_run), "--baselines", "--quiet"]) == 0
    assert "In Hounsfield units" in (ct_run / "model_card.md").read_text()


def test_the_bone_threshold_baseline_finds_dark_bone() -> None:
    source = np.full((20, 20, 4), 0.5, np.float32)
    ct = np.full(source.shape, 30.0, np.float32)
    source[5:8], ct[5:8] = -0.9, 1400.0  # a dark slab that is bone on CT
    mask = np.ones(source.shape, bool)
    baseline = BoneThresholdBaseline().fit([(source, ct, mask)])
    assert -0.9 < baseline.threshold <= 0.5 and baseline.bone_hu == pytest.approx(1400.0)
    predicted = baseline.predict_hu(source, mask)
    np.testing.assert_array_equal(predicted, ct)
    assert BoneThresholdBaseline.from_dict(baseline.to_dict()).threshold == baseline.threshold
    bulk = BulkDensityBaseline().predict_hu(source, mask[..., :2].repeat(2, axis=-1) & (source > 0))
    assert set(np.unique(bulk)) == {-1000.0, 0.0}
