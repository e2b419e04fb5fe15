"""The training loop's events and the handler interface; everything around the loop is a handler.

The loop (:class:`~medsynth.engine.trainer.Trainer`) trains epochs of objective steps and fires these
events, in this order; a :class:`Handler` overrides the ones it needs (the idea of MONAI's engines and
Lightning's callbacks, without their dependency)::

    started                     the run (or a resumed session) begins; nothing trained yet
    ┌ epoch_started             before the first step of an epoch (also a resumed, half-done one)
    │   step_done               after every optimiser step
    │ epoch_trained             the epoch's steps are done (or stopped early), before validation
    │ epoch_done(record)        after validation: the epoch's numbers (EpochRecord), counters advanced
    └ ...
    stopping(signal)            a signal stops the run mid-epoch: save, say how to resume (then exit)
    completed                   epochs or budget spent
    closed                      always, last: release what ``started`` took (threads, files, signals)

    out_of_memory               a step ran out of device memory: True when a handler made the step fit

Handlers run in list order at each event (:func:`medsynth.engine.handlers.default_handlers` orders
them: a handler that decides something another one reads runs first). A handler that owns resumable
state returns it from :meth:`Handler.state_dict` under keys of its own; the loop gathers those into
every ``checkpoint_latest.pt`` and hands the checkpoint back to :meth:`Handler.load_state_dict` on
``--resume``, so a new handler cannot forget to save its state.

Example, a handler that ends training once the validation PSNR reaches a goal (no edit of the loop)::

    class StopAtGoal(Handler):
        def __init__(self, psnr: float) -> None:
            self.psnr = psnr

        def epoch_done(self, loop, record):
            if record.metrics and record.metrics["psnr"] >= self.psnr:
                loop.end_requested = True   # validated, saved and recorded like a budget's end
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from ..config import Config
from .distributed import Dist


@dataclass
class EpochRecord:
    """One epoch's numbers, taken before the loop advances its counters (``metrics.csv``'s row)."""

    epoch: int  #: 1-based
    steps: int  #: optimiser steps of the run so far
    trained: int  #: steps of this epoch trained (fewer than ``batches``: a partial epoch)
    batches: int  #: steps the epoch has
    seconds: float
    slices: int
    lr: float
    losses: dict[str, float]
    metrics: dict[str, float] | None  #: validation metrics, None when the epoch was not validated
    val_seconds: float = 0.0
    #: Set by model selection (:class:`~medsynth.engine.handlers.selection.BestSelection`).
    improved: bool = False
    #: When the epoch's end began: handlers report the main thread's I/O seconds from here.
    io_started: float = field(default_factory=time.perf_counter)

    @property
    def partial(self) -> bool:
        return self.trained < self.batches


class Loop(Protocol):
    """What a handler may read and change of the loop (:class:`~medsynth.engine.trainer.Trainer`).

    Handlers depend on this interface, not on the loop's module: the loop imports its handlers, and
    nothing below it imports the loop.
    """

    config: Config
    dist: Dist
    run_dir: Path
    quiet: bool
    device: torch.device
    generator: torch.nn.Module
    objective: Any  #: the run's :class:`~medsynth.engine.objectives.base.Objective`
    optimizers: list[torch.optim.Optimizer]
    objective_step: Any  #: the step the loop calls (the back-off swaps it)
    loader: Any
    validation: Any  #: :class:`~medsynth.engine.validation.Validation` (its ``kind``)
    samples: list[Any]  #: the last validation's volumes
    stats: Any  #: :class:`~medsynth.engine.stats.EpochStats` of the epoch being trained
    epoch: int
    step_in_epoch: int
    global_step: int
    epoch_batches: int
    resumed_epoch: int | None
    best: dict[str, Any]
    end_requested: bool  #: set by a handler: the run ends after this step (validated, saved, recorded)
    stop_signal: int | None
    clock_now: float | None

    @property
    def resume_hint(self) -> str: ...

    def clock(self) -> float: ...

    def state(self, *, for_inference: bool = False) -> dict[str, Any]: ...

    def absorb_losses(self) -> None: ...


class Handler:
    """A concern of a training run, attached to the loop's events; every method is optional."""

    def started(self, loop: Loop) -> None:
        """The run begins (fresh or resumed), before its first step."""

    def epoch_started(self, loop: Loop) -> None:
        """An epoch begins (a resumed epoch begins at its next step)."""

    def step_done(self, loop: Loop) -> None:
        """One optimiser step is done; ``loop.clock_now`` is the job's agreed clock or None."""

    def epoch_trained(self, loop: Loop) -> None:
        """The epoch's steps are done (all, or up to a stop)."""

    def epoch_done(self, loop: Loop, record: EpochRecord) -> None:
        """The epoch ended: ``record`` holds its numbers; the loop's counters point past it."""

    def stopping(self, loop: Loop, signal_number: int) -> None:
        """A signal stops the run after the current step."""

    def completed(self, loop: Loop) -> None:
        """The run spent its epochs or its budget."""

    def closed(self, loop: Loop) -> None:
        """The session ends, normally or not: release what :meth:`started` took."""

    def out_of_memory(self, loop: Loop) -> bool:
        """A step ran out of device memory; return True after making the next try fit."""
        return False

    def state_dict(self) -> dict[str, Any]:
        """Resumable state under keys of this handler's own (merged into the checkpoint)."""
        return {}

    def load_state_dict(self, checkpoint: dict[str, Any]) -> None:
        """Take this handler's keys back from a checkpoint (absent in older ones: keep defaults)."""


