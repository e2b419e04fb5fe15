"""Under torchrun: every process must hold the same weights after an epoch; a difference is a bug."""

from __future__ import annotations

import torch

from ...errors import MedsynthError
from ..events import Handler, Loop


class ReplicaCheck(Handler):
    """Compares a checksum of every trained module across ranks at each epoch's end (one all-reduce)."""

    def epoch_trained(self, loop: Loop) -> None:
        if loop.stop_signal is not None:
            return  # stopping: the processes save and exit instead
        modules = [loop.generator, *loop.objective.modules]
        checksum = (
            torch.stack([p.detach().double().sum() for m in modules for p in m.parameters()]).sum().item()
        )
        if not loop.dist.same_on_all(checksum):
            raise MedsynthError(
                f"the training processes hold different weights after epoch {loop.epoch + 1}; "
                "this is a bug in medsynth's distributed training, please report it"
            )
