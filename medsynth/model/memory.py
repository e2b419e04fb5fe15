"""Out of device memory: back off the batch instead of failing, and say so in one line.

A card that is smaller than the recipe assumed (8-24 GB consumer cards) or shared with another job runs
out of memory in the first batches. Training (:mod:`medsynth.engine.trainer`) and whole-volume synthesis
(:mod:`.slicing`, :mod:`.sliding`) then halve their batch and go on, down to a floor; only an
out-of-memory at the floor is an error, and that error is one line that names what was tried.

Only :class:`torch.OutOfMemoryError` (a CUDA allocation that failed) counts: a CPU that runs out of RAM
raises something else, and the operating system usually ends the process before that.
"""

from __future__ import annotations

import gc
import logging
import math

import torch

from ..errors import MedsynthError

log = logging.getLogger("medsynth")

GIB = 2**30


def device_memory(device: torch.device | str) -> tuple[int, int] | None:
    """``(free, total)`` bytes of a CUDA device as the driver reports them, so memory that *other
    processes* hold counts as used; plus what this process's caching allocator holds unused (it is free
    to us). None on a CPU, or when the query fails."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    try:
        free, total = torch.cuda.mem_get_info(device)
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    except (RuntimeError, AssertionError, ValueError):  # a broken driver must not hide the real error
        return None
    return int(free + max(cached, 0)), int(total)


def describe_memory(device: torch.device | str) -> str:
    """``"5.2 of 15.8 GiB free on cuda:0"``, or ``"on cpu"``."""
    memory = device_memory(device)
    if memory is None:
        return f"on {device}"
    free, total = memory
    return f"{free / GIB:.1f} of {total / GIB:.1f} GiB free on {device}"


def release_memory(device: torch.device | str) -> None:
    """Return what the failed attempt left in the caching allocator, so the smaller batch can use it."""
    if torch.device(device).type == "cuda":
        gc.collect()  # tensors of the failed attempt caught in reference cycles
        torch.cuda.empty_cache()


def lr_scale(old_batch: int, new_batch: int) -> float:
    """The recipes' learning-rate rule, ``lr x sqrt(batch / 8)`` (README "GPU"), from one batch to another.

    Going down it is the rule's exact inverse wherever the rate was not clipped at the rule's 2e-3 cap;
    for a clipped rate (``demo_gpu``'s generator) it is the largest rate the rule allows at the new batch.

    Example:
        >>> round(lr_scale(64, 16), 3)
        0.5
    """
    return math.sqrt(new_batch / old_batch)


class BatchBackoff:
    """The batch of a loop that halves it on an out-of-memory, down to ``floor``.

    The loop catches :class:`torch.OutOfMemoryError`, leaves its ``except`` block (so the failed
    attempt's tensors are freed), calls :meth:`shrink` and retries with :attr:`batch`; after a batch
    that went through it calls :meth:`settled`, which logs the one line once.

    Example:
        >>> backoff = BatchBackoff(64, floor=4, what="inference batch")
        >>> backoff.shrink(); backoff.shrink(); backoff.batch
        16
    """

    def __init__(
        self,
        batch: int,
        *,
        floor: int = 1,
        what: str = "batch",
        device: torch.device | str = "cpu",
        hint: str = "free the card (is another process using it?) or use one with more memory",
    ) -> None:
        if batch < 1 or floor < 1:
            raise ValueError(f"batch and floor must be >= 1, got {batch} and {floor}")
        self.batch, self.floor, self.what, self.device = int(batch), min(int(floor), int(batch)), what, device
        self.hint = hint
        #: Appended to the log line (the trainer says how it changed the learning rates).
        self.note = ""
        #: Every batch that ran out of memory, largest first.
        self.failed: list[int] = []
        self._reported = True

    @property
    def shrunk(self) -> bool:
        return bool(self.failed)

    def shrink(self) -> None:
        """Halve the batch after an out-of-memory at :attr:`batch`; at the floor, a one-line error."""
        self.failed.append(self.batch)
        release_memory(self.device)
        if self.batch <= self.floor:
            tried = ", ".join(str(b) for b in self.failed)
            raise MedsynthError(
                f"out of memory even at {self.what} {self.batch} (tried {tried}; "
                f"{describe_memory(self.device)}): {self.hint}"
            )
        self.batch = max(self.batch // 2, self.floor)
        self._reported = False

    def settled(self) -> None:
        """A batch went through: say once at which size, after an out-of-memory."""
        if self._reported:
            return
        self._reported = True
        log.warning(
            "out of memory at %s %s (%s); continuing with %d, the largest that fitted%s",
            self.what, ", ".join(str(b) for b in self.failed), describe_memory(self.device), self.batch,
            self.note,
        )  # fmt: skip
