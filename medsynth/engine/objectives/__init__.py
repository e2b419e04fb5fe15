"""Training objectives: what one optimisation step does, behind one seam the loop calls.

The loop (:class:`~medsynth.engine.trainer.Trainer`) owns the generator it was asked to train (the
direction of the run's task), that generator's optimiser, the data order and the clock; its handlers
(:mod:`medsynth.engine.handlers`) own the schedule, checkpoints and the run folder's files. An objective owns everything else its method needs and performs one step:

* ``gan`` (:mod:`.pix2pix`): a conditional PatchGAN critic, LSGAN + ``lambda_l1`` * L1;
* ``l1`` (:mod:`.pix2pix`): reconstruction alone (the pix2pix paper's ablation);
* ``cyclegan`` (:mod:`.cyclegan`): a reverse generator, two unconditional critics, cycle-consistency
  and identity terms, image pools; it learns from unpaired data (``data.pairing: unpaired``);
* ``reggan`` (:mod:`.reggan`): ``gan`` for pairs that are not voxel-aligned: a registration network
  (MONAI's LocalNet), trained jointly, warps ``G(x)`` onto the target before the L1, with a smoothness
  penalty on its field. The network is training machinery: resumable state, never an inference direction.

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

The names (:data:`~.registry.OBJECTIVES`) and which methods learn from unpaired data
(:data:`~.registry.UNPAIRED`) live in :mod:`.registry`, which imports nothing: the recipe loader checks
them without importing torch (this module imports the networks only when an objective is built).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .registry import OBJECTIVES, UNPAIRED

if TYPE_CHECKING:
    from .base import Objective


def objective_class(name: str) -> type:
    """The class registered as ``name`` (the recipe loader has checked the name)."""
    module, cls = OBJECTIVES[name]
    return getattr(importlib.import_module(f"{__name__}.{module}"), cls)


def build_objective(name: str, **context: Any) -> Objective:
    """The objective registered as ``name``, given the loop's generator, optimiser, device and recipe."""
    from .base import _Context  # torch and the networks: imported when an objective is built

    return objective_class(name)(_Context(**context))


__all__ = ["OBJECTIVES", "UNPAIRED", "Objective", "build_objective", "objective_class"]
