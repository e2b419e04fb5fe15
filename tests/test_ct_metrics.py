"""CT metrics: hand-computed HU errors, bone overlap, MS-SSIM, HU->RSP and proton-range (WEPL) errors."""

from __future__ import annotations

import math

import numpy as np
import pytest

from medsynth import ct_metrics as cm
from medsynth.metrics import ssim_3d

SHAPE = (40, 40, 20)
#: RSP of the published bone line (Schneider et al. 1996 as coded in plastimatch): 1.0279 + 0.0005011 HU.
RSP_1000 = 1.0279 + 0.0005011 * 1000.0  # 1.5290
RSP_500 = 1.0279 + 0.0005011 * 500.0  # 1.27845


# --------------------------------------------------------------------------- HU metrics


@pytest.fixture
def known_pair() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mask of 4000 voxels, two halves (axis 1) of 2000: +20 HU in half A, -10 HU in half B.

    Half A (j 10..19): bone 3061 HU in slices k 5-6 (400 voxels), soft 40 HU elsewhere (1600).
    Half B (j 20..29): air -1030 HU in slices k 7-8 (400 voxels), soft 40 HU elsewhere (1600).
    Outside the mask the synthetic CT is off by 500 HU, which no metric may see.
    """
    real = np.full(SHAPE, -1000.0)
    mask = np.zeros(SHAPE, bool)
    mask[10:30, 10:30, 5:15] = True
    real[mask] = 40.0
    real[10:30, 10:20, 5:7] = 3061.0
    real[10:30, 20:30, 7:9] = -1030.0
    synthetic = real + 500.0
    synthetic[10:30, 10:20, 5:15] = real[10:30, 10:20, 5:15] + 20.0
    synthetic[10:30, 20:30, 5:15] = real[10:30, 20:30, 5:15] - 10.0
    return synthetic, real, mask


def test_mae_me_psnr_and_bands_of_a_known_pair(known_pair):
    synthetic, real, mask = known_pair
    result = cm.hu_metrics(synthetic, real, mask, (1.0, 1.0, 2.0))
    assert result["mask_voxels"] == 4000
    assert result["mae_hu"] == pytest.approx(15.0, abs=1e-12)  # (2000 * 20 + 2000 * 10) / 4000
    assert result["me_hu"] == pytest.approx(5.0, abs=1e-12)  # (2000 * 20 - 2000 * 10) / 4000
    # Clipped to [-1024, 3071]: bone 3061 -> 3081 becomes an error of 10; air -1030 -> -1040 of 0.
    # Squared errors: 400 * 10**2 + 1600 * 20**2 + 400 * 0 + 1600 * 10**2 = 840000 over 4000 voxels.
    assert result["psnr_hu"] == pytest.approx(10 * math.log10(4095.0**2 / 210.0), abs=1e-9)
    assert result["mae_hu_bone"] == pytest.approx(20.0, abs=1e-12)
    assert result["mae_hu_air"] == pytest.approx(10.0, abs=1e-12)
    assert result["mae_hu_soft"] == pytest.approx(15.0, abs=1e-12)  # (1600 * 20 + 1600 * 10) / 3200
    assert result["ms_ssim_scales"] == 1  # 20 voxels on axis 2: too few for a second scale
    assert 0.0 < result["ms_ssim"] < 1.0


def test_identical_ct_has_zero_error_infinite_psnr_and_empty_bands_are_nan():
    real = np.full(SHAPE, 30.0)
    result = cm.hu_metrics(real, real, np.ones(SHAPE, bool), (1.0, 1.0, 1.0))
    assert result["mae_hu"] == 0.0 and result["me_hu"] == 0.0
    assert result["psnr_hu"] == math.inf
    assert result["ms_ssim"] == pytest.approx(1.0, abs=1e-6)
    assert result["mae_hu_soft"] == 0.0
    assert math.isnan(result["mae_hu_air"]) and math.isnan(result["mae_hu_bone"])


def test_tissue_bands_split_at_the_boundaries():
    bands = cm.band_masks(np.array([-200.5, -200.0, 250.0, 250.5]))
    assert bands["air"].tolist() == [True, False, False, False]
    assert bands["soft"].tolist() == [False, True, True, False]
    assert bands["bone"].tolist() == [False, False, False, True]


@pytest.mark.parametrize(
    "call",
    [
        lambda a, b, m: cm.hu_metrics(a, b, m, (1, 1, 1)),
        lambda a, b, m: cm.bone_agreement(a, b, (1, 1, 1), mask=m),
        lambda a, b, m: cm.range_errors(a, b, m, (1, 1, 1)),
        lambda a, b, m: cm.ct_metrics(a, b, mask=m, spacing=(1, 1, 1)),
    ],
)
def test_shape_mismatch_and_empty_mask_raise(call):
    a, m = np.zeros(SHAPE), np.ones(SHAPE, bool)
    with pytest.raises(ValueError, match=r"\(40, 40, 20\).*\(40, 40, 21\)"):
        call(a, np.zeros((40, 40, 21)), m)
    with pytest.raises(ValueError, match="mask|region"):
        call(a, a, np.ones((40, 40, 21), bool))


def test_empty_mask_raises():
    with pytest.raises(ValueError, match="empty"):
        cm.hu_metrics(np.zeros(SHAPE), np.zeros(SHAPE), np.zeros(SHAPE, bool), (1, 1, 1))
    with pytest.raises(ValueError, match="empty"):
        cm.ct_metrics(np.zeros(SHAPE), np.zeros(SHAPE), mask=np.zeros(SHAPE, bool), spacing=(1, 1, 1))
    with pytest.raises(ValueError, match="spacing"):
        cm.hu_metrics(np.zeros(SHAPE), np.zeros(SHAPE), np.ones(SHAPE, bool), (1, 0, 1))


# --------------------------------------------------------------------------- MS-SSIM


@pytest.mark.parametrize(
    ("shape", "scales"),
    [
        ((99, 117, 95), 3),  # a 2 mm head: 95 // 9 = 10 fails MONAI's 4-scale check
        ((176, 176, 176), 5),
        ((175, 200, 200), 4),
        ((99, 99, 99), 4),
        ((98, 99, 99), 3),
        ((44, 44, 44), 3),
        ((43, 60, 60), 2),
        ((22, 22, 22), 2),
        ((21, 40, 40), 1),
        ((11, 11, 11), 1),
    ],
)
def test_ms_ssim_uses_the_most_scales_that_fit(shape, scales):
    assert cm.ms_ssim_scales(shape) == scales


def test_ms_ssim_refuses_volumes_smaller_than_the_window():
    with pytest.raises(ValueError, match="11 voxels"):
        cm.ms_ssim_scales((10, 40, 40))


@pytest.fixture
def textured() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    shape = (48, 48, 24)
    real = rng.uniform(-1000.0, 2000.0, shape)
    synthetic = real + rng.normal(0.0, 150.0, shape)
    mask = np.zeros(shape, bool)
    mask[6:42, 6:42, 3:21] = True
    return synthetic, real, mask


def test_ms_ssim_is_one_for_identical_volumes_and_below_one_with_noise(textured):
    synthetic, real, mask = textured
    same, scales = cm.ms_ssim_hu(real, real, mask)
    assert scales == 2
    assert same == pytest.approx(1.0, abs=1e-6)
    noisy, _ = cm.ms_ssim_hu(synthetic, real, mask)
    assert 0.0 < noisy < 0.999


def test_ms_ssim_ignores_the_outside_and_clips_to_the_hu_range(textured):
    synthetic, real, mask = textured
    reference, _ = cm.ms_ssim_hu(synthetic, real, mask)
    changed_outside = np.where(mask, synthetic, 777.0)
    assert cm.ms_ssim_hu(changed_outside, real, mask)[0] == reference
    above = synthetic.copy()
    above[mask & (synthetic > 1500)] = 3071.0
    beyond = synthetic.copy()
    beyond[mask & (synthetic > 1500)] = 9000.0
    assert cm.ms_ssim_hu(beyond, real, mask)[0] == cm.ms_ssim_hu(above, real, mask)[0]
    assert cm.ms_ssim_hu(beyond, real, mask)[0] != reference


def test_one_scale_ms_ssim_is_the_ssim_of_the_shifted_images():
    """An independent implementation (scikit-image, float64) on the same [0, 4095] images."""
    rng = np.random.default_rng(1)
    real = rng.uniform(-1000.0, 2000.0, (30, 28, 20))
    synthetic = real + rng.normal(0.0, 200.0, real.shape)
    value, scales = cm.ms_ssim_hu(synthetic, real, np.ones(real.shape, bool))
    assert scales == 1
    assert synthetic.min() < -1024.0  # so the clipping matters
    expected = ssim_3d(np.clip(synthetic, -1024.0, 3071.0) + 1024.0, real + 1024.0, data_range=4095.0)
    assert value == pytest.approx(expected, abs=1e-6)


# --------------------------------------------------------------------------- bone


def test_bone_dice_of_two_boxes():
    real, synthetic = np.zeros(SHAPE), np.zeros(SHAPE)
    real[5:25, 5:25, 5:15] = 1000.0  # 20 * 20 * 10 = 4000 voxels
    synthetic[10:30, 8:28, 5:12] = 1000.0  # 20 * 20 * 7 = 2800 voxels
    overlap = 15 * 17 * 7  # [10:25, 8:25, 5:12]
    result = cm.bone_agreement(synthetic, real, (1.0, 1.0, 1.0))
    assert result["bone_dice"] == 2 * overlap / (4000 + 2800)
    # A mask that leaves out the synthetic bone's non-overlapping part: 1785 vs 4000 voxels.
    mask = np.zeros(SHAPE, bool)
    mask[0:25, :, :] = True
    mask[:, 25:, :] = False
    masked = cm.bone_agreement(synthetic, real, (1.0, 1.0, 1.0), mask=mask)
    assert masked["bone_dice"] == 2 * overlap / (4000 + 15 * 17 * 7)


@pytest.mark.parametrize("axis", [0, 1, 2])
@pytest.mark.parametrize("k", [1, 3])
def test_bone_hd95_of_offset_boxes_is_the_offset_in_mm(axis, k):
    spacing = (0.5, 1.25, 2.0)
    real = np.zeros(SHAPE)
    box = [slice(5, 35), slice(5, 35), slice(5, 15)]
    box[axis] = slice(8, 11)  # thin along the offset: the faces that move dominate the surface
    real[tuple(box)] = 1000.0
    synthetic = np.roll(real, k, axis=axis)
    result = cm.bone_agreement(synthetic, real, spacing)
    assert result["bone_hd95_mm"] == pytest.approx(k * spacing[axis], rel=1e-6)
    assert result["bone_dice"] == pytest.approx(max(0.0, (3 - k) / 3), abs=1e-12)


def test_bone_agreement_when_bone_is_missing():
    empty, bone = np.zeros(SHAPE), np.zeros(SHAPE)
    bone[5:10, 5:10, 5:10] = 800.0
    assert cm.bone_agreement(empty, empty, (1, 1, 1)) == {"bone_dice": 1.0, "bone_hd95_mm": 0.0}
    assert cm.bone_agreement(empty, bone, (1, 1, 1)) == {"bone_dice": 0.0, "bone_hd95_mm": math.inf}
    assert cm.bone_agreement(bone, empty, (1, 1, 1)) == {"bone_dice": 0.0, "bone_hd95_mm": math.inf}
    assert cm.bone_agreement(bone, bone, (1, 1, 1), threshold=900.0)["bone_dice"] == 1.0


# --------------------------------------------------------------------------- HU -> RSP


def test_hu_to_rsp_water_air_bone_and_clipping():
    rsp = cm.hu_to_rsp(np.array([0.0, -1000.0, -1024.0, -3000.0, 41.0, 1000.0, 1600.0, 3071.0, 5000.0]))
    assert rsp[0] == pytest.approx(1.0, abs=1e-12)
    assert rsp[1] == pytest.approx(0.00106, abs=1e-12) and rsp[2] == rsp[1] and rsp[3] == rsp[1]
    assert rsp[4] == pytest.approx(1.0 + 0.001174 * 41.0, abs=1e-9)
    assert rsp[5] == pytest.approx(RSP_1000, abs=1e-9)
    assert rsp[6] == pytest.approx(1.0279 + 0.0005011 * 1600.0, abs=1e-9)
    assert 1.5 < rsp[5] < rsp[6] < 1.9
    assert rsp[8] == rsp[7]


def test_hu_to_rsp_is_monotone():
    rsp = cm.hu_to_rsp(np.linspace(-1500.0, 3500.0, 20001))
    assert np.all(np.diff(rsp) >= 0.0)


# --------------------------------------------------------------------------- WEPL, axis-aligned

SLAB_SPACING = (1.5, 2.0, 3.0)
SLAB_SHAPE = (5, 20, 3)


def slab_phantom(slab_hu: float = 1000.0) -> np.ndarray:
    """Water with a bone slab of 4 voxels (8 mm) across axis 1, rows j = 8..11."""
    hu = np.zeros(SLAB_SHAPE)
    hu[:, 8:12, :] = slab_hu
    return hu


def test_wepl_from_anterior_is_the_hand_sum():
    wepl = cm.water_equivalent_depth(cm.hu_to_rsp(slab_phantom()), SLAB_SPACING, 0.0)
    # Beam enters at the anterior face (j = 19.5) and travels to -axis 1; 2 mm per row.
    behind = (19.5 - 3 - 4) * 2.0 + 8.0 * RSP_1000  # j = 3: 25 mm of water and the 8 mm slab
    in_front = (19.5 - 15) * 2.0  # j = 15: water only
    in_slab = (19.5 - 11.5) * 2.0 + (11.5 - 9) * 2.0 * RSP_1000  # j = 9: 16 mm water, 2.5 rows of bone
    assert wepl[2, 3, 1] == pytest.approx(behind, abs=1e-12)
    assert wepl[2, 15, 1] == pytest.approx(in_front, abs=1e-12)
    assert wepl[2, 9, 1] == pytest.approx(in_slab, abs=1e-12)
    assert np.all(wepl == wepl[:1, :, :1])  # the same on every ray


def test_wepl_other_axis_directions_match_the_flipped_and_transposed_phantom():
    rsp = cm.hu_to_rsp(slab_phantom())
    from_anterior = cm.water_equivalent_depth(rsp, SLAB_SPACING, 0.0)
    from_posterior = cm.water_equivalent_depth(rsp, SLAB_SPACING, 180.0)
    np.testing.assert_allclose(
        from_posterior,
        np.flip(cm.water_equivalent_depth(np.flip(rsp, 1), SLAB_SPACING, 0.0), 1),
        rtol=0,
        atol=1e-12,
    )
    assert from_posterior[2, 15, 1] == pytest.approx(15.5 * 2.0 - 8.0 + 8.0 * RSP_1000, abs=1e-12)
    # Transposed: the slab runs across axis 0, with the spacings swapped.
    rsp_t = rsp.transpose(1, 0, 2)
    spacing_t = (SLAB_SPACING[1], SLAB_SPACING[0], SLAB_SPACING[2])
    from_right = cm.water_equivalent_depth(rsp_t, spacing_t, 270.0)  # enters at high axis 0
    from_left = cm.water_equivalent_depth(rsp_t, spacing_t, 90.0)  # enters at index 0 of axis 0
    np.testing.assert_allclose(from_right, from_anterior.transpose(1, 0, 2), rtol=0, atol=1e-12)
    np.testing.assert_allclose(from_left, from_posterior.transpose(1, 0, 2), rtol=0, atol=1e-12)
    np.testing.assert_array_equal(cm.water_equivalent_depth(rsp_t, spacing_t, -90.0), from_right)
    np.testing.assert_array_equal(cm.water_equivalent_depth(rsp_t, spacing_t, 450.0), from_left)


def test_range_error_of_a_changed_slab_is_thickness_times_rsp_change():
    real, synthetic = slab_phantom(1000.0), slab_phantom(500.0)
    region = np.zeros(SLAB_SHAPE, bool)
    region[:, 0:8, :] = True  # downstream of the slab for the beam from anterior
    delta = 8.0 * (RSP_500 - RSP_1000)  # -2.0044 mm: the softer slab stops protons later
    result = cm.range_errors(synthetic, real, region, SLAB_SPACING, angles=(0.0,))
    assert result["range_error_mean_mm"] == pytest.approx(abs(delta), abs=1e-12)
    assert result["range_error_p95_mm"] == pytest.approx(abs(delta), abs=1e-12)
    assert result["range_error_signed_mm"] == pytest.approx(delta, abs=1e-12)
    wepl_real = (19.5 - np.arange(8) - 4) * 2.0 + 8.0 * RSP_1000  # per row j = 0..7, all >= 10 mm
    percent = np.repeat(abs(delta) / wepl_real * 100.0, SLAB_SHAPE[0] * SLAB_SHAPE[2])
    assert result["range_error_mean_pct"] == pytest.approx(percent.mean(), rel=1e-12)
    assert result["range_error_p95_pct"] == pytest.approx(np.percentile(percent, 95), rel=1e-12)
    assert result["range_angles"] == [0.0] and result["region_voxels"] == region.sum()
    # From posterior these voxels are upstream of the slab: no error, so the mean halves.
    both = cm.range_errors(synthetic, real, region, SLAB_SPACING, angles=(0.0, 180.0))
    assert both["range_error_mean_mm"] == pytest.approx(abs(delta) / 2, abs=1e-12)
    assert both["range_error_p95_mm"] == pytest.approx(abs(delta), abs=1e-12)
    error_map = cm.range_error_map(synthetic, real, region, SLAB_SPACING, angles=(0.0, 180.0))
    np.testing.assert_allclose(error_map[region], abs(delta) / 2, rtol=0, atol=1e-12)
    assert np.all(error_map[~region] == 0.0)


def test_percent_range_error_leaves_out_shallow_voxels():
    real = np.zeros(SLAB_SHAPE)
    synthetic = real.copy()
    synthetic[:, 0, :] = 1000.0  # the first row a posterior beam meets
    region = np.zeros(SLAB_SHAPE, bool)
    region[:, 0:10, :] = True
    result = cm.range_errors(synthetic, real, region, SLAB_SPACING, angles=(180.0,))
    jump = RSP_1000 - 1.0
    rows = np.arange(10)
    delta = np.where(rows == 0, 1.0 * jump, 2.0 * jump)  # half of row 0, all of it downstream
    wepl_real = (rows + 0.5) * 2.0  # 1, 3, ..., 19 mm: rows 0-4 are under 10 mm
    assert result["range_error_mean_mm"] == pytest.approx(delta.mean(), abs=1e-12)
    deep = wepl_real >= 10.0
    assert result["range_error_mean_pct"] == pytest.approx(
        np.mean(delta[deep] / wepl_real[deep] * 100), rel=1e-12
    )


def test_range_errors_of_an_empty_region_are_nan():
    real = slab_phantom()
    result = cm.range_errors(real, real, np.zeros(SLAB_SHAPE, bool), SLAB_SPACING)
    assert result["region_voxels"] == 0
    for key in ("mean_mm", "p95_mm", "signed_mm", "mean_pct", "p95_pct"):
        assert math.isnan(result[f"range_error_{key}"])
    assert result["range_angles"] == list(cm.DEFAULT_ANGLES)
    assert not cm.range_error_map(real, real, np.zeros(SLAB_SHAPE, bool), SLAB_SPACING).any()


# --------------------------------------------------------------------------- WEPL, oblique


def distance_from_entry(shape: tuple[int, ...], spacing: tuple[float, ...], angle: float) -> np.ndarray:
    """Hand geometry: distance (mm) back along the beam from each voxel centre to the volume's edge."""
    theta = math.radians(angle)
    travel = (math.sin(theta), -math.cos(theta))  # 45: towards +axis 0 (right) and -axis 1 (posterior)
    i, j = np.meshgrid(np.arange(shape[0]), np.arange(shape[1]), indexing="ij")
    distances = []
    for centre, d, n, s in (
        (i * spacing[0], travel[0], shape[0], spacing[0]),
        (j * spacing[1], travel[1], shape[1], spacing[1]),
    ):
        entry_face = -0.5 * s if d > 0 else (n - 0.5) * s
        distances.append((centre - entry_face) / d)
    return np.minimum(*distances)


