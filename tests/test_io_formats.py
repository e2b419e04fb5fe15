"""The format registry, lazy imports, and messages that say what is really wrong with a path."""

from __future__ import annotations

import builtins
import gzip
import logging
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medsynth.errors import DataError, MedsynthError
from medsynth.io import formats
from medsynth.io.dicom import write_dicom_series
from medsynth.io.formats import base
from medsynth.io.readers import read_volume
from medsynth.io.volume import Volume
from medsynth.io.writers import write_volume


def ramp_volume(shape=(5, 6, 7)) -> Volume:
    affine = np.diag([0.9, 1.1, 1.7, 1.0])
    affine[:3, 3] = (10.0, -20.0, 30.0)
    return Volume(np.arange(np.prod(shape), dtype=np.float32).reshape(shape), affine)


def save_nifti(path: Path, volume: Volume) -> Path:
    nib.save(nib.Nifti1Image(volume.array, volume.affine), path)
    return path


# --- the registry -------------------------------------------------------------------------------------


def test_every_format_is_registered_by_its_endings():
    names = {f.name: f for f in formats.registered()}
    assert set(names) >= {"nifti", "itk", "dicom"}
    assert formats.format_for(Path("a.NII.GZ")) is names["nifti"]
    assert formats.format_for(Path("a.nhdr")) is names["itk"]
    assert formats.format_for(Path("a.mhd"), writing=True) is None  # read, not written
    assert formats.format_for(Path("a.txt")) is None


def test_unknown_extension_lists_the_registered_ones(tmp_path):
    path = tmp_path / "image.png"
    path.write_bytes(b"\x89PNG")
    with pytest.raises(DataError, match="unsupported file type") as read_error:
        read_volume(path)
    with pytest.raises(MedsynthError, match="unsupported output extension") as write_error:
        write_volume(ramp_volume().array, ramp_volume(), tmp_path / "out.png")
    for ending in (".nii", ".nii.gz", ".mha", ".mhd", ".nrrd", ".nhdr", "a DICOM folder"):
        assert ending in str(read_error.value)
    written = str(write_error.value).split("; use ")[1].split(", ")
    assert sorted(written) == [".mha", ".nii", ".nii.gz", ".nrrd"]


def test_a_new_format_is_one_registration(tmp_path):
    def read(path, *, series_uid=None, volume_index=None):
        data = np.load(path)
        return base.finish(data["array"], data["affine"], {"format": "npz"}, path)

    def write(array, reference, path):
        with open(path, "wb") as stream:
            np.savez(stream, array=array, affine=reference.affine)

    formats.register(formats.ImageFormat("npz", (".vol.npz",), read, write, write_suffixes=(".vol.npz",)))
    try:
        volume = ramp_volume()
        back = read_volume(write_volume(volume.array, volume, tmp_path / "a.vol.npz"))
        np.testing.assert_array_equal(back.array, volume.array)
        np.testing.assert_array_equal(back.affine, volume.affine)
        assert ".vol.npz" in formats.known_endings(writing=True)
    finally:
        base._REGISTRY.pop("npz")


def test_a_format_cannot_take_another_formats_ending():
    with pytest.raises(ValueError, match="claims"):
        formats.register(formats.ImageFormat("fake", (".nii",), lambda path, **_: None))
    with pytest.raises(ValueError, match="lower case"):
        formats.ImageFormat("fake", (".NII",), lambda path, **_: None)


def test_nifti_io_does_not_import_simpleitk(tmp_path):
    script = f"""
import sys
import numpy as np
import medsynth.io.readers, medsynth.io.writers, medsynth.io.geometry
from medsynth.io.volume import Volume
volume = Volume(np.ones((3, 4, 5)), np.eye(4))
path = medsynth.io.writers.write_volume(volume.array, volume, {str(tmp_path / "a.nii.gz")!r})
medsynth.io.readers.read_volume(path)
medsynth.io.geometry.grid_mismatch(volume, volume)
assert "SimpleITK" not in sys.modules, "SimpleITK was imported"
"""
    subprocess.run([sys.executable, "-c", script], check=True)


# --- messages that say the truth --------------------------------------------------------------------