class Handlers:
    """The run's handlers, fired in order; their resumable state gathered into one mapping."""

    def __init__(self, handlers: list[Handler]) -> None:
        self.all = list(handlers)

    def find(self, kind: type[Handler]) -> Handler | None:
        """The attached handler of this class, if any (e.g. for a test or a benchmark)."""
        return next((h for h in self.all if isinstance(h, kind)), None)

    def started(self, loop: Loop) -> None:
        for handler in self.all:
            handler.started(loop)

    def epoch_started(self, loop: Loop) -> None:
        for handler in self.all:
            handler.epoch_started(loop)

    def step_done(self, loop: Loop) -> None:
        for handler in self.all:
            handler.step_done(loop)

    def epoch_trained(self, loop: Loop) -> None:
        for handler in self.all:
            handler.epoch_trained(loop)

    def epoch_done(self, loop: Loop, record: EpochRecord) -> None:
        for handler in self.all:
            handler.epoch_done(loop, record)

    def stopping(self, loop: Loop, signal_number: int) -> None:
        for handler in self.all:
            handler.stopping(loop, signal_number)

    def completed(self, loop: Loop) -> None:
        for handler in self.all:
            handler.completed(loop)

    def closed(self, loop: Loop) -> None:
        """Every handler closes, even when an earlier one fails; the first failure is raised after."""
        failure: BaseException | None = None
        for handler in self.all:
            try:
                handler.closed(loop)
            except BaseException as exc:  # noqa: BLE001 - re-raised below, after the others closed
                failure = failure or exc
        if failure is not None:
            raise failure

    def out_of_memory(self, loop: Loop) -> bool:
        return any(handler.out_of_memory(loop) for handler in self.all)

    def state_dict(self) -> dict[str, Any]:
        """Every handler's resumable state; two handlers claiming one key is a bug, said at once."""
        gathered: dict[str, Any] = {}
        for handler in self.all:
            state = handler.state_dict()
            clash = gathered.keys() & state.keys()
            if clash:
                raise RuntimeError(f"handlers save the same checkpoint keys: {sorted(clash)}")
            gathered.update(state)
        return gathered

    def load_state_dict(self, checkpoint: dict[str, Any]) -> None:
        for handler in self.all:
            handler.load_state_dict(checkpoint)