@pytest.mark.parametrize("angle", [45.0, 135.0, 225.0, 315.0, 30.0])
def test_oblique_wepl_of_a_uniform_phantom_is_rsp_times_the_diagonal_path(angle):
    """Stated tolerance: 1e-9 mm. The entry face is found exactly, so uniform RSP has no resampling error."""
    shape, spacing = (21, 17, 2), (1.0, 1.5, 2.0)
    rsp = cm.hu_to_rsp(np.full(shape, 500.0))
    wepl = cm.water_equivalent_depth(rsp, spacing, angle)
    expected = RSP_500 * distance_from_entry(shape, spacing, angle)
    np.testing.assert_allclose(wepl, np.repeat(expected[:, :, None], 2, axis=2), rtol=0, atol=1e-9)
    if angle == 45.0:  # the corner voxel nearest the beam's source: 1 mm from the left face -> 0.5 / sin 45
        assert wepl[0, 16, 0] == pytest.approx(RSP_500 * 0.5 / math.sin(math.radians(45)), abs=1e-9)


def test_oblique_wepl_through_a_bone_slab_is_within_the_documented_error():
    """45 degrees through water with a 4-row bone slab: error <= 0.5 (max) and 0.1 (mean) step * jump."""
    shape, spacing = (30, 30, 1), (1.0, 1.5, 2.0)
    hu = np.zeros(shape)
    hu[:, 12:16, :] = 1000.0
    wepl = cm.water_equivalent_depth(cm.hu_to_rsp(hu), spacing, 45.0)[:, :, 0]
    # Hand: water everywhere along the path, plus the extra stopping power over the part in the slab.
    path = distance_from_entry(shape, spacing, 45.0)
    j = np.arange(shape[1])[None, :] * spacing[1]
    y_entry = j + path * math.cos(math.radians(45))  # the beam came from anterior (+axis 1)
    slab_low, slab_high = 11.5 * spacing[1], 15.5 * spacing[1]
    in_slab = np.clip(np.minimum(y_entry, slab_high) - np.maximum(j, slab_low), 0, None)
    expected = path + (RSP_1000 - 1.0) * in_slab / math.cos(math.radians(45))
    scale = min(spacing[:2]) * (RSP_1000 - 1.0)
    error = np.abs(wepl - expected)
    assert error.max() <= 0.5 * scale
    assert error.mean() <= 0.1 * scale
    assert error.max() > 1e-3  # the bound is not vacuous: resampling does leave an error here


