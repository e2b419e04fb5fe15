"""Calibrated uncertainty: the Laplace scale head (training, plan, synthesis, infer) and
``medsynth evaluate --uncertainty`` (columns, summary block, figures), on the tiny cohort."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from matplotlib.image import imread

from medsynth.cli import main
from medsynth.data.masks import foreground_mask
from medsynth.engine.run import claim_run_dir, train
from medsynth.errors import ConfigError
from medsynth.io.readers import read_volume
from medsynth.io.volume import to_canonical
from medsynth.losses import l1_loss, laplace_nll
from medsynth.model.checkpoint import load_checkpoint
from medsynth.model.plan import NetworkSpec, SynthesisPlan
from medsynth.model.support import TrainingSupport
from medsynth.model.synthesis import SynthesisModel
from medsynth.model.uncertainty import (
    MEMBERS,
    SCALE_ESTIMATOR,
    TOTAL_ESTIMATOR,
    canonical_inputs,
    insert_lesion,
    lesion_contrast,
    mixture_scale,
    tta_members,
    uncertainty_map,
)
from medsynth.nets.unet import UNet
from medsynth.task import Task
from medsynth.viz import MAX_WIDTH_TO_HEIGHT
from tests.conftest import tiny_config


def _image(cohort: Path, subject: str, suffix: str) -> Path:
    return cohort / subject / "anat" / f"{subject}_{suffix}.nii.gz"


@pytest.fixture(scope="module")
def scale_run(tiny_cohort: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny t1->t2 run of conftest with a scale head (``model.predict_scale``)."""
    run_dir = tmp_path_factory.mktemp("runs") / "scale"
    config = tiny_config(tiny_cohort, extra=["model.predict_scale=true"])
    claim_run_dir(run_dir, config)
    train(config, run_dir, quiet=True)
    return run_dir


# ------------------------------------------------------------------------------------ the loss
def test_laplace_nll_is_l1_at_unit_scale() -> None:
    torch.manual_seed(0)
    mean, target = torch.rand(2, 1, 5, 5) * 2 - 1, torch.rand(2, 1, 5, 5) * 2 - 1
    mask = torch.rand(2, 1, 5, 5) > 0.3
    zero = torch.zeros_like(mean)
    torch.testing.assert_close(laplace_nll(mean, zero, target, mask, beta=0.0), l1_loss(mean, target, mask))


def test_beta_one_gives_the_mean_l1_gradient_and_b_the_mean_error() -> None:
    """beta = 1: the image trains exactly as with L1; b's gradient is ``b - |r|`` (optimum E|r|)."""
    torch.manual_seed(1)
    target = torch.rand(1, 1, 4, 4)
    mean = torch.zeros(1, 1, 4, 4, requires_grad=True)
    log_b = torch.full((1, 1, 4, 4), -1.0, requires_grad=True)
    laplace_nll(mean, log_b, target, beta=1.0).backward()
    reference = torch.zeros(1, 1, 4, 4, requires_grad=True)
    l1_loss(reference, target).backward()
    torch.testing.assert_close(mean.grad, reference.grad)
    want = (np.exp(-1.0) - target.abs()) / target.numel()
    torch.testing.assert_close(log_b.grad, want)


def test_laplace_nll_checks_shapes() -> None:
    with pytest.raises(ValueError, match="one shape"):
        laplace_nll(torch.zeros(1, 1, 2, 2), torch.zeros(1, 2, 2, 2), torch.zeros(1, 1, 2, 2))


# --------------------------------------------------------------------------- the mixture scale
def test_mixture_scale_matches_a_sampled_mixture_of_laplace_members() -> None:
    means = np.array([[0.0, 0.2], [0.1, -0.2], [0.3, 0.0], [0.0, 0.1]])
    scales = np.array([[0.05, 0.1], [0.1, 0.1], [0.02, 0.3], [0.05, 0.2]])
    rng = np.random.default_rng(0)
    member = rng.integers(0, 4, size=400_000)
    samples = rng.laplace(means[member], scales[member])  # (samples, 2 voxels)
    sampled = np.sqrt(samples.var(axis=0) / 2.0)  # a Laplace's variance is 2 b^2
    np.testing.assert_allclose(mixture_scale(means, scales), sampled, rtol=0.01)
    # Identical members: the scale itself; no scale: the spread alone.
    np.testing.assert_allclose(mixture_scale(np.zeros((4, 2)), scales[:1].repeat(4, 0)), scales[0])
    np.testing.assert_allclose(mixture_scale(means, np.zeros_like(scales)), means.std(axis=0) / np.sqrt(2))


def test_the_scale_estimator_needs_a_head(tiny_run: Path, tiny_cohort: Path) -> None:
    model = SynthesisModel.from_checkpoint(tiny_run)
    t1 = read_volume(_image(tiny_cohort, "sub-01", "T1w"))
    prediction = model.predict({"t1": t1})
    normalised, mask, _, target = canonical_inputs(model, {"t1": t1}, None, prediction.mask)
    with pytest.raises(ValueError, match="needs a model with a scale head"):
        uncertainty_map(model, normalised, mask, target, prediction, estimator="scale")
    with pytest.raises(ValueError, match="one of auto, scale, tta"):
        uncertainty_map(model, normalised, mask, target, prediction, estimator="mc_dropout")


