"""Baselines: identity is identity; the lookup table recovers known intensity mappings."""

from __future__ import annotations

import json

import numpy as np
import pytest

from medsynth.baselines import IdentityBaseline, IntensityLUTBaseline, baseline_from_dict
from medsynth.errors import ConfigError

SHAPE = (20, 18, 16)


def _subjects(mapping, n: int = 3, seed: int = 0):
    """Training pairs whose target is ``mapping(source)`` inside a box mask and garbage outside it."""
    rng = np.random.default_rng(seed)
    mask = np.zeros(SHAPE, bool)
    mask[2:-2, 2:-2, 2:-2] = True
    pairs = []
    for _ in range(n):
        source = rng.uniform(-1, 1, SHAPE).astype(np.float32)
        target = np.where(mask, mapping(source), 5.0).astype(np.float32)  # 5.0 must never be learnt
        pairs.append((source, target, mask))
    return pairs


def test_identity_returns_the_source_as_a_new_float32_array():
    source = np.random.default_rng(0).uniform(-1, 1, SHAPE)
    baseline = IdentityBaseline().fit(_subjects(np.square))
    prediction = baseline.predict(source)
    assert prediction.dtype == np.float32
    np.testing.assert_array_equal(prediction, source.astype(np.float32))
    prediction[0, 0, 0] = 9.0
    assert source[0, 0, 0] != 9.0


@pytest.mark.parametrize(
    "mapping",
    [
        pytest.param(lambda s: 0.6 * s + 0.2, id="linear"),
        pytest.param(lambda s: np.tanh(3 * s), id="monotone"),
        pytest.param(lambda s: np.sin(3 * s), id="non-monotone"),
        pytest.param(lambda s: 1 - 2 * np.abs(s), id="inverted-v"),
    ],
)
def test_lut_recovers_a_known_mapping(mapping):
    baseline = IntensityLUTBaseline(n_bins=128).fit(_subjects(mapping))
    test_source = np.random.default_rng(7).uniform(-0.99, 0.99, SHAPE)
    error = np.abs(baseline.predict(test_source) - mapping(test_source))
    # Bin width is 2/128; the steepest slope here is 3, so a bin's mean is within ~0.05 of the curve.
    assert error.max() < 0.05
    assert error.mean() < 0.01


def test_lut_interpolates_bins_no_voxel_fell_into():
    pairs = _subjects(lambda s: 0.5 * s)
    gapped = [(np.where(np.abs(s) < 0.5, 0.9, s), np.where(np.abs(s) < 0.5, 0.45, t), m) for s, t, m in pairs]
    baseline = IntensityLUTBaseline(n_bins=64).fit(gapped)
    inside_gap = np.linspace(-0.45, 0.45, 11)
    assert baseline.predict(inside_gap) == pytest.approx(0.5 * inside_gap, abs=0.02)


def test_lut_clamps_sources_outside_its_range():
    baseline = IntensityLUTBaseline(n_bins=32).fit(_subjects(lambda s: s))
    edges = baseline.predict(np.array([-3.0, 3.0]))
    assert edges[0] == pytest.approx(baseline.table[0]) and edges[1] == pytest.approx(baseline.table[-1])


def test_lut_round_trips_through_a_json_file(tmp_path):
    baseline = IntensityLUTBaseline(n_bins=64, value_range=(-2.0, 2.0)).fit(_subjects(np.square))
    path = tmp_path / "baseline.json"
    path.write_text(json.dumps(baseline.to_dict()))
    restored = baseline_from_dict(json.loads(path.read_text()))
    assert isinstance(restored, IntensityLUTBaseline)
    assert restored.value_range == (-2.0, 2.0)
    source = np.random.default_rng(3).uniform(-1, 1, SHAPE)
    np.testing.assert_array_equal(restored.predict(source), baseline.predict(source))
    assert isinstance(baseline_from_dict(IdentityBaseline().to_dict()), IdentityBaseline)


def test_bad_use_is_refused():
    with pytest.raises(ValueError, match="before fit"):
        IntensityLUTBaseline().predict(np.zeros(SHAPE))
    with pytest.raises(ValueError, match="no foreground"):
        IntensityLUTBaseline().fit([(np.zeros(SHAPE), np.zeros(SHAPE), np.zeros(SHAPE, bool))])
    with pytest.raises(ValueError, match="pair 0"):
        IntensityLUTBaseline().fit([(np.zeros(SHAPE), np.zeros((2, 2, 2)), np.ones(SHAPE, bool))])
    with pytest.raises(ValueError, match="value_range"):
        IntensityLUTBaseline(value_range=(1.0, -1.0))
    with pytest.raises(ConfigError, match="valid names: identity, intensity_lut"):
        baseline_from_dict({"name": "histogram"})
    with pytest.raises(ConfigError, match="expected n_bins"):
        baseline_from_dict({"name": "intensity_lut", "n_bins": 4, "value_range": [-1, 1], "table": [0.0]})
