"""Issue 31's items in the training loop: a tiny budget still leaves a whole run, a checkpoint on a
really full disk is "the disk is full", a precision asked at resume that the run cannot take is said."""

from __future__ import annotations

import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import TINY_OVERRIDES

from medsynth.cli import main
from medsynth.model.checkpoint import BEST, LATEST, load_checkpoint
from medsynth.model_card import ROUND_TRIP_NOTE, _best

REPO = Path(__file__).resolve().parents[1]


def _argv(cohort: Path, runs: Path, name: str, *extra: str) -> list[str]:
    argv = ["train", "t1->t2", "--data", str(cohort), "--config", "demo_cpu", "--runs-dir", str(runs),
            "--name", name, "--quiet"]  # fmt: skip
    for item in [*TINY_OVERRIDES, "train.steps_per_epoch=2", *extra]:
        argv += ["--set", item]
    return argv


def test_a_budget_smaller_than_one_step_still_leaves_a_whole_run(
    tiny_cohort: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``train.max_minutes=1e-9`` used to print "done ... -> checkpoint_best.pt" with no checkpoint at all."""
    assert main(_argv(tiny_cohort, tmp_path, "tiny", "train.max_minutes=1e-9")) == 0
    run = tmp_path / "tiny"
    for name in (LATEST, BEST, "metrics.csv", "model_card.md"):
        assert (run / name).is_file(), name
    latest = load_checkpoint(run / LATEST)
    assert latest["global_step"] == 1 and latest["finished"]  # one step, validated, recorded as partial
    out = capsys.readouterr().out
    assert f"-> {run / BEST}" in out
    assert main(["train", "--resume", str(run), "--quiet"]) == 0  # the budget is spent: nothing more
    assert load_checkpoint(run / LATEST)["global_step"] == 1


def test_a_round_trip_score_is_named_as_one_on_the_card() -> None:
    best = {"metric": "psnr", "value": 11.7, "epoch": 3, "validation": "round trip"}
    assert _best(best).endswith(ROUND_TRIP_NOTE) and "neither compares with a real target" in _best(best)
    assert "round trip" not in _best({**best, "validation": "target"})


def test_a_precision_asked_at_resume_that_the_run_cannot_take_is_said(
    tiny_cohort: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(_argv(tiny_cohort, tmp_path, "fp32")) == 0
    capsys.readouterr()
    code = main(["train", "--resume", str(tmp_path / "fp32"), "--quiet", "--set", "train.epochs=2",
                     "--set", "train.precision=bf16"])  # fmt: skip
    assert code == 0
    (line,) = [line for line in capsys.readouterr().err.splitlines() if "is not applied" in line]
    assert "train.precision=bf16" in line and "trains in fp32" in line


def _can_mount_tmpfs(where: Path) -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = f"mkdir -p {where} && mount -t tmpfs -o size=1m none {where}"
    return subprocess.run(["unshare", "-rm", "sh", "-c", probe], capture_output=True).returncode == 0


def test_a_checkpoint_larger_than_the_free_space_says_the_disk_is_full(tmp_path: Path) -> None:
    """torch's own writer reported it as "[enforce fail at inline_container.cc:672] ... unexpected pos"."""
    disk = tmp_path / "disk"
    if not _can_mount_tmpfs(disk):
        pytest.skip("cannot mount a tmpfs here (no unshare or no user namespaces)")
    program = textwrap.dedent(
        f"""
        import torch
        from medsynth.errors import MedsynthError
        from medsynth.model.checkpoint import save_checkpoint
        try:
            save_checkpoint({{"weights": torch.zeros(1_000_000)}}, "{disk}/checkpoint_latest.pt")
        except MedsynthError as exc:
            print(exc)
        """
    )
    script = (
        f"mount -t tmpfs -o size=1m none {disk} && cd {REPO} && {sys.executable} -c '{program}'; ls -a {disk}"
    )
    result = subprocess.run(
        ["unshare", "-rm", "sh", "-c", script], capture_output=True, text=True, timeout=120
    )
    assert "checkpoint not saved: the disk is full" in result.stdout, result.stdout + result.stderr
    assert ".partial" not in result.stdout  # nothing half-written is left