# ------------------------------------------------------------------------------- the network
@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_unet_tanh_scale_bounds_the_mean_only(spatial_dims: int) -> None:
    torch.manual_seed(0)
    net = UNet(spatial_dims, 1, 2, base_channels=4, depth=2, final_activation="tanh_scale")
    with torch.no_grad():
        for p in net.parameters():
            p.mul_(50)  # push pre-activations far outside [-1, 1]
        out = net(torch.randn(2, 1, *([12] * spatial_dims)))
    assert out.shape == (2, 2, *([12] * spatial_dims))
    assert out[:, 0].abs().max() <= 1 and out[:, 1].abs().max() > 1


def test_unet_tanh_scale_needs_two_channels() -> None:
    with pytest.raises(ConfigError, match="out_channels must be 2"):
        UNet(2, 1, 1, base_channels=4, depth=2, final_activation="tanh_scale")


def test_predict_scale_needs_the_unet(tiny_cohort: Path) -> None:
    with pytest.raises(ConfigError, match="predict_scale needs the unet"):
        tiny_config(tiny_cohort, extra=["model.predict_scale=true", "model.generator=resvit"])


# ---------------------------------------------------------------------------------- the plan
def _plan(activation: str | None, **extra: object) -> SynthesisPlan:
    spec = NetworkSpec("unet", {"final_activation": activation})
    return SynthesisPlan(task=Task.parse("t1->t2"), generator=spec, **extra)  # type: ignore[arg-type]


def test_plan_scale_channel_follows_the_generator_and_old_plans_load() -> None:
    assert _plan("tanh_scale").scale_channel is True and _plan("tanh").scale_channel is False
    old = _plan("tanh").to_dict()
    del old["scale_channel"]  # a plan written before the field existed
    assert SynthesisPlan.from_dict(old).scale_channel is False
    assert SynthesisPlan.from_dict(_plan("tanh_scale").to_dict()).scale_channel is True
    with pytest.raises(ConfigError, match="contradicts"):
        _plan("tanh", scale_channel=True)


# ----------------------------------------------------------------------- training and infer
def test_scale_head_trains_and_the_plan_records_it(scale_run: Path) -> None:
    payload = load_checkpoint(scale_run)
    assert payload["plan"]["scale_channel"] is True
    assert payload["plan"]["generator"]["init_args"]["out_channels"] == 2
    # The default weight is the plain likelihood's (beta 0): the map ranks the error best.
    assert payload["objective"] == {
        **payload["objective"],
        "reconstruction": "laplace_nll",
        "laplace_beta": 0.0,
    }
    with open(scale_run / "metrics.csv", newline="", encoding="utf-8") as stream:
        rows = list(csv.DictReader(stream))
    assert rows and all(np.isfinite(float(r["loss_nll"])) for r in rows if r.get("loss_nll"))
    # Validation scored the mean channel: a finite PSNR.
    assert any(np.isfinite(float(r["val_psnr"])) for r in rows if r.get("val_psnr"))


def test_infer_writes_the_heads_scale_on_the_output_grid(
    scale_run: Path, tiny_cohort: Path, tmp_path: Path
) -> None:
    source = _image(tiny_cohort, "sub-01", "T1w")
    out = tmp_path / "syn.nii.gz"
    argv = ["infer", "--volume", str(source), "--checkpoint", str(scale_run), "--out", str(out), "--quiet"]
    assert main([*argv, "--uncertainty"]) == 0
    written = nib.load(tmp_path / "syn_uncertainty.nii.gz")
    np.testing.assert_allclose(written.affine, nib.load(out).affine, atol=1e-6)

    model = SynthesisModel.from_checkpoint(scale_run)
    volume = read_volume(source)
    prediction = model.predict({"t1": volume})
    assert prediction.scale is not None
    canonical, reorientation = to_canonical(volume)
    support = TrainingSupport.from_fingerprint(model.fingerprint, ["t1"], "t2")
    assert support is not None
    normalised = model.normalise({"t1": canonical.array}, {"t1": prediction.mask})
    unseen = support.unseen(normalised, prediction.mask, canonical.spacing)
    # The default for a model with a head: b of the 4 TTA members and their spread, as one Laplace.
    means, scales = tta_members(model, normalised, prediction.mask, "t2", plain=prediction)
    assert scales is not None and len(means) == len(MEMBERS)
    np.testing.assert_array_equal(scales[0], prediction.scale)
    total = np.where(prediction.mask, mixture_scale(means, scales), 0.0)
    want = reorientation.undo(
        np.where(unseen, np.maximum(total, support.uninformed_error), total).astype(np.float32)
    )
    np.testing.assert_allclose(np.asarray(written.dataobj), want, rtol=1e-5, atol=1e-6)
    sidecar = json.loads((tmp_path / "syn.json").read_text())["uncertainty"]
    assert sidecar["estimator"] == TOTAL_ESTIMATOR and sidecar["mean_in_mask"] > 0
    assert sidecar["unseen_input"] == {
        "status": "ok", "voxels": int(unseen.sum()), "floor": round(support.uninformed_error, 5),
    }  # fmt: skip
    # The head alone: b of the plain prediction, no extra synthesis.
    alone = uncertainty_map(model, normalised, prediction.mask, "t2", prediction, estimator="scale")
    assert alone.estimator == SCALE_ESTIMATOR
    head = np.where(prediction.mask, prediction.scale, 0.0)
    np.testing.assert_array_equal(alone.values, np.where(unseen, np.maximum(head, alone.floor), head))
    # The image is channel 0: the synthetic volume equals the prediction's.
    np.testing.assert_allclose(np.asarray(nib.load(out).dataobj), prediction.volume.array, atol=1e-5)


