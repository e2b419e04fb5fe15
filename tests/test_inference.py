"""``medsynth infer``: geometry-exact outputs, sidecars, batch inputs and one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medsynth.cli import main
from medsynth.io.dicom import write_dicom_series
from medsynth.io.readers import read_volume
from medsynth.io.volume import Volume, to_canonical
from medsynth.model.synthesis import SynthesisModel


def _t1(cohort: Path, subject: str = "sub-05") -> Path:
    return cohort / subject / "anat" / f"{subject}_T1w.nii.gz"


def _oblique_odd_copy(source: Path, out: Path) -> Path:
    """The T1w cropped to odd sizes, stored LPI-ish with an oblique (rotated) affine and sform code 2."""
    image = nib.load(source)
    data = np.asarray(image.dataobj)[1:32, 2:37, 1:30][::-1, :, ::-1]  # 31 x 35 x 29, axes flipped
    angle = np.deg2rad(12.0)
    rotation = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    affine = np.eye(4)
    affine[:3, :3] = rotation @ np.diag([-6.0, 6.0, -6.0])
    affine[:3, 3] = [90.0, -120.0, 70.0]
    oblique = nib.Nifti1Image(data.astype(np.int16), affine)
    oblique.set_sform(affine, code=2)
    oblique.set_qform(affine, code=1)
    nib.save(oblique, out)
    return out


def _header_matches(output: Path, reference: Path) -> None:
    got, want = nib.load(output), nib.load(reference)
    assert got.shape == want.shape
    np.testing.assert_allclose(got.affine, want.affine, atol=1e-5)
    assert int(got.header["sform_code"]) == int(want.header["sform_code"])
    assert int(got.header["qform_code"]) == int(want.header["qform_code"])
    np.testing.assert_allclose(got.header.get_zooms(), want.header.get_zooms(), atol=1e-6)
    assert got.get_data_dtype() == np.float32


def test_oblique_odd_nifti_round_trips_the_header(tiny_run: Path, tiny_cohort: Path, tmp_path: Path) -> None:
    source = _oblique_odd_copy(_t1(tiny_cohort), tmp_path / "oblique.nii.gz")
    before = source.read_bytes()
    out = tmp_path / "out" / "syn.nii.gz"
    assert (
        main(["infer", "--volume", str(source), "--checkpoint", str(tiny_run), "--out", str(out), "--quiet"])
        == 0
    )
    _header_matches(out, source)
    assert source.read_bytes() == before  # the input is never written
    sidecar = json.loads((tmp_path / "out" / "syn.json").read_text())
    assert sidecar["target"] == "t2" and len(sidecar["checkpoint"]["sha256"]) == 64 and sidecar["seconds"] > 0


def test_reorientation_does_not_change_the_prediction(
    tiny_run: Path, tiny_cohort: Path, tmp_path: Path
) -> None:
    """The same anatomy stored in another axis order gives the same synthetic voxels, mapped back exactly."""
    predictor = SynthesisModel.from_checkpoint(tiny_run)
    ras = read_volume(_t1(tiny_cohort))
    flipped = Volume(ras.array[::-1, :, ::-1].copy(), ras.affine @ _flip_affine(ras.shape), ras.meta)
    assert flipped.orientation == "LAI"
    a = predictor.predict({"t1": ras}).volume.array
    b = predictor.predict({"t1": flipped}).volume.array
    np.testing.assert_allclose(b[::-1, :, ::-1], a, atol=1e-5)
    assert to_canonical(flipped)[0].orientation == "RAS"


def _flip_affine(shape: tuple[int, int, int]) -> np.ndarray:
    flip = np.diag([-1.0, 1.0, -1.0, 1.0])
    flip[0, 3], flip[2, 3] = shape[0] - 1, shape[2] - 1
    return flip


def test_dicom_series_input_lands_on_its_grid(tiny_run: Path, tiny_cohort: Path, tmp_path: Path) -> None:
    series = tmp_path / "dicom_t1"
    write_dicom_series(read_volume(_t1(tiny_cohort)), series, series_description="T1w test")
    reference = read_volume(series)
    assert reference.meta["format"] == "dicom"
    out = tmp_path / "syn.mha"
    assert (
        main(
            ["infer", "--volume", f"t1={series}", "--checkpoint", str(tiny_run), "--out", str(out), "--quiet"]
        )
        == 0
    )
    result = read_volume(out)
    assert result.shape == reference.shape
    np.testing.assert_allclose(result.affine, reference.affine, atol=1e-4)
    assert np.isfinite(result.array).all()


def test_batch_folder_reuses_the_model(tiny_run: Path, tiny_cohort: Path, tmp_path: Path) -> None:
    folder = tmp_path / "inputs"
    folder.mkdir()
    for subject in ("sub-04", "sub-05"):
        (folder / f"{subject}.nii.gz").write_bytes(_t1(tiny_cohort, subject).read_bytes())
    out = tmp_path / "outs"
    assert (
        main(["infer", "--inputs", str(folder), "--checkpoint", str(tiny_run), "--out", str(out), "--quiet"])
        == 0
    )
    assert sorted(p.name for p in out.glob("*.nii.gz")) == ["sub-04_t2.nii.gz", "sub-05_t2.nii.gz"]


def _write(path: Path, data: np.ndarray) -> Path:
    nib.save(nib.Nifti1Image(data, np.diag([6.0, 6.0, 6.0, 1.0])), path)
    return path


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("not_checkpoint", "not a readable checkpoint"),
        ("nan", "NaN"),
        ("four_d", "4D"),
        ("unknown_modality", "unknown modality 't7'"),
        ("wrong_modality", "does not use"),
        ("output_under_file", "cannot create output folder"),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(
    case: str, message: str, tiny_run: Path, tiny_cohort: Path, tmp_path: Path, capsys
) -> None:
    checkpoint, volume, out = str(tiny_run), [str(_t1(tiny_cohort))], tmp_path / "out" / "syn.nii.gz"
    if case == "not_checkpoint":
        fake = tmp_path / "fake.pt"
        fake.write_text("hello")
        checkpoint = str(fake)
    elif case == "nan":
        data = np.ones((20, 20, 20), np.float32)
        data[3, 3, 3] = np.nan
        volume = [str(_write(tmp_path / "nan.nii.gz", data))]
    elif case == "four_d":
        volume = [str(_write(tmp_path / "4d.nii.gz", np.ones((20, 20, 20, 3), np.float32)))]
    elif case == "unknown_modality":
        volume = [f"t7={volume[0]}"]
    elif case == "wrong_modality":
        volume = [f"flair={volume[0]}"]
    elif case == "output_under_file":
        blocker = tmp_path / "out"
        blocker.write_text("a file, not a folder")
        out = blocker / "sub" / "syn.nii.gz"
    args = ["infer", "--checkpoint", checkpoint, "--out", str(out), "--quiet"]
    for item in volume:
        args += ["--volume", item]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "\n" not in err and message in err, err
    if case != "output_under_file":
        assert not out.parent.exists() or not any(out.parent.iterdir())
