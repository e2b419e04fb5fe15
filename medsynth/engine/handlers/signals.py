"""SIGTERM / SIGINT: finish the current step, save ``checkpoint_latest.pt``, say how to resume, exit 128 + n.

The handler only records the signal; the loop agrees on it across ranks (a signal to any process
stops every process at the same step) and fires ``stopping``, where the checkpoint is saved first.
"""

from __future__ import annotations

import signal
from typing import Any

from ...model.checkpoint import LATEST
from ..events import Handler, Loop

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopOnSignal(Handler):
    """Installed for the session (``started``), the previous handlers restored at ``closed``."""

    def __init__(self) -> None:
        self._previous: dict[int, Any] = {}

    def started(self, loop: Loop) -> None:
        def record(signum: int, _frame: object) -> None:
            loop.stop_signal = signum

        self._previous = {sig: signal.signal(sig, record) for sig in SIGNALS}

    def stopping(self, loop: Loop, signal_number: int) -> None:
        """Attached after :class:`~.checkpoints.Checkpoints`: the file named here is on disk."""
        if loop.dist.is_main:
            name = signal.Signals(signal_number).name
            print(
                f"stopped by {name} at epoch {loop.epoch + 1}, step {loop.step_in_epoch}; "
                f"{loop.run_dir / LATEST} saved; continue with: medsynth train --resume {loop.run_dir}",
                flush=True,
            )

    def closed(self, loop: Loop) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous = {}
