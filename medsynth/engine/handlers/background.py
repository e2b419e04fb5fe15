"""Background writes: checkpoints and figures go to disk from a thread while the next epoch trains.

What is written is a host copy taken in the main thread (:func:`host_copy`), so the writer never sees
later updates of the weights. A failed write (a full disk) surfaces in the main thread at the next
epoch's end, or when the run stops and waits for its writes.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch

from ..events import EpochRecord, Handler, Loop


class BackgroundWriter(Handler):
    """One writer thread for the run's files; other handlers :meth:`submit` to it."""

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="medsynth-writer")
        self._pending: list[Future] = []

    def submit(self, function: Callable[..., Any], *args: Any) -> None:
        self._pending.append(self._pool.submit(function, *args))

    def drain(self) -> None:
        """Wait for every write; the first failure is raised here."""
        pending, self._pending = self._pending, []
        for future in pending:
            future.result()

    def epoch_done(self, loop: Loop, record: EpochRecord) -> None:
        """Surface an error of a write that finished meanwhile (attached first: before new writes)."""
        done = [f for f in self._pending if f.done()]
        self._pending = [f for f in self._pending if not f.done()]
        for future in done:
            future.result()

    def stopping(self, loop: Loop, signal_number: int) -> None:
        self.drain()

    def completed(self, loop: Loop) -> None:
        self.drain()

    def closed(self, loop: Loop) -> None:
        self._pool.shutdown(wait=True)


def host_copy(payload: Any) -> Any:
    """A deep copy whose tensors live on the CPU: the background writer must not see later updates."""
    if isinstance(payload, torch.Tensor):
        return payload.detach().to("cpu", copy=True)
    if isinstance(payload, dict):
        return {k: host_copy(v) for k, v in payload.items()}
    if isinstance(payload, (list, tuple)):
        return type(payload)(host_copy(v) for v in payload)
    return payload
