"""Checkpoints: atomic, self-describing, and never unpickle code."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from medsynth.errors import CheckpointError
from medsynth.model.checkpoint import load_checkpoint, save_checkpoint
from medsynth.model.synthesis import SynthesisModel


class _Exploit:
    """Unpickling this would run a shell command that creates a marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_round_trip_keeps_tensors_and_stamps_version(tmp_path: Path) -> None:
    weights = {"w": torch.arange(6.0).reshape(2, 3)}
    path = save_checkpoint(
        {"generator_state": weights, "epoch": 3, "task": {"sources": ["t1"]}}, tmp_path / "c.pt"
    )
    loaded = load_checkpoint(path)
    assert torch.equal(loaded["generator_state"]["w"], weights["w"])
    assert loaded["epoch"] == 3 and loaded["format"] == "medsynth-checkpoint" and loaded["medsynth_version"]
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]  # no temporary file left behind


def test_tampered_pickle_is_refused_and_does_not_execute(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"format": "medsynth-checkpoint", "payload": _Exploit(marker)}, path)
    with pytest.raises(CheckpointError, match="refused to load"):
        load_checkpoint(path)
    assert not marker.exists()


def test_foreign_truncated_and_missing_files(tmp_path: Path) -> None:
    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": {}}, foreign)
    with pytest.raises(CheckpointError, match="not a medsynth checkpoint"):
        load_checkpoint(foreign)
    good = save_checkpoint({"epoch": 1}, tmp_path / "good.pt")
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        load_checkpoint(truncated)
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        load_checkpoint(tmp_path / "absent.pt")


def test_predictor_rebuilds_from_checkpoint_alone(tiny_run: Path) -> None:
    state = load_checkpoint(tiny_run / "checkpoint_best.pt")
    assert {"plan", "generator_state", "fingerprint", "objective", "data", "medsynth_version"} <= set(state)
    assert "optimizer_generator" not in state  # inference checkpoints carry no optimiser state
    latest = load_checkpoint(tiny_run / "checkpoint_latest.pt")
    assert {"optimizer_generator", "objective_state", "elapsed_seconds", "rng", "step_in_epoch"} <= set(
        latest
    )
    predictor = SynthesisModel.from_checkpoint(tiny_run)
    assert predictor.sources == ("t1",) and predictor.target == "t2"
    assert len(predictor.digest or "") == 64
