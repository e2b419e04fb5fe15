"""Shared fixtures: a tiny demo cohort and a tiny trained run, built once per test session.

Everything is real: NIfTI files written by the demo generator, a real (very short) training run with
real checkpoints. Sizes are chosen so the whole suite stays fast on 2 CPU cores.
"""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import ndimage

from medsynth.config import load_config
from medsynth.data.demo import make_demo_cohort
from medsynth.engine.run import claim_run_dir, train
from medsynth.io.volume import Volume
from medsynth.model.checkpoint import LATEST, load_checkpoint

#: 6 mm voxels: 33 x 39 x 32 volumes, large enough for 11-voxel SSIM windows.
TINY_SPACING_MM = 6.0

TINY_OVERRIDES = [
    "data.context=1",
    "train.lr_generator=2.0e-4",
    "data.val=1",
    "data.test=1",
    "model.generator_args={base_channels: 8, depth: 3, norm: instance, dropout: 0.0}",
    "model.critic_args={base_channels: 8, n_layers: 2, norm: instance}",
    "train.epochs=1",
    "train.decay_epochs=1",
    "train.batch_size=4",
    "train.num_threads=1",
    "train.val_every=1",
    "train.max_minutes=null",
    "train.precision=fp32",  # the numerics tests compare; tests/test_precision.py covers auto and bf16
]


@pytest.fixture(autouse=True)
def _single_thread() -> None:
    """Two cores are shared by everything; one thread per test keeps timings stable."""
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Five subjects x T1w, T2w, PDw, FLAIR at 6 mm (BIDS-like layout)."""
    root = tmp_path_factory.mktemp("cohort") / "demo"
    make_demo_cohort(root, n_subjects=5, spacing_mm=TINY_SPACING_MM, seed=3, progress=False)
    return root


def tiny_config(
    data: Path, task: str = "t1->t2", extra: list[str] | None = None, modalities: str | None = None
):
    values = {"data.root": str(data), "task": task}
    if modalities:
        values["modalities"] = modalities
    return load_config("demo_cpu", [*TINY_OVERRIDES, *(extra or [])], values)


@pytest.fixture(scope="session")
def tiny_run(tiny_cohort: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A t1->t2 U-Net trained for two short epochs; its folder holds every run artefact."""
    run_dir = tmp_path_factory.mktemp("runs") / "t1_to_t2"
    config = tiny_config(tiny_cohort)
    claim_run_dir(run_dir, config)
    train(config, run_dir, quiet=True)
    return run_dir


def train_until_sigterm(
    cohort: Path, runs: Path, name: str, overrides: list[str], *, at_step: int = 1
) -> str:
    """``medsynth train`` (demo_cpu + TINY_OVERRIDES + ``overrides``) in a process of its own, stopped by
    SIGTERM once its ``checkpoint_latest.pt`` holds ``at_step`` steps; asserts the 128 + 15 exit and
    returns what it printed. The resume tests of every objective start here."""
    command = [sys.executable, "-m", "medsynth", "train", "t1->t2", "--data", str(cohort), "--config",
               "demo_cpu", "--runs-dir", str(runs), "--name", name, "--quiet"]  # fmt: skip
    for item in [*TINY_OVERRIDES, *overrides]:
        command += ["--set", item]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    latest, deadline = runs / name / LATEST, time.time() + 120
    while not latest.exists() or load_checkpoint(latest)["global_step"] < at_step:
        assert process.poll() is None, process.stderr.read().decode()  # type: ignore[union-attr]
        assert time.time() < deadline, "no checkpoint within 120 s"
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=60) == 128 + signal.SIGTERM
    return process.stdout.read().decode()  # type: ignore[union-attr]


def torchrun_two_processes(cohort: Path, runs: Path, name: str, overrides: list[str]) -> None:
    """``medsynth train`` (demo_cpu + TINY_OVERRIDES + ``overrides``, 2 steps of batch 2) as 2 gloo processes
    under torchrun; asserts a clean exit, which the loop's replica check gives only if every network the
    objective trains stayed identical across the ranks."""
    args = ["train", "t1->t2", "--data", str(cohort), "--config", "demo_cpu", "--device", "cpu",
            "--runs-dir", str(runs), "--name", name, "--quiet"]  # fmt: skip
    for item in [
        *TINY_OVERRIDES,
        *overrides,
        "train.steps_per_epoch=2",
        "train.decay_epochs=0",
        "train.batch_size=2",
    ]:
        args += ["--set", item]
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
               str(port), "-m", "medsynth", *args]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]


def resample_moved(volume: Volume, motion, fill: float = 0.0) -> Volume:
    """``volume`` moved by ``motion`` (a ``demo.Misregistration``) and resampled (linear) on its own grid.

    What the demo did to a finished volume before it simulated the motion before the scan: the tests use
    it to move small synthetic volumes for the registration tests, and to show the blur it caused.
    Output voxel ``v`` samples the input at ``A^-1 T^-1 A v``; voxels from outside the grid get ``fill``.
    """
    pull = np.linalg.inv(volume.affine) @ np.linalg.inv(motion.matrix()) @ volume.affine
    moved = ndimage.affine_transform(
        volume.array, pull[:3, :3], pull[:3, 3], order=1, mode="constant", cval=fill
    )
    return Volume(moved, volume.affine.copy(), dict(volume.meta))
