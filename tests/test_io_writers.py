"""write_volume: the output sits on the reference's exact grid, with the reference's header when it had one."""

from __future__ import annotations

import hashlib
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medsynth.errors import MedsynthError
from medsynth.io.readers import read_volume
from medsynth.io.volume import Volume
from medsynth.io.writers import write_volume


def oblique_affine(spacing=(0.9, 1.1, 1.7), origin=(10.0, -20.0, 30.0)) -> np.ndarray:
    a, b = np.deg2rad(25), np.deg2rad(-10)
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    affine = np.eye(4)
    affine[:3, :3] = rz @ rx @ np.diag(spacing)
    affine[:3, 3] = origin
    return affine


def noise(shape=(7, 9, 11), seed=0) -> np.ndarray:
    return np.random.default_rng(seed).normal(100, 30, size=shape).astype(np.float32)


def save_nifti(path: Path, array: np.ndarray, qform_code: int = 1, sform_code: int = 2) -> Path:
    image = nib.Nifti1Image(array, oblique_affine())
    image.header.set_qform(oblique_affine(), code=qform_code)
    image.header.set_sform(oblique_affine(), code=sform_code)
    image.header.set_xyzt_units("mm", "msec")
    nib.save(image, path)
    return path


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii"])
def test_nifti_round_trip_keeps_the_header(tmp_path, suffix):
    source = save_nifti(tmp_path / f"t1{suffix}", noise())
    reference = read_volume(source)
    synthetic = noise(seed=1) * 3
    out = write_volume(synthetic, reference, tmp_path / f"t2_syn{suffix}")

    written, original = nib.load(out), nib.load(source)
    np.testing.assert_array_equal(written.affine, original.affine)
    np.testing.assert_array_equal(written.header.get_qform(), original.header.get_qform())
    np.testing.assert_array_equal(written.header.get_sform(), original.header.get_sform())
    assert (int(written.header["qform_code"]), int(written.header["sform_code"])) == (1, 2)
    assert written.shape == original.shape == (7, 9, 11)
    assert written.header.get_zooms() == original.header.get_zooms()
    assert written.header.get_xyzt_units() == ("mm", "msec")
    assert written.get_data_dtype() == np.float32
    np.testing.assert_array_equal(np.asanyarray(written.dataobj), synthetic)


def test_qform_only_reference_stays_qform_only(tmp_path):
    reference = read_volume(save_nifti(tmp_path / "t1.nii.gz", noise(), qform_code=1, sform_code=0))
    written = nib.load(write_volume(noise(), reference, tmp_path / "out.nii.gz"))
    assert (int(written.header["qform_code"]), int(written.header["sform_code"])) == (1, 0)
    np.testing.assert_allclose(written.affine, reference.affine, atol=1e-6)


def test_scaled_integer_reference_gives_unscaled_float_output(tmp_path):
    image = nib.Nifti1Image(np.ones((5, 6, 7), dtype=np.int16), oblique_affine())
    image.header.set_slope_inter(4.0, 100.0)
    nib.save(image, tmp_path / "ct.nii.gz")
    reference = read_volume(tmp_path / "ct.nii.gz")
    values = np.linspace(-1000, 1000, 5 * 6 * 7, dtype=np.float32).reshape(5, 6, 7)
    written = nib.load(write_volume(values, reference, tmp_path / "out.nii.gz"))
    assert written.get_data_dtype() == np.float32
    assert written.dataobj.slope == 1.0 and written.dataobj.inter == 0.0
    np.testing.assert_array_equal(np.asanyarray(written.dataobj), values)


def test_one_volume_of_a_4d_reference_is_written_3d(tmp_path):
    image = nib.Nifti1Image(np.stack([noise((4, 5, 6))] * 3, axis=-1), oblique_affine())
    nib.save(image, tmp_path / "dwi.nii.gz")
    reference = read_volume(tmp_path / "dwi.nii.gz", volume_index=1)
    written = nib.load(write_volume(reference.array, reference, tmp_path / "b0.nii.gz"))
    assert written.shape == (4, 5, 6)
    np.testing.assert_allclose(written.affine, oblique_affine(), atol=1e-6)


