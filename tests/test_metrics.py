"""Metrics: exact known values, mask semantics, edge cases, and agreement with MONAI's SSIM."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from monai.metrics import SSIMMetric

from medsynth.metrics import compute_metrics, json_safe, mae, psnr, ssim_2d_mean, ssim_3d

SHAPE = (24, 20, 16)


@pytest.fixture
def pair() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    target = rng.uniform(-1, 1, SHAPE).astype(np.float32)
    pred = (target + rng.normal(0, 0.1, SHAPE)).astype(np.float32)
    return pred, target


@pytest.fixture
def box_mask() -> np.ndarray:
    mask = np.zeros(SHAPE, bool)
    mask[4:20, 3:17, 2:14] = True
    return mask


def test_identical_volumes_have_ssim_one_and_infinite_psnr(pair, box_mask):
    _, target = pair
    for mask in (None, box_mask):
        assert psnr(target, target, mask=mask, data_range=2.0) == math.inf
        assert ssim_3d(target, target, mask=mask, data_range=2.0) == pytest.approx(1.0, abs=1e-12)
        assert ssim_2d_mean(target, target, mask=mask, data_range=2.0) == pytest.approx(1.0, abs=1e-12)
        assert mae(target, target, mask=mask, data_range=2.0) == 0.0


def test_psnr_and_mae_of_a_known_error_are_exact():
    target = np.zeros(SHAPE)
    pred = np.full(SHAPE, 0.1)
    pred[::2] = -0.1  # |error| is 0.1 everywhere, so MSE is 0.01
    assert psnr(pred, target, data_range=2.0) == pytest.approx(10 * math.log10(4 / 0.01), abs=1e-9)
    assert psnr(pred, target, data_range=1.0) == pytest.approx(20.0, abs=1e-9)
    assert mae(pred, target, data_range=2.0) == pytest.approx(0.1, abs=1e-9)


def test_masked_metrics_ignore_errors_outside_the_mask(box_mask):
    target = np.zeros(SHAPE, np.float32)
    pred = np.where(box_mask, 0.0, 0.5).astype(np.float32)  # wrong only outside the mask
    assert mae(pred, target, mask=box_mask, data_range=2.0) == 0.0
    assert psnr(pred, target, mask=box_mask, data_range=2.0) == math.inf
    outside = (~box_mask).mean()
    assert mae(pred, target, data_range=2.0) == pytest.approx(0.5 * outside, rel=1e-9)
    assert psnr(pred, target, data_range=2.0) == pytest.approx(
        10 * math.log10(4 / (0.25 * outside)), rel=1e-9
    )


def test_masked_ssim_3d_averages_the_map_inside_the_mask(pair):
    _, target = pair
    pred = target.copy()
    pred[:8] = np.random.default_rng(1).uniform(-1, 1, pred[:8].shape)  # unrelated content for i < 8
    mask = np.zeros(SHAPE, bool)
    mask[14:] = True  # more than the window radius (5 voxels) away from the ruined part
    assert ssim_3d(pred, target, mask=mask, data_range=2.0) == pytest.approx(1.0, abs=1e-9)
    assert ssim_3d(pred, target, data_range=2.0) < 0.8


def test_constant_volumes_have_well_defined_ssim():
    a = np.full((16, 16, 16), 0.3)
    b = np.full((16, 16, 16), 0.8)
    assert ssim_3d(a, a, data_range=2.0) == pytest.approx(1.0)
    # Zero variance leaves only the luminance term: (2ab + C1) / (a^2 + b^2 + C1), C1 = (0.01 * 2)^2.
    c1 = (0.01 * 2.0) ** 2
    expected = (2 * 0.3 * 0.8 + c1) / (0.3**2 + 0.8**2 + c1)
    assert ssim_3d(a, b, data_range=2.0) == pytest.approx(expected, rel=1e-9)
    assert ssim_2d_mean(a, b, data_range=2.0) == pytest.approx(expected, rel=1e-9)


def test_ssim_2d_mean_only_averages_slices_that_contain_the_mask(pair):
    pred, target = pair
    pred = pred.copy()
    pred[:, :, :8] = np.random.default_rng(1).uniform(-1, 1, pred[:, :, :8].shape)  # ruin the lower slices
    mask = np.zeros(SHAPE, bool)
    mask[:, :, 8:] = True
    assert ssim_2d_mean(pred, target, mask=mask, data_range=2.0) > 0.8
    assert ssim_2d_mean(pred, target, data_range=2.0) < 0.6


def test_ssim_2d_mean_follows_the_slice_axis(pair):
    pred, target = pair
    along_k = ssim_2d_mean(pred, target, data_range=2.0, axis=2)
    along_i = ssim_2d_mean(pred, target, data_range=2.0, axis=0)
    moved = ssim_2d_mean(np.moveaxis(pred, 0, 2), np.moveaxis(target, 0, 2), data_range=2.0, axis=2)
    assert along_i == pytest.approx(moved, abs=1e-12)
    assert along_i != pytest.approx(along_k, abs=1e-6)


def test_ssim_matches_monai_within_float32_precision(pair):
    """MONAI computes in float32 with the same Gaussian window; agreement within 1e-5 is expected."""
    pred, target = pair
    metric3 = SSIMMetric(spatial_dims=3, data_range=2.0)
    monai_3d = float(metric3(torch.from_numpy(pred)[None, None], torch.from_numpy(target)[None, None]).mean())
    assert ssim_3d(pred, target, data_range=2.0) == pytest.approx(monai_3d, abs=1e-5)

    metric2 = SSIMMetric(spatial_dims=2, data_range=2.0)
    slices_pred = torch.from_numpy(np.ascontiguousarray(np.moveaxis(pred, 2, 0)))[:, None]
    slices_target = torch.from_numpy(np.ascontiguousarray(np.moveaxis(target, 2, 0)))[:, None]
    monai_2d = float(metric2(slices_pred, slices_target).mean())
    assert ssim_2d_mean(pred, target, data_range=2.0) == pytest.approx(monai_2d, abs=1e-5)


@pytest.mark.parametrize("function", [psnr, mae, ssim_3d, ssim_2d_mean])
def test_bad_arguments_are_refused(function, pair):
    pred, target = pair
    with pytest.raises(ValueError, match="mask is empty"):
        function(pred, target, mask=np.zeros(SHAPE, bool), data_range=2.0)
    with pytest.raises(ValueError, match="data_range"):
        function(pred, target, data_range=0.0)
    with pytest.raises(ValueError, match="shape"):
        function(pred[:-1], target, data_range=2.0)


def test_ssim_refuses_volumes_smaller_than_its_window():
    small = np.zeros((16, 16, 8))
    with pytest.raises(ValueError, match="at least 11 voxels"):
        ssim_3d(small, small, data_range=1.0)
    assert ssim_2d_mean(small, small, data_range=1.0) == pytest.approx(1.0)  # slices are 16 x 16


def test_compute_metrics_reports_everything_and_survives_json(tmp_path, pair, box_mask):
    _, target = pair
    result = compute_metrics(target, target, mask=box_mask, data_range=2.0, space="normalised [-1, 1]")
    for name in ("psnr", "ssim3d", "ssim2d", "mae"):
        assert name in result and f"{name}_masked" in result
    assert result["mask_voxels"] == int(box_mask.sum())
    assert result["space"] == "normalised [-1, 1]" and result["data_range"] == 2.0

    path = tmp_path / "summary.json"
    path.write_text(json.dumps(json_safe(result), allow_nan=False))
    loaded = json.loads(path.read_text())
    assert loaded["psnr"] == "inf" and loaded["ssim3d_masked"] == pytest.approx(1.0)


def test_json_safe_maps_non_finite_values_and_numpy_scalars():
    value = json_safe({"a": [np.float64("-inf"), float("nan")], "b": (np.int64(3), 1.5)})
    assert value == {"a": ["-inf", "nan"], "b": [3, 1.5]}
    assert type(value["b"][0]) is int
