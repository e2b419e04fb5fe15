"""Grid comparison, overlap, resampling and subject alignment, in world millimetres."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import SimpleITK as sitk

from medsynth.errors import GeometryError
from medsynth.io.geometry import (
    affine_from_itk,
    align_subject,
    grid_mismatch,
    overlap_fraction,
    resample_to,
    volume_to_sitk,
)
from medsynth.io.volume import Volume


def oblique_affine(origin=(10.0, -20.0, 30.0), spacing=(1.0, 1.2, 2.0)) -> np.ndarray:
    a = np.deg2rad(30)
    rotation = np.array([[np.cos(a), 0, np.sin(a)], [0, 1, 0], [-np.sin(a), 0, np.cos(a)]])
    affine = np.eye(4)
    affine[:3, :3] = rotation @ np.diag(spacing)
    affine[:3, 3] = origin
    return affine


def volume(affine=None, shape=(8, 10, 12), name="t1.nii.gz", seed=0) -> Volume:
    array = np.random.default_rng(seed).uniform(1, 2, size=shape).astype(np.float32)
    return Volume(array, oblique_affine() if affine is None else affine, {"path": name, "format": "nifti"})


def shifted(mm: float, axis: int = 0) -> np.ndarray:
    affine = oblique_affine()
    affine[:3, 3] += affine[:3, axis] / np.linalg.norm(affine[:3, axis]) * mm
    return affine


def test_volume_to_sitk_and_back_is_exact():
    source = volume()
    image = volume_to_sitk(source)
    assert image.GetSize() == source.shape
    np.testing.assert_allclose(
        affine_from_itk(image.GetSpacing(), image.GetOrigin(), image.GetDirection()),
        source.affine,
        atol=1e-12,
    )
    assert image.GetPixel(3, 4, 5) == source.array[3, 4, 5]


def test_grid_mismatch_tolerance_is_in_mm():
    a = volume()
    assert grid_mismatch(a, volume(shifted(0.0005))) is None
    assert "0.5 mm" in grid_mismatch(a, volume(shifted(0.5)))
    assert grid_mismatch(a, volume(shifted(0.5)), atol_mm=0.6) is None
    assert grid_mismatch(a, volume(shape=(8, 10, 11))) == "shape 8x10x12 vs 8x10x11"


def test_overlap_fraction():
    a = volume()
    assert overlap_fraction(a, a) == 1.0
    assert overlap_fraction(a, volume(shifted(4.0))) == pytest.approx(0.5)  # 8 voxels of 1 mm, moved 4 mm
    assert overlap_fraction(a, volume(shifted(500.0))) == 0.0


def test_resample_to_a_shifted_grid_moves_values_and_fills_with_minimum():
    source = volume()
    target = Volume(np.zeros(source.shape), shifted(2.0), {"path": "t2.nii.gz", "format": "nifti"})
    out = resample_to(source, target, interpolation="nearest")
    assert out.shape == target.shape
    np.testing.assert_array_equal(out.affine, target.affine)
    np.testing.assert_array_equal(out.array[:-2], source.array[2:])
    np.testing.assert_array_equal(out.array[-2:], source.array.min())
    assert out.meta["path"] == "t1.nii.gz" and out.meta["resampled_to"] == "t2.nii.gz"


def test_resample_to_same_grid_is_identity_and_bad_name_refused():
    source = volume()
    np.testing.assert_allclose(resample_to(source, source).array, source.array, atol=1e-6)
    with pytest.raises(ValueError, match="linear, nearest, bspline"):
        resample_to(source, source, interpolation="cubic")


def test_linear_resampling_matches_simpleitk_world_lookup():
    source = volume()
    target = volume(shifted(0.5, axis=1), name="t2.nii.gz")
    out = resample_to(source, target)
    image = volume_to_sitk(source)
    world = target.affine @ np.array([4, 5, 6, 1.0])
    lps = (-world[0], -world[1], world[2])
    expected = image.EvaluateAtPhysicalPoint(lps, sitk.sitkLinear)
    assert out.array[4, 5, 6] == pytest.approx(expected, abs=1e-5)


def test_align_subject_keeps_matching_grids_untouched():
    t1, t2 = volume(), volume(shifted(0.0001), name="t2.nii.gz", seed=1)
    aligned = align_subject({"t1": t1, "t2": t2}, "t1")
    assert aligned["t1"] is t1 and aligned["t2"] is t2


def test_align_subject_resamples_overlapping_grids_with_a_warning(caplog):
    t1, t2 = volume(), volume(shifted(1.5), name="t2.nii.gz", seed=1)
    with caplog.at_level(logging.WARNING, logger="medsynth"):
        aligned = align_subject({"t1": t1, "t2": t2}, "t1")
    assert grid_mismatch(aligned["t2"], t1) is None
    assert "t2.nii.gz" in caplog.text and "t1.nii.gz" in caplog.text


def test_align_subject_refuses_disjoint_images():
    t1, t2 = volume(), volume(shifted(6.0), name="other_subject_t2.nii.gz")
    with pytest.raises(GeometryError, match=r"other_subject_t2.nii.gz: covers only 25%.*t1.nii.gz"):
        align_subject({"t1": t1, "t2": t2}, "t1")
    with pytest.raises(ValueError, match="flair"):
        align_subject({"t1": t1}, "flair")
