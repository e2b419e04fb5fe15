"""``medsynth export``: ONNX, pt2 and TorchScript reproduce the PyTorch generator on a whole held-out volume."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from medsynth.cli import EXPORT_FORMATS, main
from medsynth.io.readers import read_volume
from medsynth.model.export import FORMATS, is_exported, load_exported
from medsynth.model.synthesis import SynthesisModel


def _held_out_t1(tiny_run: Path, tiny_cohort: Path) -> Path:
    subject = json.loads((tiny_run / "splits.json").read_text())["test"][0]
    return tiny_cohort / subject / "anat" / f"{subject}_T1w.nii.gz"


def test_cli_choices_match_the_formats() -> None:
    assert EXPORT_FORMATS == FORMATS


@pytest.mark.parametrize(
    ("fmt", "name"), [("onnx", "model.onnx"), ("pt2", "model.pt2"), ("torchscript", "model_ts.pt")]
)
def test_export_reproduces_the_checkpoint(
    fmt: str, name: str, tiny_run: Path, tiny_cohort: Path, tmp_path: Path
) -> None:
    if fmt == "onnx":
        pytest.importorskip("onnx")
        pytest.importorskip("onnxruntime")
    path = tmp_path / name
    assert main(["export", "--checkpoint", str(tiny_run), "--format", fmt, "--out", str(path)]) == 0
    assert is_exported(path) and not is_exported(tiny_run / "checkpoint_best.pt")
    reference = SynthesisModel.from_checkpoint(tiny_run)
    exported = load_exported(path)
    assert exported.plan.task == reference.plan.task
    assert exported.fingerprint.digest() == reference.fingerprint.digest()
    inputs = {"t1": read_volume(_held_out_t1(tiny_run, tiny_cohort))}
    want, got = reference.predict(inputs), exported.predict(inputs)
    assert np.abs(got.normalised - want.normalised).max() <= 1e-4
    assert (
        want.normalised[want.mask] > -1
    ).mean() > 0.5  # the network ran over the head, not a background fill

    out = tmp_path / "syn.nii.gz"
    argv = ["infer", "--volume", str(_held_out_t1(tiny_run, tiny_cohort)), "--checkpoint", str(path)]
    assert main([*argv, "--out", str(out), "--quiet", "--strict"]) == 0
    np.testing.assert_allclose(read_volume(out).array, want.volume.array, atol=1e-3, rtol=1e-5)
    assert json.loads((tmp_path / "syn.json").read_text())["ood"]["status"] == "ok"


def test_a_file_without_the_plan_is_refused(tmp_path: Path, capsys) -> None:
    import warnings

    import torch

    path = tmp_path / "plain.pt"
    with warnings.catch_warnings():  # torch.jit is deprecated; this test only needs a foreign archive
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.save(torch.jit.trace(torch.nn.Conv2d(1, 1, 1), torch.zeros(1, 1, 4, 4)), str(path))
    code = main(
        ["infer", "--volume", str(path), "--checkpoint", str(path), "--out", str(tmp_path / "x.nii.gz")]
    )
    assert code == 2 and "not a medsynth export" in capsys.readouterr().err


def test_export_refuses_to_write_over_its_checkpoint(tiny_run: Path, tmp_path: Path, capsys) -> None:
    copy = tmp_path / "checkpoint_best.pt"
    copy.write_bytes((tiny_run / "checkpoint_best.pt").read_bytes())
    before = copy.read_bytes()
    code = main(["export", "--checkpoint", str(copy), "--format", "torchscript", "--out", str(copy)])
    assert code == 2 and "checkpoint being exported" in capsys.readouterr().err
    assert copy.read_bytes() == before
