"""Distributed training (torchrun, DDP on gloo): shards, identical replicas, rank-0 run folder, resume on 1."""

from __future__ import annotations

import csv
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from conftest import TINY_OVERRIDES

from medsynth.cli import main
from medsynth.data.datasets import BatchLoader
from medsynth.errors import ConfigError, MedsynthError
from medsynth.model.checkpoint import load_checkpoint


class _Items:
    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def set_epoch(self, epoch: int) -> None:
        pass

    def __getitems__(self, index):
        return [int(i) for i in index]


@pytest.mark.parametrize("world", [2, 3])
def test_ranks_take_disjoint_shares_of_one_order(world: int) -> None:
    single = BatchLoader(_Items(50), 4 * world, shuffle=True, seed=7, drop_last=True)
    single.set_epoch(3)
    shares = []
    for rank in range(world):
        loader = BatchLoader(_Items(50), 4, shuffle=True, seed=7, drop_last=True, rank=rank, world_size=world)
        loader.set_epoch(3)
        assert len(loader) == 50 // (4 * world)  # equal steps on every rank
        shares.append(list(loader))
    # Step s of the job is the s-th global batch of one process with the effective batch.
    for step, batch in enumerate(single):
        assert sum((share[step] for share in shares), []) == batch


def test_loader_refuses_bad_ranks() -> None:
    with pytest.raises(ConfigError, match="rank"):
        BatchLoader(_Items(10), 2, shuffle=True, seed=0, drop_last=True, rank=2, world_size=2)
    with pytest.raises(ConfigError, match="drop_last"):
        BatchLoader(_Items(10), 2, shuffle=True, seed=0, drop_last=False, rank=0, world_size=2)
    with pytest.raises(MedsynthError, match="2 per process x 3 processes"):
        BatchLoader(_Items(5), 2, shuffle=True, seed=0, drop_last=True, rank=0, world_size=3)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _train_args(cohort: Path, runs: Path, name: str, extra: list[str]) -> list[str]:
    args = ["train", "t1->t2", "--data", str(cohort), "--config", "demo_cpu", "--device", "cpu",
            "--runs-dir", str(runs), "--name", name, "--quiet"]  # fmt: skip
    for item in [*TINY_OVERRIDES, *extra]:
        args += ["--set", item]
    return args


def _rank_main(rank: int, world: int, port: int, argv: list[str], out: str) -> None:
    """One process of a 2-process job: train, then save what this rank holds."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world))  # fmt: skip
    torch.set_num_threads(1)
    from medsynth.engine import trainer as trainer_module

    fit = trainer_module.Trainer.fit

    def fit_and_dump(self):
        best = fit(self)
        torch.save(
            {"generator": dict(self.generator.named_parameters()),
             "critic": dict(self.objective.critic.named_parameters()),
             "steps": self.global_step},
            Path(out) / f"rank{rank}.pt",
        )  # fmt: skip
        return best

    trainer_module.Trainer.fit = fit_and_dump
    assert main(argv) == 0


def test_two_gan_processes_hold_identical_weights(tiny_cohort: Path, tmp_path: Path) -> None:
    """GAN step with batch norm (local on CPU) in both networks: generator and critic stay replicas."""
    extra = ["train.steps_per_epoch=3", "train.decay_epochs=0",
             "model.generator_args={base_channels: 8, depth: 3, norm: batch, dropout: 0.0}",
             "model.critic_args={base_channels: 8, n_layers: 2, norm: batch}"]  # fmt: skip
    argv = _train_args(tiny_cohort, tmp_path / "runs", "gan", extra)
    mp.spawn(_rank_main, args=(2, _free_port(), argv, str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    assert ranks[0]["steps"] == ranks[1]["steps"] == 3
    for network in ("generator", "critic"):
        start = load_checkpoint(tmp_path / "runs" / "gan" / "checkpoint_latest.pt")
        assert ranks[0][network].keys() == ranks[1][network].keys()
        for key, value in ranks[0][network].items():
            torch.testing.assert_close(value, ranks[1][network][key], rtol=0, atol=0, msg=key)
        saved = (
            start["generator_state"] if network == "generator" else start["objective_state"]["critic_state"]
        )
        for key, value in ranks[0][network].items():  # the checkpoint holds the bare modules' weights
            torch.testing.assert_close(saved[key], value.detach(), rtol=0, atol=0)


def test_torchrun_job_writes_once_and_resumes_on_one_process(tiny_cohort: Path, tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    extra = ["train.objective=l1", "train.steps_per_epoch=3", "train.decay_epochs=0"]
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
               str(_free_port()), "-m", "medsynth", *_train_args(tiny_cohort, runs, "l1", extra)]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    run = runs / "l1"
    for name in ("config.yaml", "splits.json", "fingerprint.json", "metrics.csv", "curves.png",
                 "checkpoint_latest.pt", "checkpoint_best.pt"):  # fmt: skip
        assert (run / name).is_file(), name
    assert [p.name for p in (run / "samples").iterdir()] == ["epoch_001.png"]
    assert len(list((run / "tensorboard").iterdir())) == 1  # one events file: rank 0's
    assert result.stdout.count("done in") == 1
    state = load_checkpoint(run / "checkpoint_latest.pt")
    assert state["distributed"]["world_size"] == 2
    assert state["distributed"]["effective_batch_size"] == 2 * state["config"]["train"]["batch_size"]
    assert (state["epoch"], state["global_step"]) == (1, 3)

    # One process continues the two-process run at the next step.
    assert main(["train", "--resume", str(run), "--quiet", "--set", "train.epochs=2"]) == 0
    with open(run / "metrics.csv", newline="") as stream:
        rows = list(csv.DictReader(stream))
    assert [(r["epoch"], r["steps"]) for r in rows] == [("1", "3"), ("2", "6")]
    assert load_checkpoint(run / "checkpoint_latest.pt")["distributed"]["world_size"] == 1