def test_uncompressed_nifti_named_gz_is_read_with_a_warning(tmp_path, caplog):
    volume = ramp_volume()
    plain = save_nifti(tmp_path / "a.nii", volume)
    misnamed = tmp_path / "b.nii.gz"
    misnamed.write_bytes(plain.read_bytes())
    with caplog.at_level(logging.WARNING, logger="medsynth"):
        back = read_volume(misnamed)
    np.testing.assert_array_equal(back.array, volume.array)
    np.testing.assert_allclose(back.affine, volume.affine)
    assert "not gzip-compressed although named .nii.gz; rename it to .nii" in caplog.text


def test_compressed_nifti_named_nii_is_read(tmp_path, caplog):
    volume = ramp_volume()
    packed = save_nifti(tmp_path / "a.nii.gz", volume)
    misnamed = tmp_path / "b.nii"
    misnamed.write_bytes(packed.read_bytes())
    with caplog.at_level(logging.WARNING, logger="medsynth"):
        np.testing.assert_array_equal(read_volume(misnamed).array, volume.array)
    assert "gzip-compressed although named .nii; rename it to .nii.gz" in caplog.text


def test_text_named_nii_gz_is_not_called_uncompressed_nifti(tmp_path):
    path = tmp_path / "a.nii.gz"
    path.write_bytes(b"not an image " * 40)
    with pytest.raises(DataError, match="not gzip-compressed.*holds no NIfTI header"):
        read_volume(path)
    path.write_bytes(gzip.compress(b"not an image " * 40))
    with pytest.raises(DataError, match="truncated or corrupt"):
        read_volume(path)


def test_missing_file_and_missing_folder(tmp_path):
    with pytest.raises(DataError, match=r"a\.nii\.gz: does not exist"):
        read_volume(tmp_path / "a.nii.gz")
    with pytest.raises(DataError, match=r"nowhere/a\.nii\.gz: does not exist"):
        read_volume(tmp_path / "nowhere" / "a.nii.gz")


def test_symbolic_link_loop_and_broken_link(tmp_path):
    (tmp_path / "a.nii.gz").symlink_to(tmp_path / "b.nii.gz")
    (tmp_path / "b.nii.gz").symlink_to(tmp_path / "a.nii.gz")
    with pytest.raises(DataError, match=r"a\.nii\.gz: is a symbolic link loop"):
        read_volume(tmp_path / "a.nii.gz")
    (tmp_path / "c.nii.gz").symlink_to(tmp_path / "gone.nii.gz")
    with pytest.raises(DataError, match=r"c\.nii\.gz: is a symbolic link to .*gone\.nii\.gz, which does not"):
        read_volume(tmp_path / "c.nii.gz")


def test_permission_denied(tmp_path, monkeypatch):
    path = save_nifti(tmp_path / "a.nii.gz", ramp_volume())
    if os.geteuid() != 0:  # root reads anything, so there the refusal is simulated
        path.chmod(0)
    else:
        real_open = builtins.open

        def refusing_open(file, *args, **kwargs):
            if Path(str(file)) == path:
                raise PermissionError(13, "Permission denied", str(file))
            return real_open(file, *args, **kwargs)

        monkeypatch.setattr(builtins, "open", refusing_open)
    with pytest.raises(DataError, match=r"a\.nii\.gz: cannot be read: permission denied"):
        read_volume(path)


def test_truncated_slice_behind_links_names_the_real_file(tmp_path):
    files = write_dicom_series(ramp_volume((8, 9, 6)), tmp_path / "export" / "t1", series_description="t1")
    broken = files[3]
    broken.write_bytes(broken.read_bytes()[:-40])
    links = tmp_path / "medsynth-series-abc123"  # what a batch converter links a series into
    links.mkdir()
    for number, file in enumerate(files):
        (links / f"{number:06d}.dcm").symlink_to(file)

    with pytest.raises(DataError) as error:
        read_volume(links)
    message = str(error.value)
    assert message.startswith(f"{broken}: slice of series") and "truncated" in message
    assert "medsynth-series" not in message

    with pytest.raises(DataError, match=rf"^{broken}: slice of series"):
        read_volume(tmp_path / "export" / "t1")  # the same without links
