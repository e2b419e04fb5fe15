"""The time budget (``train.max_minutes``): the run ends at the step where the job's clock passes it.

The clock counts training seconds over every session of the run (``loop.clock()``), so ``--resume``
continues the same budget. An epoch the budget cuts short is validated, saved and recorded as partial;
``--resume`` with more minutes completes it, and with none left trains and writes nothing.
"""

from __future__ import annotations

from ..events import Handler, Loop


class TimeBudget(Handler):
    """Attached first: a spent budget at ``started`` tells the other handlers nothing will train."""

    def __init__(self, minutes: float) -> None:
        self.minutes = minutes
        self.seconds = 60.0 * minutes
        self.spent_before_start = False
        self.ended_run = False

    def started(self, loop: Loop) -> None:
        if loop.resumed_epoch is None:
            return  # a new run trains at least one step, however small its budget
        clock = loop.dist.agree(loop.clock(), None)[0]  # rank 0's clock on every rank
        self.spent_before_start = clock >= self.seconds
        if self.spent_before_start:
            self.ended_run = loop.end_requested = True

    def step_done(self, loop: Loop) -> None:
        if loop.clock_now is not None and loop.clock_now >= self.seconds:
            self.ended_run = loop.end_requested = True

    def completed(self, loop: Loop) -> None:
        if not self.ended_run or loop.quiet:
            return
        extend = f"extend it with: medsynth train --resume {loop.run_dir} --set train.max_minutes=<more>"
        if self.spent_before_start:
            print(
                f"the time budget (train.max_minutes={self.minutes}) was already spent "
                f"({loop.clock() / 60:.2f} min trained): nothing trained; {extend}"
            )
            return
        part = (
            f" and {loop.step_in_epoch} of {loop.epoch_batches} steps of epoch {loop.epoch + 1}"
            if loop.step_in_epoch
            else ""
        )
        print(
            f"stopped by the time budget (train.max_minutes={self.minutes}) after {loop.epoch} whole "
            f"epochs{part}; {extend}"
        )
