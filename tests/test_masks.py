"""Foreground masks and bounding boxes."""

from __future__ import annotations

import numpy as np
import pytest

from medsynth.data.masks import bounding_box, foreground_mask


def _head(shape=(32, 32, 24)) -> tuple[np.ndarray, np.ndarray]:
    """An ellipsoid 'head' with a dark core (CSF-like) and a bright speck of noise outside it."""
    grid = np.indices(shape).astype(np.float32)
    centre = (np.array(shape) - 1) / 2
    radius = ((grid - centre[:, None, None, None]) / (np.array(shape)[:, None, None, None] * 0.35)) ** 2
    head = radius.sum(axis=0) <= 1.0
    core = radius.sum(axis=0) <= 0.15
    rng = np.random.default_rng(1)
    image = rng.normal(2.0, 1.0, shape).astype(np.float32)
    image[head] = 400.0 + rng.normal(0.0, 10.0, head.sum())
    image[core] = 3.0
    image[1, 1, 1] = 400.0
    return image, head


def test_mask_fills_dark_interior_and_drops_noise() -> None:
    image, head = _head()
    mask = foreground_mask([image])
    assert mask.dtype == bool
    assert not mask[1, 1, 1]
    assert mask[16, 16, 12]  # the dark core is inside the head
    assert (mask == head).mean() > 0.98


def test_mask_combines_contrasts() -> None:
    image, head = _head()
    inverted = np.where(head, 1000.0 - image, 0.0).astype(np.float32)  # dark core is bright here
    mask = foreground_mask([image, inverted * 10.0])
    assert (mask == head).mean() > 0.98


def test_mask_keeps_foreground_touching_the_grid_edge() -> None:
    image = np.zeros((16, 16, 16), np.float32)
    image[:, :, :8] = 100.0
    mask = foreground_mask([image])
    assert mask[:, :, :8].all() and not mask[:, :, 8:].any()


def test_constant_image_has_no_foreground_and_shape_mismatch_raises() -> None:
    assert not foreground_mask([np.ones((8, 8, 8), np.float32)]).any()
    with pytest.raises(ValueError, match="share a grid"):
        foreground_mask([np.ones((8, 8, 8)), np.ones((8, 8, 7))])


def test_bounding_box_with_margin_clips_to_grid() -> None:
    mask = np.zeros((10, 12, 8), bool)
    mask[2:5, 3:9, 0:2] = True
    assert bounding_box(mask) == (slice(2, 5), slice(3, 9), slice(0, 2))
    assert bounding_box(mask, margin=2) == (slice(0, 7), slice(1, 11), slice(0, 4))
    assert bounding_box(np.zeros((4, 5, 6), bool)) == (slice(0, 4), slice(0, 5), slice(0, 6))