@pytest.mark.parametrize("exact_angle", [0.0, 90.0, 180.0, 270.0])
@pytest.mark.parametrize("offset", [-0.01, 0.01])
def test_near_axis_oblique_beams_agree_with_the_exact_ones(exact_angle, offset):
    """The oblique path uses the same angle convention; it differs by resampling only.

    The slab phantom (and its transpose for 90/270) is asymmetric along the beam, so a mirrored
    direction would be off by tens of mm. Tolerance: 0.25 * min(sx, sy) * RSP jump (0.2 mm here).
    """
    rsp = cm.hu_to_rsp(slab_phantom())
    spacing = SLAB_SPACING
    if exact_angle in (90.0, 270.0):
        rsp, spacing = rsp.transpose(1, 0, 2), (SLAB_SPACING[1], SLAB_SPACING[0], SLAB_SPACING[2])
    exact = cm.water_equivalent_depth(rsp, spacing, exact_angle)
    nearly = cm.water_equivalent_depth(rsp, spacing, exact_angle + offset)
    np.testing.assert_allclose(nearly, exact, rtol=0, atol=0.25 * min(spacing[:2]) * (RSP_1000 - 1.0))


# --------------------------------------------------------------------------- masks


def test_body_mask_fills_air_pockets_and_drops_the_couch():
    ct = np.full(SHAPE, -1000.0)
    ct[8:32, 8:32, 4:16] = 20.0
    ct[15:20, 15:20, 8:11] = -1000.0  # enclosed air (a sinus)
    ct[24:26, 24:26, 4:16] = -1000.0  # an air channel open at both ends: only the 2D fill closes it
    ct[1:3, 1:3, 1:3] = 0.0  # a separate object
    expected = np.zeros(SHAPE, bool)
    expected[8:32, 8:32, 4:16] = True
    np.testing.assert_array_equal(cm.body_mask(ct), expected)
    assert not cm.body_mask(np.full(SHAPE, -1000.0)).any()


