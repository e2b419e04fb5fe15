"""Distributed training plumbing for ``torchrun``: one process per device, rank 0 writes.

``torchrun --nproc-per-node N -m medsynth train ...`` starts N copies of ``medsynth train`` with
``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE`` and the rendezvous in the environment. :func:`init` joins the
process group only when ``WORLD_SIZE > 1`` (NCCL for CUDA, gloo for the CPU); otherwise it returns a
:class:`Dist` of one, whose helpers are no-ops, so a single-process run is exactly today's run.

Rules every caller follows:

* rank 0 alone writes (run folder, data cache, checkpoints, metrics, figures) and the other ranks wait
  at :meth:`Dist.barrier`; :meth:`Dist.on_main` runs a step on rank 0 and re-raises its error, as one
  line, on every rank, so a refused run folder does not leave N-1 processes waiting;
* a decision that ends the loop (time budget, a signal) is taken by :meth:`Dist.agree`, so every rank
  stops after the same step (DDP hangs when one rank skips a collective);
* collectives wait up to :data:`TIMEOUT` (rank 0's validation can be long); override with
  ``MEDSYNTH_DIST_TIMEOUT_MINUTES``.

Example (2 CPU processes)::

    torchrun --nproc-per-node 2 -m medsynth train 't1->t2' --data DIR --config demo_cpu --device cpu
"""

from __future__ import annotations

import datetime
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from ..errors import MedsynthError

log = logging.getLogger("medsynth")
T = TypeVar("T")

#: Default timeout of every collective, barriers included (rank 0 may validate for a long time).
TIMEOUT = datetime.timedelta(minutes=float(os.environ.get("MEDSYNTH_DIST_TIMEOUT_MINUTES", "120")))


class PeerFailure(MedsynthError):
    """A collective failed because another training process died or hung."""


@dataclass(frozen=True)
class Dist:
    """This process's place in the job; ``world_size == 1`` means not distributed."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    local_world_size: int = 1
    backend: str | None = None

    @property
    def agree_interval(self) -> int:
        """Steps between agreements on the clock and on signals (a CUDA all-reduce waits for the GPU)."""
        return 8 if self.backend == "nccl" else 1

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def device(self, device: torch.device) -> torch.device:
        """The device of this rank: ``cuda:LOCAL_RANK`` for CUDA, the device as given otherwise."""
        if self.enabled and device.type == "cuda":
            return torch.device("cuda", self.local_rank)
        return device

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def on_main(self, function: Callable[[], T]) -> T | None:
        """Run ``function`` on rank 0 while the others wait; its error is raised on every rank.

        Rank 0 raises the original error (the CLI prints it as one line); the others exit with status 2
        and print nothing, so the job's log holds the message once.
        """
        if not self.enabled:
            return function()
        result, error = None, None
        if self.is_main:
            try:
                result = function()
            except BaseException as exc:  # noqa: BLE001 - re-raised below, after the others are told
                error = exc
        failed = [error is not None]
        dist.broadcast_object_list(failed, src=0)
        if error is not None:
            raise error
        if failed[0]:
            raise SystemExit(2)
        return result

    def broadcast_object(self, value: T) -> T:
        """Rank 0's ``value`` on every rank (a small picklable object)."""
        if not self.enabled:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def agree(self, clock: float, signal_number: int | None) -> tuple[float, int | None]:
        """Rank 0's clock, and a signal if any rank received one: the same answer on every rank.

        One all-reduce of two numbers; on CUDA it waits for the device, so the loop calls it every
        few steps there.
        """
        if not self.enabled:
            return clock, signal_number
        device = torch.device("cuda", self.local_rank) if self.backend == "nccl" else torch.device("cpu")
        # Clocks are >= 0 and only rank 0 sends its own, so one MAX reduction answers both questions.
        values = torch.tensor(
            [clock if self.is_main else 0.0, float(signal_number or 0)], dtype=torch.float64, device=device
        )
        dist.all_reduce(values, op=dist.ReduceOp.MAX)
        clock_main, signal_any = values.tolist()
        return clock_main, (int(signal_any) or None)

    def agree_every(
        self, every: int, step: int, clock: float, signal_number: int | None
    ) -> tuple[float | None, int | None]:
        """:meth:`agree` at every ``every``-th step (a CUDA all-reduce waits for the GPU), else (None, None);
        one process alone: its own clock and signal at every step."""
        if not self.enabled:
            return clock, signal_number
        if step % every:
            return None, None
        return self.agree(clock, signal_number)

    def same_on_all(self, value: float) -> bool:
        """Whether every rank passed the same number (e.g. a weight checksum)."""
        if not self.enabled:
            return True
        device = torch.device("cuda", self.local_rank) if self.backend == "nccl" else torch.device("cpu")
        tensor = torch.tensor([value, -value], dtype=torch.float64, device=device)
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
        high, neg_low = tensor.tolist()
        return high == -neg_low

    def mean(self, values: dict[str, float]) -> dict[str, float]:
        """The mean over ranks of each value (every rank passes the same keys)."""
        if not self.enabled or not values:
            return values
        keys = sorted(values)
        device = torch.device("cuda", self.local_rank) if self.backend == "nccl" else torch.device("cpu")
        tensor = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=device)
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return dict(zip(keys, (tensor / self.world_size).tolist(), strict=True))

    def wrap(self, module: nn.Module, device: torch.device) -> nn.Module:
        """``module`` in DistributedDataParallel (batch norm made synchronous on CUDA); itself when alone.

        The caller keeps the unwrapped module for state dicts, validation, and any forward whose
        parameters are frozen (the critic in the generator step): a DDP forward there would prepare a
        gradient reduction that never happens.
        """
        if not self.enabled:
            return module
        from torch.nn.parallel import DistributedDataParallel

        if device.type == "cuda":
            return DistributedDataParallel(module, device_ids=[device.index], output_device=device.index)
        return DistributedDataParallel(module)

    def sync_batchnorm(self, module: nn.Module, device: torch.device) -> nn.Module:
        """Batch norm statistics over all ranks' batches, where PyTorch supports it (CUDA, not gloo/CPU).

        On the CPU, batch norm stays per rank (each normalises its own batch); running statistics are
        rank 0's, broadcast by DDP at every forward.
        """
        if not self.enabled or device.type != "cuda":
            return module
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)

    def describe(self) -> str:
        return f"rank {self.rank}/{self.world_size} ({self.backend})" if self.enabled else "single process"