def test_header_is_updated_when_the_grid_changed(tmp_path):
    reference = read_volume(save_nifti(tmp_path / "t1.nii.gz", noise()))
    moved = oblique_affine(origin=(0.0, 0.0, 0.0))
    written = nib.load(
        write_volume(noise(), Volume(reference.array, moved, reference.meta), tmp_path / "o.nii")
    )
    np.testing.assert_allclose(written.affine, moved, atol=1e-6)
    assert (int(written.header["qform_code"]), int(written.header["sform_code"])) == (1, 2)


@pytest.mark.parametrize("suffix", [".mha", ".nrrd"])
def test_itk_round_trip(tmp_path, suffix):
    reference = Volume(noise(), oblique_affine(), {"format": "nifti", "path": "t1.nii.gz"})
    out = write_volume(reference.array * 2, reference, tmp_path / f"t2{suffix}")
    back = read_volume(out)
    np.testing.assert_allclose(back.affine, reference.affine, atol=1e-9)
    np.testing.assert_array_equal(back.array, reference.array * 2)


def test_nifti_from_non_nifti_reference_uses_scanner_codes(tmp_path):
    reference = Volume(noise(), oblique_affine(), {"format": "dicom", "path": "series/"})
    written = nib.load(write_volume(reference.array, reference, tmp_path / "out.nii.gz"))
    assert (int(written.header["qform_code"]), int(written.header["sform_code"])) == (1, 1)
    np.testing.assert_allclose(written.header.get_qform(), oblique_affine(), atol=1e-5)
    np.testing.assert_allclose(written.header.get_sform(), oblique_affine(), atol=1e-6)


def test_bad_shape_and_extension(tmp_path):
    reference = Volume(noise(), oblique_affine(), {"format": "itk", "path": "t1.mha"})
    with pytest.raises(ValueError, match="does not match the reference grid"):
        write_volume(np.zeros((7, 9, 10)), reference, tmp_path / "out.nii.gz")
    with pytest.raises(MedsynthError, match="unsupported output extension"):
        write_volume(reference.array, reference, tmp_path / "out.png")
    assert list(tmp_path.iterdir()) == []


def test_overwrite_is_atomic_and_input_untouched(tmp_path):
    source = save_nifti(tmp_path / "t1.nii.gz", noise())
    digest, mtime = hashlib.sha256(source.read_bytes()).hexdigest(), source.stat().st_mtime_ns
    reference = read_volume(source)
    out = tmp_path / "out" / "t2.nii.gz"
    write_volume(reference.array, reference, out)
    write_volume(reference.array + 1, reference, out)
    np.testing.assert_array_equal(read_volume(out).array, reference.array + 1)
    assert [p.name for p in out.parent.iterdir()] == ["t2.nii.gz"]
    assert (hashlib.sha256(source.read_bytes()).hexdigest(), source.stat().st_mtime_ns) == (digest, mtime)


@pytest.mark.parametrize("suffix", [".mha", ".nrrd", ".nii.gz"])
def test_int16_is_stored_as_int16_in_every_format(tmp_path, suffix):
    """Issue 31, item 10: ``--out-dtype int16`` with ``.mha``/``.nrrd`` stored float32."""
    import SimpleITK as sitk

    reference = Volume(noise() * 10 - 500, oblique_affine(), {"format": "nifti", "path": "t1.nii.gz"})
    out = write_volume(reference.array, reference, tmp_path / f"ct{suffix}", dtype="int16")
    assert sitk.ReadImage(str(out)).GetPixelID() == sitk.sitkInt16
    back = read_volume(out)
    np.testing.assert_array_equal(back.array, np.rint(reference.array))
    np.testing.assert_allclose(back.affine, reference.affine, atol=1e-5)


def test_int16_clipping_is_one_warning_naming_the_count_and_range(tmp_path, caplog):
    """Issue 31, item 16: values beyond int16 were clipped without a word."""
    array = noise()
    array[0, 0, :3] = [40000.0, 50000.5, -33000.0]
    reference = Volume(noise(), oblique_affine(), {"format": "nifti", "path": "t1.nii.gz"})
    out = tmp_path / "ct.mha"
    with caplog.at_level("WARNING", logger="medsynth"):
        write_volume(array, reference, out, dtype="int16")
        write_volume(noise(), reference, tmp_path / "in_range.mha", dtype="int16")
    (record,) = caplog.records
    message = record.getMessage()
    assert str(out) in message and "3 voxel(s)" in message and "[-32768, 32767]" in message
    assert "-33000 to 50000.5" in message
    assert read_volume(out).array[0, 0, :3].tolist() == [32767.0, 32767.0, -32768.0]
