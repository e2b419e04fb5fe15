"""Issue 26, exports: ``--out`` never replaces a run's files (3); model files are told apart by content (6)."""

from __future__ import annotations

import io
import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from medsynth.cli import main
from medsynth.io.readers import read_volume
from medsynth.model.checkpoint import model_file_kind
from medsynth.model.export import EXTRA_FILE, METADATA_KEY, is_exported, load_exported
from medsynth.model.safe_load import network_digest, onnx_network_digest, read_archive

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")


def _held_out_t1(run: Path, cohort: Path) -> Path:
    subject = json.loads((run / "splits.json").read_text())["test"][0]
    return cohort / subject / "anat" / f"{subject}_T1w.nii.gz"


@pytest.fixture
def run(tiny_run: Path, tmp_path: Path) -> Path:
    """A copy of the tiny run: tests that try to damage it must not damage the shared one."""
    return Path(shutil.copytree(tiny_run, tmp_path / "run"))


def _export(checkpoint: Path, fmt: str, out: Path, *extra: str) -> int:
    return main(["export", "--checkpoint", str(checkpoint), "--format", fmt, "--out", str(out), *extra])


def _one_error(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "\n" not in err and "Traceback" not in err, err
    return err


# ------------------------------------------------------------------------ 3: export --out
@pytest.mark.parametrize(
    "name", ["checkpoint_latest.pt", "config.yaml", "metrics.csv", "splits.json", "samples/epoch_001.png"]
)
@pytest.mark.parametrize("overwrite", [False, True])
def test_export_never_replaces_a_file_of_a_run_folder(
    run: Path, name: str, overwrite: bool, capsys: pytest.CaptureFixture[str]
) -> None:
    target = run / name
    before = target.read_bytes()
    code = _export(run, "torchscript", target, *(["--overwrite"] if overwrite else []))
    assert code == 2
    assert "--out" in _one_error(capsys)
    assert target.read_bytes() == before


def test_export_replaces_its_own_earlier_export_and_nothing_else_unasked(
    run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    inside = run / "model_ts.pt"  # a new file in a run folder is fine, and so is exporting it again
    assert _export(run, "torchscript", inside) == 0
    assert _export(run, "torchscript", inside) == 0
    capsys.readouterr()

    # An export of the other kind, or a file export did not write: only with --overwrite.
    assert _export(run, "onnx", inside) == 2
    assert "a torchscript export, not onnx" in _one_error(capsys)
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes")
    assert _export(run, "torchscript", notes) == 2
    assert "--overwrite" in _one_error(capsys) and notes.read_text() == "my notes"
    assert _export(run, "torchscript", notes, "--overwrite") == 0
    assert model_file_kind(notes) == "torchscript"
    # A checkpoint is never an export's to replace, inside a run folder or not.
    copy = tmp_path / "copy_of_best.pt"
    shutil.copy(run / "checkpoint_best.pt", copy)
    assert _export(run, "onnx", copy, "--overwrite") == 2
    assert "model checkpoint" in _one_error(capsys)


# --------------------------------------------------------------- 6: content, not endings
def test_an_onnx_export_named_pt_runs_and_is_named_as_an_export(
    run: Path, tiny_cohort: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    odd = tmp_path / "x.pt"
    assert _export(run, "onnx", odd) == 0
    assert model_file_kind(odd) == "onnx" and is_exported(odd)
    out = tmp_path / "syn.nii.gz"
    volume = _held_out_t1(run, tiny_cohort)
    assert (
        main(["infer", "--volume", str(volume), "--checkpoint", str(odd), "--out", str(out), "--quiet"]) == 0
    )
    reference = tmp_path / "ref.nii.gz"
    assert (
        main(["infer", "--volume", str(volume), "--checkpoint", str(run), "--out", str(reference), "--quiet"])
        == 0
    )
    np.testing.assert_allclose(read_volume(out).array, read_volume(reference).array, atol=1e-3, rtol=1e-5)
    capsys.readouterr()

    # An export given where a checkpoint is needed is called what it is, not "tampered with".
    assert _export(odd, "torchscript", tmp_path / "again.pt") == 2
    err = _one_error(capsys)
    assert "an ONNX export" in err and "tampered" not in err


def _forged_torchscript(
    source: Path, path: Path, metadata: object, module: torch.nn.Module | None = None
) -> Path:
    extra = {EXTRA_FILE: ""}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        loaded = torch.jit.load(str(source), _extra_files=extra)
        text = metadata(json.loads(extra[EXTRA_FILE])) if callable(metadata) else json.dumps(metadata)
        torch.jit.save(module if module is not None else loaded, str(path), _extra_files={EXTRA_FILE: text})
    return path


def _with(key: str, value: object):
    return lambda meta: json.dumps({**meta, key: value})


@pytest.mark.parametrize(
    ("forge", "message"),
    [
        (_with("version", "one"), "version"),
        (_with("version", 1.5), "version"),
        ([1, 2, 3], "JSON list"),
        ("just text", "JSON str"),
        (_with("input_shape", "wide"), "input_shape"),
        (_with("input_shape", [1, 8, 8]), "contradicts the plan"),
        (_with("plan", [1]), "incomplete"),
        (_with("fingerprint", None), "incomplete"),
        (_with("splits", ["a"]), "splits"),
    ],
)
def test_forged_export_metadata_is_one_line(
    run: Path,
    tiny_cohort: Path,
    tmp_path: Path,
    forge: object,
    message: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    exported = tmp_path / "model_ts.pt"
    assert _export(run, "torchscript", exported) == 0
    forged = _forged_torchscript(exported, tmp_path / "forged.pt", forge)
    capsys.readouterr()
    argv = ["infer", "--volume", str(_held_out_t1(run, tiny_cohort)), "--checkpoint", str(forged)]
    assert main([*argv, "--out", str(tmp_path / "syn.nii.gz"), "--quiet"]) == 2
    assert message in _one_error(capsys)
    assert not (tmp_path / "syn.nii.gz").exists()


def _torchscript_digest(module: torch.jit.ScriptModule) -> str:
    buffer = io.BytesIO()
    torch.jit.save(module, buffer)
    return network_digest(read_archive(buffer.getvalue(), "TorchScript", "<memory>"))


class _Foreign(torch.nn.Module):
    """Not the generator: three output channels instead of the plan's one."""

    def __init__(self, in_channels: int) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(in_channels, 3, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


# The test forges its foreign files with torch.jit and the legacy ONNX exporter, both deprecated.
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.parametrize("fmt", ["torchscript", "onnx"])
def test_a_foreign_network_with_a_copied_plan_is_refused(
    fmt: str, run: Path, tiny_cohort: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    exported = tmp_path / "model_ts.pt"
    assert _export(run, "torchscript", exported) == 0
    extra = {EXTRA_FILE: ""}
    torch.jit.load(str(exported), _extra_files=extra)
    meta = json.loads(extra[EXTRA_FILE])
    shape = tuple(meta["input_shape"])
    example = torch.zeros((1, *shape))
    foreign = _Foreign(shape[0]).eval()
    # A forger who binds the copied metadata to the foreign graph (the digest is no signature): the
    # probe still refuses the network by what it answers.
    if fmt == "torchscript":
        path = tmp_path / "foreign.pt"
        traced = torch.jit.trace(foreign, example)
        meta["graph_sha256"] = _torchscript_digest(traced)
        torch.jit.save(traced, str(path), _extra_files={EXTRA_FILE: json.dumps(meta)})
    else:
        path = tmp_path / "foreign.onnx"
        torch.onnx.export(foreign, (example,), str(path), input_names=["input"], output_names=["output"],
                          dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}}, dynamo=False)  # fmt: skip
        proto = onnx.load(str(path))
        meta["graph_sha256"] = onnx_network_digest(proto)
        entry = proto.metadata_props.add()
        entry.key, entry.value = METADATA_KEY, json.dumps(meta)
        onnx.save(proto, str(path))
    with pytest.raises(Exception, match="output has shape"):
        load_exported(path)
    capsys.readouterr()
    argv = ["infer", "--volume", str(_held_out_t1(run, tiny_cohort)), "--checkpoint", str(path)]
    assert main([*argv, "--out", str(tmp_path / "syn.nii.gz"), "--quiet"]) == 2
    err = _one_error(capsys)
    assert "not the one the plan describes" in err and f"[1, 3, {shape[1]}, {shape[2]}]" in err
