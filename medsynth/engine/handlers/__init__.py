"""The handlers of a training run: each concern around the loop in a module of its own.

:func:`default_handlers` attaches them from the recipe and the run's settings (a time budget only when
``train.max_minutes`` is set, replica checks only under torchrun, files only on rank 0, the progress
display only without ``--quiet``), in the order their decisions feed each other:

==========================  =====================================================================
:mod:`.budget`              ``train.max_minutes``: ends the run at the step the clock passes it
:mod:`.schedule`            pix2pix's constant-then-linear learning rate (epochs or budget, first wins)
:mod:`.backoff`             out of device memory in the first steps: halve the batch and train on
:mod:`.replicas`            torchrun: every process holds the same weights after an epoch
:mod:`.background`          the writer thread for checkpoints and figures; its errors surface here
:mod:`.selection`           the best validated epoch (``checkpoint_best.pt``)
:mod:`.checkpoints`         ``checkpoint_latest.pt`` (epoch end, step cadence, stop) and the best one
:mod:`.signals`             SIGTERM / SIGINT: stop at the current step, say how to resume, exit
:mod:`.metrics`             ``metrics.csv`` and TensorBoard
:mod:`.figures`             ``samples/epoch_XXX.png`` and ``curves.png``
:mod:`.progress`            the progress bar and the epoch line
==========================  =====================================================================
"""

from __future__ import annotations

from ..events import Handler, Loop
from .background import BackgroundWriter
from .backoff import BatchBackoff
from .budget import TimeBudget
from .checkpoints import Checkpoints
from .figures import Figures
from .metrics import MetricsCsv, TensorBoardLog, metrics_fields
from .progress import Progress
from .replicas import ReplicaCheck
from .schedule import LinearDecay
from .selection import BestSelection
from .signals import StopOnSignal


def default_handlers(loop: Loop) -> list[Handler]:
    """The handlers the run's settings ask for, in firing order."""
    train, dist, run_dir = loop.config.train, loop.dist, loop.run_dir
    budget = None if train.max_minutes is None else 60.0 * train.max_minutes
    writer = BackgroundWriter()
    checkpoints = Checkpoints(writer, train.checkpoint_every)
    handlers: list[Handler] = [TimeBudget(train.max_minutes)] if train.max_minutes is not None else []
    handlers += [
        LinearDecay(train.epochs, train.decay_epochs, budget),
        BatchBackoff(checkpoints),
    ]
    if dist.enabled:
        handlers.append(ReplicaCheck())
    # At an epoch's end: earlier writes' errors, then the best, then the files that record both; at a
    # stop: the writes finish, the checkpoint is saved, then the signal handler names it.
    handlers += [writer, BestSelection(train.best_metric), checkpoints, StopOnSignal()]
    if dist.is_main:
        handlers += [
            MetricsCsv(
                run_dir / "metrics.csv",
                metrics_fields(loop.objective.loss_names, round_trip=bool(loop.objective.directions())),
            ),
            TensorBoardLog(run_dir / "tensorboard"),
            Figures(run_dir, writer),
        ]
    if not loop.quiet:
        handlers.append(Progress(budget))
    return handlers


__all__ = ["default_handlers"]