# ------------------------------------------------------------------------- evaluate --uncertainty
@pytest.mark.parametrize("which", ["tta", "scale"])
def test_evaluate_uncertainty_writes_columns_summary_and_figures(
    which: str, tiny_run: Path, scale_run: Path, tmp_path: Path
) -> None:
    run = tiny_run if which == "tta" else scale_run
    out = tmp_path / "eval"
    assert (
        main(["evaluate", "--run", str(run), "--out", str(out), "--uncertainty", "--baselines", "--quiet"])
        == 0
    )
    with open(out / "metrics.csv", newline="", encoding="utf-8") as stream:
        rows = list(csv.DictReader(stream))
    model_rows = [r for r in rows if r["method"] == "model"]
    assert model_rows and all(r["method"] != "model" or r["spearman_unc_err"] for r in rows)
    for row in model_rows:
        assert -1 <= float(row["spearman_unc_err"]) <= 1
        assert float(row["top_decile_error_ratio"]) > 0 and float(row["unc_seconds"]) >= 0
        figure = imread(out / f"{row['subject']}_t1_to_t2_uncertainty.png")
        assert figure.shape[1] / figure.shape[0] <= MAX_WIDTH_TO_HEIGHT
    assert all(r["spearman_unc_err"] == "" for r in rows if r["method"] != "model")
    block = json.loads((out / "summary.json").read_text())["calibration"]
    assert block["subjects"] == len(model_rows)
    assert ("scale head" in block["estimator"]) == (which == "scale")
    assert {"spearman_mean", "top_decile_ratio_mean", "unc_seconds_mean"} <= set(block)


# ------------------------------------------------------------------------------ an unseen lesion
def test_insert_lesion_changes_every_array_in_one_ball() -> None:
    mask = np.zeros((20, 20, 20), dtype=bool)
    mask[2:18, 2:18, 2:18] = True
    rng = np.random.default_rng(0)
    arrays = {"a": rng.random((20, 20, 20), dtype=np.float32), "b": np.zeros((20, 20, 20), np.float32)}
    changed, ball, ring = insert_lesion(arrays, mask, (2.0, 2.0, 2.0), radius_mm=4.0, centre=(10, 10, 10))
    assert ball.sum() == 33 and not (ball & ring).any() and ring.sum() > ball.sum()
    np.testing.assert_allclose(changed["a"][ball], np.percentile(arrays["a"][mask], 99.5), rtol=1e-6)
    np.testing.assert_array_equal(changed["a"][~ball], arrays["a"][~ball])


@pytest.mark.parametrize("bright", [True, False])
def test_an_unseen_lesion_is_a_real_failure_the_map_flags(
    bright: bool, scale_run: Path, tiny_cohort: Path
) -> None:
    """The lesion is a real failure (its |error| well above its ring's). No training voxel had its
    intensity at its depth in the head, so every lesion voxel is unseen and the map there is at least
    the uninformed error. (On this 2-epoch model b is large everywhere, so the ratio to the ring is
    not the point here; on the demo models it is 4.1-4.8x, docs/trust.md.)"""
    model = SynthesisModel.from_checkpoint(scale_run)
    subject = json.loads((scale_run / "splits.json").read_text())["test"][0]
    t1, _ = to_canonical(read_volume(_image(tiny_cohort, subject, "T1w")))
    t2, _ = to_canonical(read_volume(_image(tiny_cohort, subject, "T2w")))
    result = lesion_contrast(model, {"t1": t1}, t2, bright=bright, radius_mm=9.0)
    assert result["error_ratio"] > 1.5 and result["lesion_voxels"] > 0, result

    mask = foreground_mask([t1.array])
    changed, ball, ring = insert_lesion({"t1": t1.array}, mask, t1.spacing, bright=bright, radius_mm=9.0)
    inputs = {"t1": t1.with_array(changed["t1"])}
    prediction = model.predict(inputs)
    normalised, mask, _, target = canonical_inputs(model, inputs, None, prediction.mask)
    unc = uncertainty_map(model, normalised, mask, target, prediction)
    assert unc.unseen is not None and unc.floor is not None
    assert unc.unseen[ball & mask].all() and unc.unseen[ring].mean() < 0.05
    assert (unc.values[ball & mask] >= np.float32(unc.floor)).all()
