"""``train.ema_decay``: serve an exponential moving average of the generators' weights, not their last step.

An adversarial game does not settle: at a constant learning rate the generator circles the critic's
latest opinion, and its last weights land anywhere on that circle (CycleGAN on the study's 2 mm cohort:
validation swinging by 1-2 dB from one epoch to the next, 19.2 -> 18.3 -> 17.8 dB). Averaging the
iterates cancels the circling (Yazıcı et al. 2019, "The Unusual Effectiveness of Averaging in GAN
Training"; StyleGAN and diffusion models serve such an average). After every optimiser step::

    average <- d * average + (1 - d) * live,   d = min(ema_decay, (1 + n) / (10 + n))

where ``n`` counts the updates so far. The second term (TensorFlow's ``ExponentialMovingAverage`` with
``num_updates``) lets the average follow the weights early, when they move fast: it averages roughly
the last ninth of the steps taken until ``ema_decay`` takes over (0.999: after about 9,000 steps, an
average over about the last 1,000).

What is averaged: every generator the checkpoint serves (the run's own and an objective's further
directions, CycleGAN's reverse one); critics and registration networks train on against the live
generators, as before. Buffers (batch-norm statistics) are copied, not averaged.

What it changes: validation (and so ``checkpoint_best.pt``) scores the averaged weights, and every
checkpoint's ``generator_state`` / ``directions`` hold them, so ``infer``, ``evaluate`` and ``export``
serve the average with no change of theirs. The live weights, which training continues from, and the
update count are this handler's resumable state (``weight_average``): ``--resume`` puts the live weights
back into the networks (:func:`training_weights`) and the checkpoint's served weights into the average.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from ..events import Handler, Loop

#: Checkpoint key of this handler's state.
KEY = "weight_average"


def effective_decay(decay: float, updates: int) -> float:
    """The decay of update number ``updates`` (0-based): ``decay``, or less while few updates were made."""
    return min(decay, (1.0 + updates) / (10.0 + updates))


class WeightAveraging(Handler):
    """Keeps the averaged copies of the served generators; see the module docstring.

    Attached first, so that its averages exist before any other handler saves a checkpoint.
    """

    def __init__(self, decay: float) -> None:
        self.decay = decay
        self.updates = 0
        self.live: list[nn.Module] = []
        self.averages: list[nn.Module] = []
        self._resumed: dict[str, Any] | None = None

    def started(self, loop: Loop) -> None:
        self.live = [loop.generator, *(module for _plan, module in loop.objective.directions())]
        self.averages = [copy.deepcopy(module).requires_grad_(False) for module in self.live]
        if self._resumed is not None:  # --resume: the checkpoint's served weights are the average
            self.updates = int(self._resumed["updates"])
            for average, state in zip(self.averages, self._resumed["served"], strict=True):
                average.load_state_dict(state)
            self._resumed = None

    @torch.no_grad()
    def step_done(self, loop: Loop) -> None:
        weight = 1.0 - effective_decay(self.decay, self.updates)
        for average, module in zip(self.averages, self.live, strict=True):
            torch._foreach_lerp_(list(average.parameters()), list(module.parameters()), weight)
            for kept, buffer in zip(average.buffers(), module.buffers(), strict=True):
                kept.copy_(buffer)
        self.updates += 1

    def served_states(self) -> list[dict[str, torch.Tensor]]:
        """The averaged generators' state dicts: the run's own first, then the further directions."""
        return [average.state_dict() for average in self.averages]

    @contextlib.contextmanager
    def averages_in_place(self) -> Iterator[None]:
        """The averaged weights in the live networks for the duration (validation), then the live ones back."""
        kept = [copy.deepcopy(module.state_dict()) for module in self.live]
        try:
            for module, average in zip(self.live, self.averages, strict=True):
                module.load_state_dict(average.state_dict())
            yield
        finally:
            for module, state in zip(self.live, kept, strict=True):
                module.load_state_dict(state)

    def state_dict(self) -> dict[str, Any]:
        return {
            KEY: {
                "updates": self.updates,
                "live": [module.state_dict() for module in self.live],
            }
        }

    def load_state_dict(self, checkpoint: dict[str, Any]) -> None:
        # The loop has put the live weights back (:func:`training_weights`). A checkpoint saved without
        # averaging (turned on at --resume) serves live weights: the average starts from them.
        saved = checkpoint.get(KEY)
        self._resumed = {
            "updates": saved["updates"] if saved else 0,
            "served": [checkpoint["generator_state"]]
            + [direction["generator_state"] for direction in checkpoint.get("directions", [])],
        }


def training_weights(checkpoint: dict[str, Any]) -> list[dict[str, torch.Tensor]]:
    """The weights training goes on from: the run's own generator first, then the further directions.

    A checkpoint of an averaging run serves the average and keeps the live weights under :data:`KEY`;
    they are the ones to train on, also when averaging is turned off at ``--resume``.
    """
    saved = checkpoint.get(KEY)
    if saved is not None:
        return list(saved["live"])
    return [checkpoint["generator_state"]] + [d["generator_state"] for d in checkpoint.get("directions", [])]
