"""Checkpoints: ``checkpoint_latest.pt`` (resume) at every epoch end, at a step cadence and at a stop;
``checkpoint_best.pt`` (inference) whenever model selection says the epoch improved.

The payload is the loop's :meth:`~medsynth.engine.trainer.Trainer.state`, which gathers the resumable
state of every handler. The latest checkpoint is always written before the best one: a failed write of
the best one must not cost the resumable state.
"""

from __future__ import annotations

from ...model.checkpoint import BEST, LATEST, save_checkpoint
from ..events import EpochRecord, Handler, Loop
from .background import BackgroundWriter, host_copy


class Checkpoints(Handler):
    """Rank 0 writes; epoch-end and cadence saves go through the background writer from host copies."""

    def __init__(self, writer: BackgroundWriter, every_steps: int | None) -> None:
        self.writer, self.every_steps = writer, every_steps
        #: Whether this session's last ``checkpoint_latest.pt`` was saved as finished (``medsynth demo``
        #: reads it); None before the session's first save.
        self._saved_finished: bool | None = None

    def started(self, loop: Loop) -> None:
        # A first checkpoint before the first step: a run stopped by a full disk (or a kill) in its first
        # epoch still has one to resume from, and a disk too full for one fails now.
        if not loop.end_requested and not (loop.run_dir / LATEST).exists():
            self.save_latest(loop)

    def step_done(self, loop: Loop) -> None:
        every = self.every_steps
        if every and loop.global_step % every == 0 and loop.stop_signal is None:
            self.save_latest(loop, background=True)

    def epoch_done(self, loop: Loop, record: EpochRecord) -> None:
        self.save_latest(loop, background=True)
        if record.improved and loop.dist.is_main:
            self.writer.submit(
                save_checkpoint, host_copy(loop.state(for_inference=True)), loop.run_dir / BEST
            )

    def stopping(self, loop: Loop, signal_number: int) -> None:
        self.save_latest(loop)

    def completed(self, loop: Loop) -> None:
        """A handler after this one ended the run at the last epoch's end: save that the run is finished."""
        if loop.end_requested and self._saved_finished is False:
            self.save_latest(loop)

    def save_latest(self, loop: Loop, *, background: bool = False) -> None:
        """``checkpoint_latest.pt`` now (e.g. after the batch size changed), or from the writer thread."""
        if not loop.dist.is_main:
            return
        payload = loop.state()
        self._saved_finished = payload["finished"]
        if background:
            self.writer.submit(save_checkpoint, host_copy(payload), loop.run_dir / LATEST)
        else:
            save_checkpoint(payload, loop.run_dir / LATEST)
