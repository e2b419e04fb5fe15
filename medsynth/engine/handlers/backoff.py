"""Out of device memory in a run's first steps: halve the batch and train on, with rescaled learning rates.

An out-of-memory within :data:`OOM_BACKOFF_STEPS` steps of a session's start (or of a smaller batch)
halves the batch down to :data:`OOM_BATCH_FLOOR`, scales the learning rates by the recipes'
``sqrt(batch / 8)`` rule, records both in ``config.yaml`` and the checkpoint, and recaptures a CUDA
graph. Later, it is an error line: the card filled up meanwhile (another process), and ``--resume``
starts again with the back-off window open. Under torchrun every process must train one batch size,
so there is no back-off there: one line names the smaller batch to set.
"""

from __future__ import annotations

from typing import Any

import torch

from ...errors import MedsynthError
from ...model.memory import BatchBackoff as Shrinker
from ...model.memory import describe_memory, lr_scale
from ..assembly import wants_graphs
from ..events import Handler, Loop
from ..graphs import graphed_step
from .checkpoints import Checkpoints

#: Steps after a session's start (or a smaller batch) within which an out-of-memory halves the batch;
#: a CUDA graph is captured at step 4.
OOM_BACKOFF_STEPS = 8
#: The smallest training batch the back-off tries.
OOM_BATCH_FLOOR = 4


class BatchBackoff(Handler):
    """Answers the loop's ``out_of_memory`` event; the loop retries the epoch from the step it reached."""

    def __init__(self, checkpoints: Checkpoints) -> None:
        self.checkpoints = checkpoints
        self._window_start: int | None = None
        self._shrinker: Shrinker | None = None
        self._first_lrs: tuple[float, float] = (0.0, 0.0)

    def epoch_started(self, loop: Loop) -> None:
        if self._window_start is None:
            self._window_start = loop.global_step

    def out_of_memory(self, loop: Loop) -> bool:
        train, old = loop.config.train, loop.config.train.batch_size
        assert self._window_start is not None
        fitted = loop.global_step - self._window_start
        if loop.dist.enabled:  # every process must train one batch size: no back-off under torchrun
            raise MedsynthError(
                f"out of memory at training batch {old} in process {loop.dist.rank} ({describe_memory(loop.device)}); "
                f"set a smaller batch, e.g. --set train.batch_size={max(old // 2, 1)}"
            )
        if fitted >= OOM_BACKOFF_STEPS:
            raise MedsynthError(
                f"out of memory at training batch {old} ({describe_memory(loop.device)}) after {fitted} steps "
                f"had fitted (did another process take memory?); continue with: medsynth train --resume "
                f"{loop.run_dir} (its first steps halve the batch if the card is still short)"
            )
        if self._shrinker is None:
            self._shrinker = Shrinker(
                old, floor=OOM_BATCH_FLOOR, what="training batch", device=loop.device,
                hint="use a smaller model or train.crop_size, free the card, or use one with more memory",
            )  # fmt: skip
            self._first_lrs = (train.lr_generator, train.lr_critic)
        shrinker = self._shrinker
        loop.objective_step = None  # a captured graph holds memory of the old shapes
        for optimizer in loop.optimizers:
            optimizer.zero_grad(set_to_none=True)
        shrinker.shrink()  # frees the cache; an error line at the floor
        new, factor = shrinker.batch, lr_scale(old, shrinker.batch)
        for optimizer in loop.optimizers:
            for group in optimizer.param_groups:
                group["initial_lr"] *= factor
                group["lr"] *= factor
        train.batch_size = new
        train.lr_generator, train.lr_critic = train.lr_generator * factor, train.lr_critic * factor
        # Samples of this epoch already trained stay trained: the loader's order does not depend on the batch.
        loop.step_in_epoch = loop.step_in_epoch * old // new
        loop.loader.batch_size = new
        loop.objective_step = self._reporting(
            graphed_step(loop.objective.step, loop.optimizers, loop.device,
                         enabled=wants_graphs(loop.config, loop.objective, say_why_not=False))
        )  # fmt: skip
        (lr_g, lr_c), total = self._first_lrs, lr_scale(shrinker.failed[0], new)
        shrinker.note = (
            f"; learning rates x{total:.2f} by the recipes' sqrt(batch / 8) rule (generator {lr_g:.3g} -> "
            f"{train.lr_generator:.3g}, critic {lr_c:.3g} -> {train.lr_critic:.3g}), recorded in config.yaml"
        )
        self._window_start = loop.global_step
        if loop.dist.is_main:  # a resumed run trains at the batch that fitted, with its learning rates
            loop.config.save(loop.run_dir / "config.yaml")
            self.checkpoints.save_latest(loop)
        return True

    def _reporting(self, step: Any) -> Any:
        """The new step, saying once (at the first step that fits) what the back-off did."""
        shrinker = self._shrinker
        assert shrinker is not None

        def step_then_report(*batch: torch.Tensor | None) -> dict[str, torch.Tensor]:
            losses = step(*batch)
            shrinker.settled()  # one log line, at the first step that fits
            return losses

        return step_then_report
