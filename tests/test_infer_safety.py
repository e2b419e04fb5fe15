"""``medsynth infer`` never writes over its inputs, never feeds its outputs back in, and reports every
volume of a batch (issue 16), with one model load and the same voxels as one-by-one runs (issue 10)."""

from __future__ import annotations

import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medsynth.cli import main
from medsynth.io.dicom import write_dicom_series
from medsynth.io.readers import read_volume
from medsynth.model.synthesis import SynthesisModel


def _t1(cohort: Path, subject: str = "sub-05") -> Path:
    return cohort / subject / "anat" / f"{subject}_T1w.nii.gz"


def _infer(*arguments: str) -> int:
    return main(["infer", *arguments, "--quiet"])


def _one_error_line(err: str, *needles: str) -> None:
    lines = [line for line in err.strip().splitlines() if line]
    assert len(lines) == 1 and lines[0].startswith("error:"), err
    for needle in needles:
        assert needle in lines[0], err


@pytest.fixture
def inputs(tiny_cohort: Path, tmp_path: Path) -> Path:
    folder = tmp_path / "in"
    folder.mkdir()
    for subject in ("sub-04", "sub-05"):
        (folder / f"{subject}.nii.gz").write_bytes(_t1(tiny_cohort, subject).read_bytes())
    return folder


@pytest.mark.parametrize("spelling", ["same", "dotted", "symlink", "hardlink"])
def test_out_that_is_the_input_is_refused(
    spelling: str, tiny_run: Path, inputs: Path, tmp_path: Path, capsys
) -> None:
    source = inputs / "sub-05.nii.gz"
    before = source.read_bytes()
    out = {"same": source, "dotted": inputs / ".." / "in" / "." / "sub-05.nii.gz"}.get(spelling)
    if spelling == "symlink":
        out = tmp_path / "link.nii.gz"
        out.symlink_to(source)
    elif spelling == "hardlink":
        out = tmp_path / "hard.nii.gz"
        os.link(source, out)
    assert _infer("--volume", str(source), "--checkpoint", str(tiny_run), "--out", str(out)) == 2
    _one_error_line(capsys.readouterr().err, "symbolic link" if spelling == "symlink" else "never writes")
    assert source.read_bytes() == before
    assert not (inputs / "sub-05.json").exists()


def test_symlink_at_out_is_not_followed(tiny_run: Path, inputs: Path, tmp_path: Path, capsys) -> None:
    """A link at --out to some other (non-input) file is refused too: its target stays as it is."""
    other = tmp_path / "precious.nii.gz"
    other.write_bytes(b"keep me")
    link = tmp_path / "syn.nii.gz"
    link.symlink_to(other)
    assert (
        _infer("--volume", str(inputs / "sub-05.nii.gz"), "--checkpoint", str(tiny_run), "--out", str(link))
        == 2
    )
    _one_error_line(capsys.readouterr().err, "symbolic link")
    assert other.read_bytes() == b"keep me" and link.is_symlink()


def test_out_inside_a_dicom_input_folder_is_refused(
    tiny_run: Path, tiny_cohort: Path, tmp_path: Path, capsys
) -> None:
    series = tmp_path / "dicom_t1"
    write_dicom_series(read_volume(_t1(tiny_cohort)), series, series_description="T1w test")
    files = sorted(p.name for p in series.iterdir())
    for out in (series / files[0], series / "syn.nii.gz"):
        assert _infer("--volume", f"t1={series}", "--checkpoint", str(tiny_run), "--out", str(out)) == 2
        _one_error_line(capsys.readouterr().err, str(series))
    assert sorted(p.name for p in series.iterdir()) == files


def test_inputs_into_their_own_folder_twice_skips_outputs(tiny_run: Path, inputs: Path, capsys) -> None:
    arguments = ["--inputs", str(inputs), "--checkpoint", str(tiny_run), "--out", str(inputs)]
    assert _infer(*arguments) == 0
    first = sorted(p.name for p in inputs.iterdir())
    assert first == ["sub-04.nii.gz", "sub-04_t2.json", "sub-04_t2.nii.gz", "sub-05.nii.gz",
                     "sub-05_t2.json", "sub-05_t2.nii.gz"]  # fmt: skip
    capsys.readouterr()
    assert _infer(*arguments) == 0
    assert sorted(p.name for p in inputs.iterdir()) == first  # no sub-04_t2_t2.nii.gz
    warnings = [line for line in capsys.readouterr().err.splitlines() if "skipping" in line]
    assert len(warnings) == 1 and "2 earlier medsynth output" in warnings[0], warnings


def test_outputs_with_a_sidecar_are_skipped_anywhere(
    tiny_run: Path, inputs: Path, tmp_path: Path, capsys
) -> None:
    """An output copied into another input folder is still recognised (by its sidecar)."""
    out = tmp_path / "out"
    assert _infer("--inputs", str(inputs), "--checkpoint", str(tiny_run), "--out", str(out)) == 0
    for name in ("sub-04_t2.nii.gz", "sub-04_t2.json"):
        (inputs / name).write_bytes((out / name).read_bytes())
    again = tmp_path / "again"
    assert _infer("--inputs", str(inputs), "--checkpoint", str(tiny_run), "--out", str(again)) == 0
    assert sorted(p.name for p in again.glob("*.nii.gz")) == ["sub-04_t2.nii.gz", "sub-05_t2.nii.gz"]
    assert "skipping 1 earlier medsynth output" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["x.png", "x.json", "x.mhd"])
