"""Issue 26, training side: time budgets (2), the run-folder lock (4) and a full disk (5).

Real runs, real processes: a second ``medsynth train`` started while the first one trains, a torchrun job
into a folder in use, a writer killed with SIGKILL, and a real full file system (a small tmpfs mounted in
a private mount namespace with ``unshare``; skipped where the machine does not allow it).
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from conftest import TINY_OVERRIDES

from medsynth.cli import main
from medsynth.engine.handlers.metrics import append_metrics as _append_metrics
from medsynth.engine.lock import LOCK_NAME
from medsynth.errors import MedsynthError
from medsynth.model.checkpoint import LATEST, load_checkpoint

REPO = Path(__file__).resolve().parents[1]


def _argv(cohort: Path, runs: Path, name: str, *extra: str, quiet: bool = True) -> list[str]:
    argv = ["train", "t1->t2", "--data", str(cohort), "--config", "demo_cpu", "--device", "cpu",
            "--runs-dir", str(runs), "--name", name] + (["--quiet"] if quiet else [])  # fmt: skip
    for item in [*TINY_OVERRIDES, *extra]:
        argv += ["--set", item]
    return argv


def _rows(run: Path) -> list[dict[str, str]]:
    with open(run / "metrics.csv", newline="") as stream:
        return list(csv.DictReader(stream))


def _errors(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("error:")]


def _wait_for(predicate, process: subprocess.Popen | None = None, timeout: float = 120.0) -> None:
    deadline = time.time() + timeout
    while not predicate():
        if process is not None and process.poll() is not None:
            raise AssertionError(f"process ended early ({process.returncode}): {process.stderr.read()}")
        assert time.time() < deadline, "timed out"
        time.sleep(0.02)


def _lock_pid(run: Path) -> int | None:
    try:
        return json.loads((run / LOCK_NAME).read_text() or "{}").get("pid")
    except (OSError, ValueError):
        return None


# ------------------------------------------------------------------------------ 2: budgets
#: One epoch of single-slice batches (tens of steps) and a budget of a fraction of a second: the
#: budget ends the run inside its first epoch. decay_epochs=0: the schedule is constant to the end.
NO_DECAY = ["train.batch_size=1", "train.epochs=1", "train.decay_epochs=0", "train.max_minutes=0.001"]


def test_budget_without_decay_stops_mid_epoch_says_so_and_resume_completes_the_epoch(
    tiny_cohort: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "nodecay"
    assert main(_argv(tiny_cohort, tmp_path, "nodecay", *NO_DECAY, quiet=False)) == 0  # was ZeroDivisionError
    out = capsys.readouterr().out
    state = load_checkpoint(run / LATEST)
    steps = state["step_in_epoch"]
    assert state["finished"] and state["epoch"] == 0 and steps > 0  # a partial epoch is not a whole one
    assert state["global_step"] == steps
    (row,) = _rows(run)
    total = int(row["partial"].split("/")[1])
    assert row["epoch"] == "1" and row["partial"] == f"{steps}/{total}" and steps < total and row["val_psnr"]
    assert f"after 0 whole epochs and {steps} of {total} steps of epoch 1" in out
    card = json.loads((run / "model_card.json").read_text())["training"]
    assert card["epochs"] == 0 and card["partial_epoch"] == f"{steps}/{total} steps of epoch 1"
    assert f"0 epochs and {steps}/{total} steps of epoch 1" in (run / "model_card.md").read_text()

    # The budget is spent: a resume trains nothing, validates nothing, writes nothing.
    before = {
        p.name: p.read_bytes() for p in run.iterdir() if p.is_file() and not p.name.startswith("model_card")
    }
    assert main(["train", "--resume", str(run)]) == 0
    assert "already spent" in capsys.readouterr().out
    after = {
        p.name: p.read_bytes() for p in run.iterdir() if p.is_file() and not p.name.startswith("model_card")
    }
    assert after == before
    assert sorted(p.name for p in (run / "samples").iterdir()) == ["epoch_001.png"]

    # More minutes: the epoch continues at the next step and ends whole.
    assert main(["train", "--resume", str(run), "--quiet", "--set", "train.max_minutes=30"]) == 0
    state = load_checkpoint(run / LATEST)
    assert (state["epoch"], state["step_in_epoch"], state["global_step"]) == (1, 0, total)
    assert [(r["epoch"], r["steps"], r["partial"]) for r in _rows(run)] == [("1", str(total), "")]


# --------------------------------------------------------------------------------- 4: lock
#: A training that runs until it is stopped (single-slice batches, a thousand epochs).
LONG_RUN = ["train.batch_size=1", "train.epochs=1000", "train.decay_epochs=0", "train.val_every=1000"]


def _popen_train(argv: list[str]) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "medsynth", *argv], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_a_second_train_into_a_folder_in_use_is_refused_and_a_dead_holder_is_taken_over(
    tiny_cohort: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    runs, run = tmp_path / "runs", tmp_path / "runs" / "cc"
    first = _popen_train(_argv(tiny_cohort, runs, "cc", *LONG_RUN))
    try:
        _wait_for(lambda: _lock_pid(run) == first.pid, first)
        second = subprocess.run(
            [sys.executable, "-m", "medsynth", *_argv(tiny_cohort, runs, "cc", *LONG_RUN)],
            cwd=REPO, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert second.returncode == 2, second.stderr
        assert _errors(second.stderr) == [second.stderr.strip()] and "Traceback" not in second.stderr
        assert f"in use by another training (pid {first.pid} on {socket.gethostname()}" in second.stderr
        # --resume is refused alike, before and after the first checkpoint.
        assert main(["train", "--resume", str(run), "--quiet"]) == 2
        assert f"pid {first.pid}" in capsys.readouterr().err
        _wait_for(lambda: (run / LATEST).is_file(), first)
        assert main(["train", "--resume", str(run), "--quiet"]) == 2
        assert f"pid {first.pid}" in capsys.readouterr().err
        # A torchrun job: rank 0 takes the lock for the job, says why it cannot, and every rank ends.
        job = subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
             str(_free_port()), "-m", "medsynth", *_argv(tiny_cohort, runs, "cc", *LONG_RUN)],
            cwd=REPO, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert job.returncode != 0
        assert len(_errors(job.stderr)) == 1, job.stderr[-3000:]  # rank 0 says it once; rank 1 is silent
        assert f"in use by another training (pid {first.pid}" in _errors(job.stderr)[0]
        assert first.poll() is None  # the first training never noticed
    finally:
        first.send_signal(signal.SIGTERM)
        first.wait(timeout=120)
    assert first.returncode == 128 + signal.SIGTERM, first.stderr.read()
    assert not (run / LOCK_NAME).exists()  # a clean exit removes the lock
    epochs = [r["epoch"] for r in _rows(run)] if (run / "metrics.csv").exists() else []
    assert epochs == sorted(set(epochs), key=int)  # one training wrote the folder: no epoch twice

    # A holder killed with SIGKILL leaves its lock file behind; the next training takes it over.
    resumed = _popen_train(["train", "--resume", str(run), "--quiet"])
    _wait_for(lambda: _lock_pid(run) == resumed.pid, resumed)
    resumed.kill()
    resumed.wait(timeout=60)
    assert _lock_pid(run) == resumed.pid
    assert main(["train", "--resume", str(run), "--quiet", "--set", "train.epochs=1"]) == 0
    assert (
        f"taking over the lock of a training that is no longer running (pid {resumed.pid}"
        in capsys.readouterr().err
    )
    assert not (run / LOCK_NAME).exists()


# ---------------------------------------------------------------------------- 5: full disk
def test_metrics_append_on_a_full_device_is_one_line() -> None:
    """/dev/full answers every write with ENOSPC: the append says so in one line, no OSError escapes."""
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full on this system")
    with pytest.raises(MedsynthError, match="no space left on the device") as caught:
        _append_metrics(Path("/dev/full"), {"epoch": 1, "steps": 2})
    assert "\n" not in str(caught.value) and "--resume" in str(caught.value)


def test_a_kill_during_the_first_checkpoint_write_leaves_nothing_behind(
    tiny_cohort: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """SIGKILL while the first checkpoint is being written: --resume has nothing to resume, says so and
    removes the 0-byte ``.checkpoint_latest.*.partial.pt``; the same command then trains afresh."""
    run = tmp_path / "killed"
    script = textwrap.dedent(
        f"""
        import sys, time, torch
        from medsynth.cli import main
        torch.save = lambda *a, **k: time.sleep(600)  # the first checkpoint write never ends
        sys.exit(main({_argv(tiny_cohort, tmp_path, "killed")!r}))
        """
    )
    process = subprocess.Popen([sys.executable, "-c", script], cwd=REPO, stderr=subprocess.PIPE, text=True)
    partials = lambda: [p for p in run.glob(".checkpoint_latest.*.partial.pt")]  # noqa: E731
    try:
        _wait_for(lambda: bool(partials()), process)
    finally:
        process.kill()
        process.wait(timeout=60)
    (partial,) = partials()
    assert partial.stat().st_size == 0 and not (run / LATEST).exists()

    assert main(["train", "--resume", str(run), "--quiet"]) == 2
    assert "stopped before its first checkpoint" in capsys.readouterr().err
    assert not partials() and not (run / LOCK_NAME).exists()
    assert main(_argv(tiny_cohort, tmp_path, "killed")) == 0
    assert load_checkpoint(run / LATEST)["finished"]


def _can_mount_tmpfs(where: Path) -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = f"mkdir -p {where} && mount -t tmpfs -o size=1m none {where}"
    return subprocess.run(["unshare", "-rm", "sh", "-c", probe], capture_output=True).returncode == 0


def test_a_really_full_disk_during_training_is_one_line_and_resume_finds_a_checkpoint(
    tiny_cohort: Path, tmp_path: Path
) -> None:
    """A 64 MB tmpfs (private mount namespace) holds the runs folder and the cache; early in the first
    epoch a filler takes every free byte. Training fails with one error line at its next write, leaves
    no partial, and after the filler is removed ``--resume`` finds the checkpoint written before the
    first step and trains to the end."""
    disk = tmp_path / "disk"
    if not _can_mount_tmpfs(disk):
        pytest.skip("cannot mount a tmpfs here (no unshare or no user namespaces)")
    run = disk / "runs" / "full"
    argv = _argv(
        tiny_cohort, disk / "runs", "full", "train.batch_size=1", "train.epochs=1", "train.decay_epochs=0"
    )
    train = " ".join(f"'{a}'" for a in [sys.executable, "-m", "medsynth", *argv])
    results = tmp_path / "results"
    results.mkdir()
    script = textwrap.dedent(
        f"""
        set -u
        mount -t tmpfs -o size=64m none {disk}
        cd {REPO}
        {train} 2> {results}/train.err &
        pid=$!
        # the first epoch has begun (fit opens TensorBoard first), and its first checkpoint (if any) is out
        while [ ! -d {run}/tensorboard ] && kill -0 $pid 2>/dev/null; do sleep 0.01; done
        n=0; while [ ! -f {run}/{LATEST} ] && [ $n -lt 30 ]; do sleep 0.01; n=$((n+1)); done
        cat /dev/zero > {disk}/filler 2>/dev/null
        wait $pid; echo $? > {results}/train.rc
        ls -a {run} > {results}/listing
        rm {disk}/filler
        {sys.executable} -m medsynth train --resume {run} --quiet 2> {results}/resume.err; echo $? > {results}/resume.rc
        {sys.executable} -c "
        import json; from medsynth.model.checkpoint import load_checkpoint
        s = load_checkpoint('{run}/{LATEST}'); print(json.dumps([s['epoch'], s['finished']]))
        " > {results}/state.json
        ls -a {run} > {results}/listing_after
        """
    )
    subprocess.run(["unshare", "-rm", "sh", "-c", script], timeout=600, check=True)
    err = (results / "train.err").read_text()
    assert (results / "train.rc").read_text().strip() == "2", err
    assert "Traceback" not in err and len(_errors(err)) == 1, err
    assert "no space left on the device" in err or "the disk is full" in err, err
    assert not [n for n in (results / "listing").read_text().split() if ".partial" in n]
    assert LATEST in (results / "listing").read_text().split()  # the first checkpoint, intact
    assert (results / "resume.rc").read_text().strip() == "0", (results / "resume.err").read_text()
    assert json.loads((results / "state.json").read_text()) == [1, True]
    assert not [
        n for n in (results / "listing_after").read_text().split() if ".partial" in n or n == LOCK_NAME
    ]