def test_intracranial_mask_is_the_inside_of_the_largest_bone_ring():
    ct = np.full((48, 40, 20), -1000.0)
    ct[5:35, 5:35, 2:18] = 1200.0  # skull: a ring 3 voxels thick around [8:32, 8:32]
    ct[8:32, 8:32, 2:18] = 30.0
    ct[15:17, 15:17, 10] = -800.0  # air inside the skull is not brain
    ct[20, 20, 12] = -100.0  # fat is soft tissue
    ct[38:46, 5:13, 2:18] = 1200.0  # a smaller ring elsewhere
    ct[39:45, 6:12, 2:18] = 30.0
    expected = np.zeros(ct.shape, bool)
    expected[9:31, 9:31, 2:18] = True  # the inside less one voxel next to the bone
    expected[15:17, 15:17, 10] = False
    np.testing.assert_array_equal(cm.intracranial_mask(ct), expected)
    no_skull = np.where(ct > 250, 30.0, ct)
    assert not cm.intracranial_mask(no_skull).any()


# --------------------------------------------------------------------------- all together


def test_ct_metrics_reports_everything_with_its_space():
    ct = np.full((48, 40, 24), -1000.0)
    ct[5:35, 5:35, 2:22] = 1200.0
    ct[8:32, 8:32, 2:22] = 30.0
    synthetic = ct + 10.0
    mask = cm.body_mask(ct)
    result = cm.ct_metrics(synthetic, ct, mask=mask, spacing=(1.0, 1.0, 2.0))
    assert result["hu_space"] == "HU, PSNR over [-1024, 3071], inside the body mask"
    assert result["mae_hu"] == pytest.approx(10.0, abs=1e-12) and result["me_hu"] == pytest.approx(10.0)
    assert result["bone_dice"] == 1.0 and result["bone_hd95_mm"] == 0.0
    assert result["ms_ssim_scales"] == 2
    assert result["region_voxels"] == int(cm.intracranial_mask(ct).sum()) > 0
    assert result["range_error_signed_mm"] > 0  # +10 HU everywhere: more stopping power on every path
    expected = {
        "mae_hu", "me_hu", "psnr_hu", "ms_ssim", "ms_ssim_scales", "mae_hu_air", "mae_hu_soft",
        "mae_hu_bone", "mask_voxels", "bone_dice", "bone_hd95_mm", "range_error_mean_mm",
        "range_error_p95_mm", "range_error_mean_pct", "range_error_p95_pct", "range_error_signed_mm",
        "range_angles", "region_voxels", "hu_space",
    }  # fmt: skip
    assert set(result) == expected
