"""Normalisers: exact round trips, mask-restricted fitting, serialisation."""

from __future__ import annotations

import numpy as np
import pytest

from medsynth.data.normalize import (
    HistogramNormalizer,
    PercentileNormalizer,
    WindowNormalizer,
    ZScoreNormalizer,
    fit_standard,
    normalizer_from_dict,
)
from medsynth.errors import ConfigError


@pytest.fixture
def image() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    array = rng.normal(0.0, 5.0, (16, 16, 16)).astype(np.float32)
    mask = np.zeros(array.shape, bool)
    mask[4:12, 4:12, 4:12] = True
    array[mask] = rng.gamma(4.0, 250.0, mask.sum())
    return array, mask


def _fitted(name: str, array: np.ndarray, mask: np.ndarray):
    if name == "percentile":
        return PercentileNormalizer().fit(array, mask)
    if name == "zscore":
        return ZScoreNormalizer().fit(array, mask)
    return WindowNormalizer((-200.0, 800.0)).fit(array, mask)


@pytest.mark.parametrize("name", ["percentile", "zscore", "window"])
def test_inverse_of_forward_is_identity_inside_the_clip_range(name: str, image) -> None:
    array, mask = image
    norm = _fitted(name, array, mask)
    lower, upper = (norm.lower, norm.upper) if name != "zscore" else (-np.inf, np.inf)
    inside = (array >= lower) & (array <= upper)
    forward = norm.forward(array)
    assert forward.dtype == np.float32
    restored = norm.inverse(forward)
    np.testing.assert_allclose(restored[inside], array[inside], rtol=1e-5, atol=1e-3)
    if name != "zscore":
        assert forward.min() >= -1.0 and forward.max() <= 1.0
        np.testing.assert_allclose(restored[array > upper], upper, rtol=1e-6)


@pytest.mark.parametrize("name", ["percentile", "zscore", "window"])
def test_round_trip_through_dict(name: str, image) -> None:
    array, mask = image
    norm = _fitted(name, array, mask)
    rebuilt = normalizer_from_dict(norm.to_dict())
    assert type(rebuilt) is type(norm)
    np.testing.assert_array_equal(rebuilt.forward(array), norm.forward(array))


def test_percentile_fit_ignores_voxels_outside_the_mask(image) -> None:
    array, mask = image
    reference = PercentileNormalizer().fit(array, mask)
    hot = array.copy()
    hot[0, 0, :] = 1e7  # outside the mask
    assert PercentileNormalizer().fit(hot, mask).upper == reference.upper
    assert reference.upper == pytest.approx(np.percentile(array[mask], 99.5))
    assert reference.lower == pytest.approx(np.percentile(array[mask], 0.5))


def test_zscore_statistics_come_from_the_mask(image) -> None:
    array, mask = image
    norm = ZScoreNormalizer().fit(array, mask)
    assert norm.mean == pytest.approx(array[mask].mean(), rel=1e-6)
    assert norm.forward(array)[mask].std() == pytest.approx(1.0, rel=1e-4)


def test_window_maps_hounsfield_ends_to_unit_range() -> None:
    norm = WindowNormalizer()
    out = norm.forward(np.array([-2000.0, -1024.0, 3071.0, 5000.0]))
    np.testing.assert_allclose(out, [-1.0, -1.0, 1.0, 1.0])


def test_constant_or_empty_foreground_stays_invertible() -> None:
    flat = np.full((8, 8, 8), 7.0, np.float32)
    for norm in (PercentileNormalizer().fit(flat, np.zeros(flat.shape, bool)), ZScoreNormalizer().fit(flat)):
        assert np.isfinite(norm.forward(flat)).all()
        np.testing.assert_allclose(norm.inverse(norm.forward(flat)), flat)


def test_bad_arguments_raise() -> None:
    with pytest.raises(RuntimeError, match="not fitted"):
        PercentileNormalizer().forward(np.zeros(3))
    with pytest.raises(ConfigError, match="percentiles"):
        PercentileNormalizer(99.0, 1.0)
    with pytest.raises(ConfigError, match="lower < upper"):
        WindowNormalizer((100.0, 100.0))
    with pytest.raises(ConfigError, match="valid schemes: histogram, percentile, window, zscore"):
        normalizer_from_dict({"scheme": "minmax"})
    with pytest.raises(ValueError, match="mask shape"):
        PercentileNormalizer().fit(np.zeros((4, 4, 4)), np.ones((4, 4, 3), bool))


def _standardised(array: np.ndarray, mask: np.ndarray, cohort: list[np.ndarray]) -> HistogramNormalizer:
    standard = fit_standard([HistogramNormalizer().fit(a, mask).relative_landmarks() for a in cohort])
    return HistogramNormalizer(standard=standard).fit(array, mask)


def test_histogram_standardisation_removes_a_monotone_contrast_change(image) -> None:
    """Another protocol's contrast (a power law and a gain, like an MPRAGE against a spin echo) lands on
    the training cohort's scale; the percentile scheme keeps the contrast change."""
    array, mask = image
    other = np.where(mask, 3.0 * np.clip(array, 0, None) ** 1.4, array)  # same anatomy, another contrast
    norm = _standardised(array, mask, [array])
    np.testing.assert_allclose(norm.forward(norm.landmarks), norm.standard, atol=1e-6)
    assert norm.standard[0] == -1.0 and norm.standard[-1] == 1.0
    moved = _standardised(other, mask, [array]).forward(other)[mask] - norm.forward(array)[mask]
    kept = (
        PercentileNormalizer().fit(other, mask).forward(other)[mask]
        - PercentileNormalizer().fit(array, mask).forward(array)[mask]
    )
    assert np.abs(moved).mean() < 0.2 * np.abs(kept).mean()


def test_histogram_round_trips_and_survives_degenerate_images(image) -> None:
    array, mask = image
    norm = _standardised(array, mask, [array, np.abs(array) ** 1.2])
    forward = norm.forward(array)
    assert forward.dtype == np.float32 and forward.min() == -1.0 and forward.max() == 1.0
    inside = (array >= norm.landmarks[0]) & (array <= norm.landmarks[-1])
    np.testing.assert_allclose(norm.inverse(forward)[inside], array[inside], rtol=1e-5, atol=1e-3)
    rebuilt = normalizer_from_dict(norm.to_dict())
    np.testing.assert_array_equal(rebuilt.forward(array), forward)
    flat = np.full((8, 8, 8), 7.0, np.float32)  # no range, and tied landmarks in a two-level image
    two_levels = np.where(mask, 200.0, 100.0).astype(np.float32)
    for degenerate in (flat, two_levels):
        fitted = HistogramNormalizer(standard=norm.standard.tolist()).fit(degenerate)
        assert np.all(np.diff(fitted.landmarks) > 0)
        np.testing.assert_allclose(fitted.inverse(fitted.forward(degenerate)), degenerate, rtol=1e-5)


def test_histogram_needs_a_fit_and_a_standard() -> None:
    with pytest.raises(RuntimeError, match="not fitted"):
        HistogramNormalizer().relative_landmarks()
    with pytest.raises(RuntimeError, match="no standard landmarks"):
        HistogramNormalizer().fit(np.arange(100.0)).forward(np.zeros(3))
    with pytest.raises(ConfigError, match="percentiles must increase"):
        HistogramNormalizer((50.0, 10.0))
    with pytest.raises(ConfigError, match="standard must be 11 increasing"):
        HistogramNormalizer(standard=[1.0, 0.0])
