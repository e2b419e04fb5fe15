"""Training objectives: what one optimisation step does, behind one seam the loop calls.

The loop (:class:`~medsynth.engine.trainer.Trainer`) owns the generator it was asked to train (the
direction of the run's task), that generator's optimiser, the data order, the schedule, the clock and the
run folder. An objective owns everything else its method needs and performs one step:

* ``gan`` (:mod:`.pix2pix`): a conditional PatchGAN critic, LSGAN + ``lambda_l1`` * L1;
* ``l1`` (:mod:`.pix2pix`): reconstruction alone (the pix2pix paper's ablation);
* ``cyclegan`` (:mod:`.cyclegan`): a reverse generator, two unconditional critics, cycle-consistency
  and identity terms, image pools; it learns from unpaired data (``data.pairing: unpaired``).

What the seam carries, so that no method has to teach the loop about itself:

* :attr:`~.base.Objective.inputs`: the batch entries the step takes (unpaired data brings the target's
  own neighbourhood and mask); the loop moves exactly those to the device;
* :attr:`~.base.Objective.optimizers` and :attr:`~.base.Objective.modules`: its optimisers follow the
  loop's learning-rate schedule, its networks are checked across torchrun ranks;
* :meth:`~.base.Objective.directions`: further inference directions it trains (CycleGAN's reverse
  generator), saved in the checkpoint beside the run's own plan and served by the model home;
* :attr:`~.base.Objective.capturable`: whether the step may run inside a CUDA graph;
* ``state_dict`` / ``load_state_dict`` / ``describe``: resume and the checkpoint's record.

Every step returns its losses as *detached device tensors*: reading them forces the host to wait for the
GPU, so the loop reads them only when it logs.

This module imports nothing heavy: the recipe loader checks names against :data:`OBJECTIVES` and the
pairing a method accepts against :data:`UNPAIRED` without importing torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .base import Objective

#: ``train.objective`` -> (module of this package, class).
OBJECTIVES: dict[str, tuple[str, str]] = {
    "gan": ("pix2pix", "GANObjective"),
    "l1": ("pix2pix", "L1Objective"),
    "cyclegan": ("cyclegan", "CycleGANObjective"),
}
#: Objectives that learn from unpaired samples (``data.pairing: unpaired``); the others need pairs.
UNPAIRED: tuple[str, ...] = ("cyclegan",)


def objective_class(name: str) -> type:
    """The class registered as ``name`` (the recipe loader has checked the name)."""
    module, cls = OBJECTIVES[name]
    return getattr(importlib.import_module(f"{__name__}.{module}"), cls)


def build_objective(name: str, **context: Any) -> Objective:
    """The objective registered as ``name``, given the loop's generator, optimiser, device and recipe."""
    from .base import _Context

    return objective_class(name)(_Context(**context))
