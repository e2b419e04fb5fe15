"""3D and unified training that pay for themselves: foreground-biased patches, seamless sliding windows,
unified subset draws."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from monai.data.utils import dense_patch_slices

from medsynth.config import load_config
from medsynth.data.datasets import PatchDataset, draw_unified
from medsynth.errors import ConfigError
from medsynth.model.sliding import synthesize_patches, window_starts


# ------------------------------------------------------------------------------ unified subsets
def _subset_frequencies(scheme: str, n: int = 42_000) -> dict[tuple[int, ...], float]:
    available, target = draw_unified(0, 3, np.arange(n), 4, scheme)
    assert available.shape == (n, 4) and (available[np.arange(n), target] == 0).all()
    assert (available.sum(axis=1) >= 1).all()  # never empty
    counts: dict[tuple[int, ...], int] = {}
    for t, row in zip(target.tolist(), available.astype(int).tolist(), strict=True):
        counts[(t, *row)] = counts.get((t, *row), 0) + 1
    return {key: value / n for key, value in counts.items()}


def test_uniform_subsets_are_uniform_and_unchanged_by_the_option():
    freq = _subset_frequencies("uniform")
    assert len(freq) == 4 * 7  # every target with every non-empty subset of the other three
    assert max(abs(f - 1 / 28) for f in freq.values()) < 0.006


def test_emphasis_oversamples_the_full_and_single_input_cases():
    freq = _subset_frequencies("emphasis")
    full = sum(f for key, f in freq.items() if sum(key[1:]) == 3)
    single = sum(f for key, f in freq.items() if sum(key[1:]) == 1)
    pairs = sum(f for key, f in freq.items() if sum(key[1:]) == 2)
    # 1/3 full + 1/3 single + 1/3 uniform (1/7 full, 3/7 single, 3/7 pairs).
    assert full == pytest.approx(1 / 3 + 1 / 21, abs=0.01)
    assert single == pytest.approx(1 / 3 + 1 / 7, abs=0.01)
    assert pairs == pytest.approx(1 / 7, abs=0.01)
    assert len(freq) == 28  # still every direction
    with pytest.raises(ConfigError, match="uniform"):
        draw_unified(0, 0, np.arange(3), 4, "bernoulli")


def test_demo_recipes_use_the_new_options():
    assert load_config("demo_unified").data.unified_subsets == "emphasis"
    data = load_config("demo_unet3d").data
    assert 0 < data.foreground_fraction < 1 and data.sliding_overlap >= 0.5
    with pytest.raises(ConfigError, match="foreground_fraction"):
        load_config("demo_unet3d", ["data.foreground_fraction=1.5"])
    with pytest.raises(ConfigError, match="unified_subsets"):
        load_config("demo_unified", ["data.unified_subsets=all"])


# ------------------------------------------------------------------------------ patch centres
class _Subject:
    """The part of a cached subject PatchDataset reads (storage order (k, i, j))."""

    def __init__(self, shape_ijk: tuple[int, int, int]) -> None:
        i, j, k = shape_ijk
        self.id, self.meta = "sub-01", {"shape": list(shape_ijk)}
        self.mask = np.zeros((k, i, j), bool)
        self.mask[k // 2 - 4 : k // 2 + 4, 2:10, 2:10] = True  # a small foreground in one corner
        self._image = np.zeros((k, i, j), np.float32)

    def image(self, modality: str) -> np.ndarray:
        return self._image


def _centres_on_foreground(fraction: float, n: int = 600) -> float:
    subject = _Subject((64, 64, 64))
    cohort = SimpleNamespace(subject=lambda _id: subject)
    data = PatchDataset(cohort, ["sub-01"], ["t1"], "t2", patch_size=(8, 8, 8), samples_per_epoch=n,
                        foreground_fraction=fraction)  # fmt: skip
    batch = data.__getitems__(list(range(n)))
    return float((batch["mask"].flatten(1).sum(1) > 0).float().mean())


def test_patch_centres_mix_foreground_and_uniform_draws():
    assert _centres_on_foreground(1.0) == 1.0
    share = _centres_on_foreground(2 / 3)
    # Uniform centres hit the 8^3-of-64^3 foreground corner rarely, so the share is about 2/3.
    assert 0.58 < share < 0.78
    assert _centres_on_foreground(0.0) < 0.15
    with pytest.raises(ConfigError, match="foreground_fraction"):
        _centres_on_foreground(1.2)


def test_full_foreground_fraction_draws_exactly_as_before():
    subject = _Subject((64, 64, 64))
    cohort = SimpleNamespace(subject=lambda _id: subject)
    make = lambda **kw: PatchDataset(cohort, ["sub-01"], ["t1"], "t2", patch_size=(8, 8, 8),  # noqa: E731
                                     samples_per_epoch=20, **kw)  # fmt: skip
    a, b = make().__getitems__(list(range(20))), make(foreground_fraction=1.0).__getitems__(list(range(20)))
    torch.testing.assert_close(a["mask"], b["mask"])


# ------------------------------------------------------------------------------ sliding windows
@pytest.mark.parametrize(
    ("size", "patch", "overlap"), [(100, 48, 0.5), (95, 48, 0.5), (64, 32, 0.0), (117, 48, 0.25)]
)
def test_window_starts_match_monai(size, patch, overlap):
    step = max(int(patch * (1 - overlap)), 1)
    monai = sorted({int(s[0].start) for s in dense_patch_slices([size], [patch], [step])})
    assert window_starts(size, patch, overlap) == monai


def _border_effect_generator() -> torch.nn.Module:
    """A convolution with zero padding: constant inside a window, different at its faces."""
    torch.manual_seed(0)
    conv = torch.nn.Conv3d(1, 1, 5, padding=2)
    with torch.no_grad():
        conv.weight.fill_(1 / 125)
        conv.bias.zero_()
    return conv


def _seam_and_interior(overlap: float) -> tuple[float, float]:
    """Largest departure from the interior value within 2 voxels of a window seam along i, and elsewhere."""
    volume = np.full((64, 40, 40), 0.5, np.float32)
    mask = np.ones(volume.shape, bool)
    out = synthesize_patches(_border_effect_generator(), [volume], mask, patch_size=(32, 40, 40),
                             overlap=overlap, margin=0)  # fmt: skip
    profile = out[:, 20, 20].astype(np.float64)
    inner = np.arange(4, 60)  # away from the volume's own faces
    departure = np.abs(profile - np.median(profile[inner]))
    near = np.zeros(64, bool)
    for start in window_starts(64, 32, 0.0)[1:]:  # where unblended windows meet
        near[start - 2 : start + 2] = True
    return float(departure[inner][near[inner]].max()), float(departure[inner][~near[inner]].max())


def test_blended_windows_leave_no_seam():
    """A constant input gives a constant output: the window faces must not show (they do without overlap)."""
    seam, interior = _seam_and_interior(0.0)
    assert seam > 0.05 and interior < 1e-6  # unblended: a dip where two windows meet
    blended_seam, blended_interior = _seam_and_interior(0.5)
    assert blended_seam < 0.02 * seam
    assert blended_seam <= max(blended_interior, 1e-4)
