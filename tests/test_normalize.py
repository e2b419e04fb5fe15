"""Normalisers: exact round trips, mask-restricted fitting, serialisation."""

from __future__ import annotations

import numpy as np
import pytest

from medsynth.data.normalize import (
    PercentileNormalizer,
    WindowNormalizer,
    ZScoreNormalizer,
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
    with pytest.raises(ConfigError, match="valid schemes: percentile, window, zscore"):
        normalizer_from_dict({"scheme": "minmax"})
    with pytest.raises(ValueError, match="mask shape"):
        PercentileNormalizer().fit(np.zeros((4, 4, 4)), np.ones((4, 4, 3), bool))
