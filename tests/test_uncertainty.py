"""``infer --uncertainty``: the TTA map on the output grid, its sidecar summary, and its calibration."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np

from medsynth.cli import main
from medsynth.io.readers import read_volume
from medsynth.io.volume import to_canonical
from medsynth.model.synthesis import SynthesisModel
from medsynth.model.uncertainty import (
    ESTIMATOR,
    MEMBERS,
    calibration,
    canonical_inputs,
    uncertainty_map,
)


def _image(cohort: Path, subject: str, suffix: str) -> Path:
    return cohort / subject / "anat" / f"{subject}_{suffix}.nii.gz"


def test_infer_writes_the_map_on_the_output_grid(tiny_run: Path, tiny_cohort: Path, tmp_path: Path) -> None:
    source = _image(tiny_cohort, "sub-01", "T1w")
    out = tmp_path / "syn.nii.gz"
    argv = ["infer", "--volume", str(source), "--checkpoint", str(tiny_run), "--out", str(out), "--quiet"]
    assert main([*argv, "--uncertainty"]) == 0
    path = tmp_path / "syn_uncertainty.nii.gz"
    got, want = nib.load(path), nib.load(out)
    assert got.shape == want.shape and got.get_data_dtype() == np.float32
    np.testing.assert_allclose(got.affine, want.affine, atol=1e-6)
    data = np.asarray(got.dataobj)
    assert data.min() >= 0 and data.max() > 0
    summary = json.loads((tmp_path / "syn.json").read_text())["uncertainty"]
    assert (
        summary["path"] == str(path) and summary["mean_in_mask"] > 0 and "test-time" in summary["estimator"]
    )


def test_uncertainty_tracks_the_error_on_held_out_subjects(tiny_run: Path, tiny_cohort: Path) -> None:
    """The weak property the 2-epoch tiny model shows: positive rank correlation, top decile worse.

    (The issue's targets, Spearman >= 0.3 and ratio >= 2, need a trained model: docs/trust.md.)
    """
    model = SynthesisModel.from_checkpoint(tiny_run)
    splits = json.loads((tiny_run / "splits.json").read_text())
    for subject in [*splits["val"], *splits["test"]]:
        t1 = read_volume(_image(tiny_cohort, subject, "T1w"))
        t2 = read_volume(_image(tiny_cohort, subject, "T2w"))
        prediction = model.predict({"t1": t1})
        normalised, mask, _, target = canonical_inputs(model, {"t1": t1}, None)
        unc = uncertainty_map(model, normalised, mask, target, prediction)
        assert unc.estimator == ESTIMATOR
        spread = unc.values
        truth = model.normalise({"t2": to_canonical(t2)[0].array})["t2"]
        result = calibration(spread, prediction.normalised - truth, mask)
        assert result["spearman"] > 0 and result["top_decile_error_ratio"] > 1, (subject, result)
    assert len(MEMBERS) == 4
