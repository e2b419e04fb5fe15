"""Third fault battery (issue 31): what the command line says, items 4, 7, 14 and the torchrun part of 16.

Each case is refused in one line before anything is built, or ends quietly; through ``main`` where the user
meets it (a subprocess only where the behaviour is the process's own: a closed stdout).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import TINY_OVERRIDES

from medsynth.cli import SIGPIPE_EXIT, main

ROOT = Path(__file__).resolve().parents[1]


def _error_line(stderr: str) -> str:
    lines = [line for line in stderr.strip().splitlines() if line]
    assert len(lines) == 1 and lines[0].startswith("error:") and "Traceback" not in stderr, stderr
    return lines[0]


# ------------------------------------------------------------------ item 7: a reader that leaves early
@pytest.mark.parametrize("argv", [["info", "--json"], ["info"]], ids=["json", "screen"])
def test_a_closed_stdout_ends_the_command_quietly(argv: list[str]) -> None:
    """``medsynth info --json | head -c 10``: head has gone before medsynth writes (the read end is closed)."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        done = subprocess.run(
            [sys.executable, "-m", "medsynth", *argv], stdout=write_end, stderr=subprocess.PIPE, timeout=120
        )
    finally:
        os.close(write_end)
    assert done.stderr.decode() == "" and done.returncode == SIGPIPE_EXIT


# ------------------------------------------------------------- item 4: a task the objective cannot train
def _train(cohort: Path, runs: Path, *argv: str, sets: tuple[str, ...] = ()) -> int:
    args = ["train", *argv, "--data", str(cohort), "--runs-dir", str(runs), "--name", "r"]
    for item in [*TINY_OVERRIDES, *sets]:
        args += ["--set", item]
    return main(args)


@pytest.mark.parametrize(
    ("task", "sets"),
    [
        (["unified", "--modalities", "t1,t2,pd"], ()),
        (["unified", "--modalities", "t1,t2,pd"], ("data.pairing=paired",)),
        (["t1,pd->t2"], ("data.pairing=paired",)),
    ],
    ids=["unified-unpaired", "unified-paired", "many-to-one-paired"],
)
def test_cyclegan_refuses_a_task_that_is_not_one_to_one_before_anything_is_built(
    tiny_cohort: Path, tmp_path: Path, capsys, task: list[str], sets: tuple[str, ...]
) -> None:
    """``medsynth train unified --modalities t1,t2,pd --config demo_cyclegan`` was an IndexError."""
    assert _train(tiny_cohort, tmp_path, *task, "--config", "demo_cyclegan", sets=sets) == 2
    line = _error_line(capsys.readouterr().err)
    assert "cyclegan" in line and "one source" in line, line
    assert not (tmp_path / "r").exists()  # no run folder, no cache: refused before anything is built


# ----------------------------------------------------- item 14: objective settings nobody reads
@pytest.mark.parametrize(
    ("objective", "valid"),
    [("gan", "train.lambda_l1, train.adversarial_weight"), ("l1", "train.lambda_l1")],
)
def test_unknown_objective_args_are_refused_naming_the_valid_keys(
    tiny_cohort: Path, tmp_path: Path, capsys, objective: str, valid: str
) -> None:
    sets = (f"train.objective={objective}", "train.objective_args={lambda_ll: 5}")
    assert _train(tiny_cohort, tmp_path, "t1->t2", "--config", "demo_cpu", sets=sets) == 2
    line = _error_line(capsys.readouterr().err)
    assert f"unknown train.objective_args key 'lambda_ll' for {objective}" in line, line
    assert "valid: none" in line and valid in line, line
    assert not (tmp_path / "r").exists()


# ------------------------------------------------------------------- item 16: what torchrun adds
def test_cluster_docs_say_what_torchrun_prints_after_medsynths_line() -> None:
    """torchrun reports a failed worker with its own traceback (ChildFailedError) whatever the worker's exit
    status; the documentation must tell users the cause is the ``error:`` line above it."""
    text = " ".join((ROOT / "docs" / "cluster.md").read_text(encoding="utf-8").split())
    for said in ("ChildFailedError", "Root Cause", "exitcode : 2", "the `error:` line above"):
        assert said in text, said
