"""The training support of (intensity, depth) pairs: what the fingerprint counts, and where the
uncertainty map is raised because the model never saw an input like this voxel."""

from __future__ import annotations

import numpy as np
import pytest

from medsynth.data.appearance import (
    DEPTH_BINS,
    DEPTH_STEP_MM,
    HIST_BINS,
    appearance_statistics,
    depth_below_surface,
    intensity_depth_counts,
)
from medsynth.data.fingerprint import Fingerprint
from medsynth.data.normalize import PercentileNormalizer
from medsynth.io.volume import Volume
from medsynth.model.support import TrainingSupport, leave_one_out_unseen, uninformed_error


def _ball(shape: int = 21, radius: float = 8.0) -> np.ndarray:
    grid = np.indices((shape,) * 3) - shape // 2
    return np.sqrt((grid**2).sum(axis=0)) <= radius


def test_depth_is_millimetres_to_the_background_along_each_axis() -> None:
    mask = np.zeros((9, 9, 9), dtype=bool)
    mask[1:8, 1:8, 1:8] = True
    depth = depth_below_surface(mask, (2.0, 2.0, 3.0))
    assert depth[0, 0, 0] == 0 and depth[1, 4, 4] == pytest.approx(2.0)
    assert depth[4, 4, 4] == pytest.approx(8.0)  # 4 voxels of 2 mm to the nearest face, not 4 x 3 mm


def test_fine_grids_are_measured_on_a_coarser_one_within_a_coarse_voxel() -> None:
    from scipy import ndimage

    mask = _ball(shape=41, radius=17.0)
    depth = depth_below_surface(mask, (1.0, 1.0, 1.0))  # measured on every 2nd voxel
    exact = ndimage.distance_transform_edt(mask)
    assert (depth[~mask] == 0).all()
    assert np.abs(depth - exact)[mask].max() <= 2.0 * np.sqrt(3.0)


def test_counts_place_each_voxel_by_its_intensity_and_depth() -> None:
    normalised = np.array([-1.0, 0.999, 1.0, 5.0, 0.0])
    depth = np.array([0.0, DEPTH_STEP_MM, 1000.0, 2.5, 7.0])
    counts = intensity_depth_counts(normalised, depth)
    assert counts.shape == (HIST_BINS, DEPTH_BINS) and counts.sum() == 5
    assert counts[0, 0] == 1 and counts[HIST_BINS - 1, 1] == 1 and counts[HIST_BINS - 1, DEPTH_BINS - 1] == 1
    assert counts[HIST_BINS - 1, 0] == 1  # clipped to [-1, 1] like the input the network sees
    assert counts[HIST_BINS // 2, 1] == 1


def test_appearance_counts_every_foreground_voxel_once_and_checks_can_skip_them() -> None:
    mask = _ball()
    array = np.where(mask, 100.0, 0.0).astype(np.float32) + np.random.default_rng(0).random(mask.shape)
    volume = Volume(array.astype(np.float32), np.diag([2.0, 2.0, 2.0, 1.0]), {"path": "x.nii.gz"})
    normalizer = PercentileNormalizer().fit(array, mask)
    stats = appearance_statistics(volume, normalizer, mask)
    assert np.asarray(stats["depth_histogram"]).sum() == mask.sum()
    assert "depth_histogram" not in appearance_statistics(volume, normalizer, mask, with_depth=False)


def test_uninformed_error_is_the_mean_distance_to_the_median() -> None:
    halves = np.zeros(HIST_BINS)
    halves[0] = halves[-1] = 1.0
    width = 2.0 / HIST_BINS
    assert uninformed_error(halves) == pytest.approx(0.5 * (2.0 - width))
    assert uninformed_error(np.ones(HIST_BINS)) == pytest.approx(0.5, abs=width)  # uniform on [-1, 1]


def _fingerprint(subjects: dict[str, np.ndarray], depth_counts: bool = True) -> Fingerprint:
    entries = {}
    for subject, table in subjects.items():
        appearance = {"histogram": (np.ones(HIST_BINS) / HIST_BINS).tolist()}
        if depth_counts:
            appearance["depth_histogram"] = table.tolist()
        entries[subject] = {m: {"appearance": appearance} for m in ("t1", "t2")}
    return Fingerprint(specs={}, cohort={}, subjects=entries)


def test_unseen_voxels_are_pairs_no_training_voxel_had() -> None:
    seen = np.zeros((HIST_BINS, DEPTH_BINS))
    seen[:, :2] = 1000  # every intensity, but only within 10 mm of the surface
    seen[HIST_BINS // 2, :] = 1000  # and mid-grey at every depth
    support = TrainingSupport.from_fingerprint(_fingerprint({"a": seen, "b": seen}), ["t1"], "t2")
    assert support is not None and support.uninformed_error == pytest.approx(0.5, abs=0.07)
    mask = _ball()
    normalised = np.where(mask, 0.0, -1.0).astype(np.float32)  # mid-grey everywhere: seen
    assert not support.unseen({"t1": normalised}, mask, (2.0, 2.0, 2.0)).any()
    normalised[10, 10, 10] = 1.0  # bright, 16 mm deep
    normalised[10, 10, 2] = 1.0  # bright, 2 mm deep
    unseen = support.unseen({"t1": normalised}, mask, (2.0, 2.0, 2.0))
    assert unseen.sum() == 1 and unseen[10, 10, 10]


def test_old_fingerprints_have_no_support_and_leave_one_out_counts_false_alarms() -> None:
    table = np.zeros((HIST_BINS, DEPTH_BINS))
    table[HIST_BINS // 2, 0] = 100
    assert (
        TrainingSupport.from_fingerprint(_fingerprint({"a": table}, depth_counts=False), ["t1"], "t2") is None
    )
    odd = table.copy()
    odd[0, 5] = 25  # a fifth of this subject's voxels are in a pair the other subject never had
    rates = leave_one_out_unseen(_fingerprint({"a": table, "b": odd}), "t1")
    assert rates == {"a": 0.0, "b": pytest.approx(0.2)}
