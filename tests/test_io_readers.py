"""read_volume: every format gives the same RAS Volume, and every bad input is refused in one line."""

from __future__ import annotations

import gzip
import hashlib
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from medsynth.errors import DataError
from medsynth.io.readers import read_volume
from medsynth.io.volume import LPS_TO_RAS


def oblique_affine(spacing=(0.9, 1.1, 1.7), origin=(10.0, -20.0, 30.0)) -> np.ndarray:
    angle = np.deg2rad(20)
    rotation = np.array(
        [
            [np.cos(angle), -np.sin(angle), 0],
            [np.sin(angle) * 0.8, np.cos(angle) * 0.8, -0.6],
            [0.0, 0.0, 0.0],
        ]
    )
    rotation[2] = np.cross(rotation[0], rotation[1])
    affine = np.eye(4)
    affine[:3, :3] = rotation @ np.diag(spacing)
    affine[:3, 3] = origin
    return affine


def ramp(shape=(7, 9, 11)) -> np.ndarray:
    return np.arange(np.prod(shape), dtype=np.float32).reshape(shape)


def save_nifti(path: Path, array: np.ndarray, affine: np.ndarray | None = None) -> Path:
    nib.save(nib.Nifti1Image(array, oblique_affine() if affine is None else affine), path)
    return path


def fingerprint(path: Path) -> tuple[str, int]:
    return hashlib.sha256(path.read_bytes()).hexdigest(), path.stat().st_mtime_ns


def test_nifti_values_affine_and_meta(tmp_path):
    path = save_nifti(tmp_path / "t1.nii.gz", ramp())
    volume = read_volume(path)
    assert volume.array.dtype == np.float32
    np.testing.assert_array_equal(volume.array, ramp())
    np.testing.assert_allclose(volume.affine, oblique_affine(), atol=1e-6)
    assert volume.meta["format"] == "nifti"
    assert volume.meta["path"] == str(path)
    assert isinstance(volume.meta["header"], bytes)
    assert volume.meta["on_disk_dtype"] == "float32"


def test_nifti_scaling_is_applied_and_recorded(tmp_path):
    image = nib.Nifti1Image(np.full((4, 5, 6), 10, dtype=np.int16), np.eye(4))
    image.header.set_slope_inter(2.5, -3.0)
    nib.save(image, tmp_path / "scaled.nii")
    volume = read_volume(tmp_path / "scaled.nii")
    np.testing.assert_allclose(volume.array, 22.0)
    assert (volume.meta["scl_slope"], volume.meta["scl_inter"]) == (2.5, -3.0)
    assert volume.meta["on_disk_dtype"] == "int16"


def test_trailing_singleton_axis_is_3d(tmp_path):
    path = save_nifti(tmp_path / "x.nii.gz", ramp((4, 5, 6))[..., None])
    assert read_volume(path).shape == (4, 5, 6)


def test_4d_needs_volume_index(tmp_path):
    data = np.stack([ramp((4, 5, 6)) * t for t in range(3)], axis=-1)
    path = save_nifti(tmp_path / "bold.nii.gz", data)
    with pytest.raises(DataError, match=r"4D with 3 volumes; pick one with --volume-index N, N from 0 to 2"):
        read_volume(path)
    np.testing.assert_array_equal(read_volume(path, volume_index=2).array, data[..., 2])
    with pytest.raises(DataError, match="--volume-index 3 is out of range"):
        read_volume(path, volume_index=3)


def test_volume_index_out_of_range_for_3d(tmp_path):
    path = save_nifti(tmp_path / "t1.nii.gz", ramp())
    assert read_volume(path, volume_index=0).shape == (7, 9, 11)
    with pytest.raises(DataError, match="out of range"):
        read_volume(path, volume_index=1)


@pytest.mark.parametrize("shape", [(8, 9), (8, 9, 1), (1, 8, 9)])
def test_2d_images_are_refused(tmp_path, shape):
    path = save_nifti(tmp_path / "slice.nii", np.ones(shape, dtype=np.float32))
    with pytest.raises(DataError, match="2D image"):
        read_volume(path)


def test_5d_image_is_refused(tmp_path):
    path = save_nifti(tmp_path / "five.nii", np.ones((3, 4, 5, 2, 2), dtype=np.float32))
    with pytest.raises(DataError, match="5 dimensions"):
        read_volume(path)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_voxels_are_refused(tmp_path, bad):
    data = ramp()
    data[1, 2, 3] = bad
    path = save_nifti(tmp_path / "nan.nii.gz", data)
    with pytest.raises(DataError, match="1 NaN/Inf voxels") as error:
        read_volume(path)
    assert str(path) in str(error.value)