def test_out_with_a_non_volume_ending_is_refused(
    name: str, tiny_run: Path, inputs: Path, tmp_path: Path, capsys
) -> None:
    out = tmp_path / name
    assert (
        _infer("--volume", str(inputs / "sub-05.nii.gz"), "--checkpoint", str(tiny_run), "--out", str(out))
        == 2
    )
    _one_error_line(capsys.readouterr().err, ".nii.gz", ".mha")
    assert not out.exists()


def test_out_folder_names_with_dots_still_work(tiny_run: Path, inputs: Path, tmp_path: Path) -> None:
    out = tmp_path / "results_2024.05"
    assert _infer("--inputs", str(inputs), "--checkpoint", str(tiny_run), "--out", str(out)) == 0
    assert sorted(p.name for p in out.glob("*.nii.gz")) == ["sub-04_t2.nii.gz", "sub-05_t2.nii.gz"]


def test_inputs_with_a_volume_file_as_out_is_refused(
    tiny_run: Path, inputs: Path, tmp_path: Path, capsys
) -> None:
    out = tmp_path / "all.nii.gz"
    assert _infer("--inputs", str(inputs), "--checkpoint", str(tiny_run), "--out", str(out)) == 2
    _one_error_line(capsys.readouterr().err, "must be a folder")
    assert not out.exists()


def test_a_bad_volume_does_not_stop_the_batch(tiny_run: Path, inputs: Path, tmp_path: Path, capsys) -> None:
    data = np.ones((20, 20, 20), np.float32)
    data[3, 3, 3] = np.nan
    nib.save(nib.Nifti1Image(data, np.eye(4)), inputs / "a_nan.nii.gz")
    (inputs / "b_truncated.nii.gz").write_bytes((inputs / "sub-04.nii.gz").read_bytes()[:300])
    out = tmp_path / "out"
    assert _infer("--inputs", str(inputs), "--checkpoint", str(tiny_run), "--out", str(out)) == 1
    assert sorted(p.name for p in out.glob("*.nii.gz")) == ["sub-04_t2.nii.gz", "sub-05_t2.nii.gz"]
    err = [line for line in capsys.readouterr().err.splitlines() if line]
    errors = [line for line in err if line.startswith("error:")]
    assert len(errors) == 2 and "a_nan.nii.gz" in errors[0] and "b_truncated.nii.gz" in errors[1], err
    assert err[-1] == f"2 of 4 volumes written to {out}; failed: a_nan.nii.gz, b_truncated.nii.gz"
    assert not [p for p in out.iterdir() if ".partial" in p.name]


def test_two_inputs_with_one_output_name_are_refused(
    tiny_run: Path, inputs: Path, tmp_path: Path, capsys
) -> None:
    list_file = tmp_path / "list.txt"
    other = tmp_path / "elsewhere"
    other.mkdir()
    (other / "sub-05.nii.gz").write_bytes((inputs / "sub-05.nii.gz").read_bytes())
    list_file.write_text(f"{inputs / 'sub-05.nii.gz'}\n{other / 'sub-05.nii.gz'}\n")
    out = tmp_path / "out"
    assert _infer("--inputs", str(list_file), "--checkpoint", str(tiny_run), "--out", str(out)) == 2
    _one_error_line(capsys.readouterr().err, "would both be written")
    assert not out.exists()


def test_batch_loads_once_and_matches_single_runs_bit_for_bit(
    tiny_run: Path, inputs: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    loads: list[object] = []
    load = SynthesisModel.from_checkpoint.__func__  # type: ignore[attr-defined]

    def counting(cls, *args, **kwargs):
        loads.append(args)
        return load(cls, *args, **kwargs)

    monkeypatch.setattr(SynthesisModel, "from_checkpoint", classmethod(counting))
    (inputs / "sub-03.nii.gz").write_bytes((inputs / "sub-04.nii.gz").read_bytes())
    batch = tmp_path / "batch"
    # One precision for both calls: "auto" measures the network, and a loaded machine may tip that choice.
    fixed = ("--precision", "fp32")
    assert _infer("--inputs", str(inputs), "--checkpoint", str(tiny_run), "--out", str(batch), *fixed) == 0
    assert len(loads) == 1
    for source in sorted(inputs.glob("*.nii.gz")):
        single = tmp_path / "single" / f"{source.name[:-7]}.nii.gz"
        assert (
            _infer("--volume", str(source), "--checkpoint", str(tiny_run), "--out", str(single), *fixed) == 0
        )
        got = np.asarray(nib.load(batch / f"{source.name[:-7]}_t2.nii.gz").dataobj)
        np.testing.assert_array_equal(got, np.asarray(nib.load(single).dataobj))


def test_uncertainty_map_never_lands_on_an_input_nor_is_read_back(
    tiny_run: Path, tiny_cohort: Path, tmp_path: Path
) -> None:
    """The ``<stem>_uncertainty`` map is an output like the volume: checked against the inputs, and
    ``--inputs D --out D`` run again does not synthesise from it."""
    source = _t1(tiny_cohort)
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "x_uncertainty.nii.gz").write_bytes(source.read_bytes())
    code = main(["infer", "--volume", str(folder / "x_uncertainty.nii.gz"), "--checkpoint", str(tiny_run),
                 "--out", str(folder / "x.nii.gz"), "--uncertainty", "--quiet"])  # fmt: skip
    assert code == 2
    (folder / "x_uncertainty.nii.gz").rename(folder / "a.nii.gz")
    common = [
        "infer",
        "--inputs",
        str(folder),
        "--checkpoint",
        str(tiny_run),
        "--out",
        str(folder),
        "--uncertainty",
        "--quiet",
    ]
    assert main(common) == 0 and (folder / "a_t2_uncertainty.nii.gz").is_file()
    assert main(common) == 0
    assert not list(folder.glob("*_uncertainty_*")) and not list(folder.glob("*_t2_t2*"))
