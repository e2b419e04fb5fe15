"""The learning-rate schedule: pix2pix's constant rate, then a linear decay.

Over ``train.epochs + train.decay_epochs`` epochs the factor is 1 for the first ``epochs`` and then
falls by ``1 / (decay_epochs + 1)`` per epoch. With a time budget (``train.max_minutes``) the same
shape is also laid over the budget's minutes, and the rate follows whichever of the two is further
along: the decay ends when the *first* of the epochs or the budget runs out. (Following the minutes
alone left a fast machine that trained every epoch in half its budget at the full rate to the end.)
"""

from __future__ import annotations

from ..events import Handler, Loop

#: The smallest factor the budget's decay reaches (its last steps still train).
BUDGET_FLOOR = 0.01


def epoch_factor(epoch: int, epochs: int, decay_epochs: int) -> float:
    """pix2pix's factor for the 0-based ``epoch``: 1, then ``1 - k / (decay_epochs + 1)`` in decay epoch k."""
    return 1.0 - max(0, epoch + 1 - epochs) / float(decay_epochs + 1)


def budget_factor(seconds: float, budget: float, epochs: int, decay_epochs: int) -> float:
    """The same shape over the budget: constant for ``epochs / (epochs + decay_epochs)`` of it, then linear."""
    constant = epochs / float(epochs + decay_epochs)
    progress = min(seconds / budget, 1.0)
    if progress < constant or constant >= 1.0:  # decay_epochs=0: constant to the end
        return 1.0
    return max(1.0 - (progress - constant) / (1.0 - constant), BUDGET_FLOOR)


class LinearDecay(Handler):
    """Sets every optimiser's rate (``initial_lr x factor``) at each epoch's start, and with a budget after
    every step the job agreed on the clock (rank 0's under torchrun, so every rank sets one rate)."""

    def __init__(self, epochs: int, decay_epochs: int, budget_seconds: float | None) -> None:
        self.epochs, self.decay_epochs, self.budget = epochs, decay_epochs, budget_seconds

    def factor(self, epoch: int, clock: float) -> float:
        by_epochs = epoch_factor(epoch, self.epochs, self.decay_epochs)
        if self.budget is None:
            return by_epochs
        return min(by_epochs, budget_factor(clock, self.budget, self.epochs, self.decay_epochs))

    def epoch_started(self, loop: Loop) -> None:
        self._apply(loop, loop.dist.agree(loop.clock(), None)[0] if loop.dist.enabled else loop.clock())

    def step_done(self, loop: Loop) -> None:
        if self.budget is not None and loop.clock_now is not None:
            self._apply(loop, loop.clock_now)

    def _apply(self, loop: Loop, clock: float) -> None:
        factor = self.factor(loop.epoch, clock)
        for optimizer in loop.optimizers:
            for group in optimizer.param_groups:
                group["lr"] = group["initial_lr"] * factor