def test_truncated_nifti_gz_is_refused(tmp_path):
    path = save_nifti(tmp_path / "t1.nii.gz", np.random.default_rng(0).normal(size=(20, 20, 20)))
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(DataError, match="truncated or corrupt"):
        read_volume(path)


def test_truncated_plain_nifti_is_refused(tmp_path):
    path = save_nifti(tmp_path / "t1.nii", ramp((20, 20, 20)))
    path.write_bytes(path.read_bytes()[:2000])
    with pytest.raises(DataError, match="truncated or corrupt"):
        read_volume(path)


def test_not_a_nifti_is_refused(tmp_path):
    path = tmp_path / "notes.nii.gz"
    path.write_bytes(gzip.compress(b"this is not an image" * 10))
    with pytest.raises(DataError, match="cannot be read as NIfTI"):
        read_volume(path)


def test_corrupt_mha_is_refused(tmp_path):
    path = tmp_path / "broken.mha"
    path.write_text(
        "ObjectType = Image\nNDims = 3\nDimSize = 4 4 4\nElementType = MET_FLOAT\nElementDataFile = LOCAL\n"
    )
    with pytest.raises(DataError, match="truncated or corrupt"):
        read_volume(path)


def test_missing_path_and_unknown_type(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        read_volume(tmp_path / "nope.nii.gz")
    (tmp_path / "image.png").write_bytes(b"\x89PNG")
    with pytest.raises(DataError, match="unsupported file type"):
        read_volume(tmp_path / "image.png")
    (tmp_path / "slice.dcm").write_bytes(b"")
    with pytest.raises(DataError, match="pass the folder"):
        read_volume(tmp_path / "slice.dcm")


@pytest.mark.parametrize("suffix", [".mha", ".nrrd"])
def test_itk_lps_geometry_becomes_ras(tmp_path, suffix):
    data_kji = np.random.default_rng(1).normal(size=(11, 9, 7)).astype(np.float32)
    image = sitk.GetImageFromArray(data_kji)
    lps = LPS_TO_RAS @ oblique_affine()
    spacing = np.linalg.norm(lps[:3, :3], axis=0)
    image.SetSpacing(spacing.tolist())
    image.SetOrigin(lps[:3, 3].tolist())
    image.SetDirection((lps[:3, :3] / spacing).flatten().tolist())
    sitk.WriteImage(image, str(tmp_path / f"t2{suffix}"))

    volume = read_volume(tmp_path / f"t2{suffix}")
    assert volume.meta["format"] == "itk"
    assert volume.shape == (7, 9, 11)
    np.testing.assert_allclose(volume.affine, oblique_affine(), atol=1e-9)
    assert volume.array[2, 5, 8] == image.GetPixel(2, 5, 8)
    # The same world point through SimpleITK and through the RAS affine.
    world_lps = image.TransformIndexToPhysicalPoint((2, 5, 8))
    world_ras = volume.affine @ np.array([2, 5, 8, 1.0])
    np.testing.assert_allclose(LPS_TO_RAS[:3, :3] @ world_ras[:3], world_lps, atol=1e-9)


def test_itk_2d_and_4d(tmp_path):
    sitk.WriteImage(sitk.Image(8, 9, sitk.sitkFloat32), str(tmp_path / "flat.mha"))
    with pytest.raises(DataError, match="2D image"):
        read_volume(tmp_path / "flat.mha")
    data = np.random.default_rng(2).normal(size=(3, 6, 5, 4)).astype(np.float32)  # t, k, j, i
    sitk.WriteImage(sitk.GetImageFromArray(data, isVector=False), str(tmp_path / "series.nrrd"))
    with pytest.raises(DataError, match="4D with 3 volumes"):
        read_volume(tmp_path / "series.nrrd")
    volume = read_volume(tmp_path / "series.nrrd", volume_index=1)
    np.testing.assert_array_equal(volume.array, data[1].transpose(2, 1, 0))


def test_reading_leaves_inputs_untouched(tmp_path):
    nifti = save_nifti(tmp_path / "t1.nii.gz", ramp())
    mha = tmp_path / "t1.mha"
    sitk.WriteImage(sitk.GetImageFromArray(ramp()), str(mha))
    before = {path: fingerprint(path) for path in (nifti, mha)}
    for path in before:
        read_volume(path)
    assert {path: fingerprint(path) for path in before} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t1.mha", "t1.nii.gz"]