_CURRENT = Dist()


def current() -> Dist:
    """The process group joined by :func:`init` (a single process before, or without, it)."""
    return _CURRENT


def init(device_name: str = "auto") -> Dist:
    """Join the torchrun job described by the environment; a no-op without ``WORLD_SIZE > 1``.

    ``device_name`` is the recipe's ``train.device``: CUDA (``auto`` with a GPU) uses NCCL and
    ``cuda:LOCAL_RANK``; the CPU uses gloo.
    """
    global _CURRENT
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return _CURRENT
    if dist.is_initialized():
        return _CURRENT
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world_size)))
    cuda = device_name.startswith("cuda") or (device_name == "auto" and torch.cuda.is_available())
    if cuda:
        if local_rank >= torch.cuda.device_count():
            raise MedsynthError(
                f"rank {rank} wants GPU {local_rank}, but this node has {torch.cuda.device_count()}; "
                "use --nproc-per-node <= the GPU count"
            )
        torch.cuda.set_device(local_rank)
    backend = "nccl" if cuda else "gloo"
    dist.init_process_group(backend=backend, timeout=TIMEOUT)
    _CURRENT = Dist(rank, local_rank, world_size, local_world, backend)
    if rank != 0:  # warnings and notices once, from rank 0
        log.setLevel(logging.ERROR)
    return _CURRENT


def teardown() -> None:
    """Leave the process group (idempotent)."""
    global _CURRENT
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    _CURRENT = Dist()


def is_peer_failure(exc: BaseException) -> bool:
    """A collective failed because another rank died or hung (gloo/NCCL report it as RuntimeError)."""
    if not isinstance(exc, RuntimeError) or not _CURRENT.enabled:
        return False
    text = str(exc).lower()
    return isinstance(exc, getattr(dist, "DistError", ())) or any(
        s in text for s in ("connection closed", "connection reset", "timed out", "nccl", "gloo", "peer")
    )


def peer_failure_message(exc: BaseException, run_hint: str) -> str:
    first = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else exc.__class__.__name__
    return (
        f"another training process stopped ({first}); the last checkpoint_latest.pt is intact: "
        f"continue with {run_hint}"
    )


def job_info(job: Dist, train: Any) -> dict[str, Any]:
    """The job that trains: processes, per-process and effective batch, learning rates.

    The rule: ``train.batch_size`` and the learning rates are per process and are not rescaled, so the
    effective batch is ``batch_size x world_size`` at the recipe's learning rates.
    """
    return {
        "world_size": job.world_size,
        "backend": job.backend,
        "batch_size_per_process": train.batch_size,
        "effective_batch_size": train.batch_size * job.world_size,
        "lr_generator": train.lr_generator,
        "lr_critic": train.lr_critic,
        "lr_rule": "per-process batch and learning rates as given (no scaling)",
    }


def resumed_step(checkpoint: dict[str, Any], job: Dist, batch_size: int, epoch: int) -> int:
    """The step of its epoch a checkpoint resumes at, in this job's steps.

    A checkpoint written by another number of processes has trained ``step x batch x world`` samples of
    the epoch, in the order every world size shares; this job continues after the same samples.
    """
    step = int(checkpoint["step_in_epoch"])
    saved = checkpoint.get("distributed", {"world_size": 1, "batch_size_per_process": None})
    if saved["world_size"] == job.world_size or not step:
        return step
    seen = step * (saved["batch_size_per_process"] or batch_size) * saved["world_size"]
    resumed = seen // (batch_size * job.world_size)
    log.info(
        "the checkpoint was written by %d processes, this job has %d: resuming at step %d of epoch %d "
        "(%d samples already trained)", saved["world_size"], job.world_size, resumed, epoch + 1, seen,
    )  # fmt: skip
    return resumed


def seed_rank(job: Dist, seed: int, step: int) -> None:
    """Ranks other than 0 draw their own random numbers (dropout), from (seed, rank, step)."""
    if job.rank:
        torch.manual_seed(int(np.random.SeedSequence([seed, job.rank, step]).generate_state(1)[0]))


def rng_state() -> dict[str, Any]:
    """This process's torch random state (CPU and every CUDA device), for a checkpoint."""
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def restore_rng(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
