"""``data.augment.fade``: the augmentation's probability follows the learning-rate schedule.

Input augmentation buys robustness to other sites' images at a price on the site's own images (measured
0.7 dB at the demo's scale, README "Another site's T1w"): a network that must also undo warps and bias
fields has less left for its own protocol. Fading the augmentation with the rate's decay lets it learn the
invariance while the rate is high and spend the last, smallest steps on its own protocol's images, the
way nnU-Net-style schedules anneal what is hard late in training.
"""

from __future__ import annotations

from typing import Any

from ..events import Handler, Loop


class AugmentationFade(Handler):
    """At each epoch's start, sets the augmentation's strength to the rate's factor (after the schedule).

    The factor is read from the optimiser (``lr / initial_lr``), so it is the schedule's, budget or epochs.
    It is saved with the epoch it belongs to: a run resumed mid-epoch keeps the strength that epoch began
    with (its clock has moved on, so the rate would say a little less), and draws the same batches.
    """

    def __init__(self, augmentation: Any) -> None:
        self.augmentation = augmentation
        self._epoch: int | None = None

    def epoch_started(self, loop: Loop) -> None:
        if self._epoch != loop.epoch:
            group = loop.optimizers[0].param_groups[0]
            self.augmentation.strength = float(group["lr"]) / float(group["initial_lr"])
            self._epoch = loop.epoch

    def state_dict(self) -> dict[str, Any]:
        return {"augmentation_fade": {"epoch": self._epoch, "strength": self.augmentation.strength}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        saved = state.get("augmentation_fade")
        if saved is not None:
            self._epoch, self.augmentation.strength = saved["epoch"], float(saved["strength"])
