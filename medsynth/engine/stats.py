"""The loop's running numbers of an epoch: loss sums on the device, and the epoch's totals on the host."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class EpochStats:
    """Running sums for the epoch summary; part of the checkpoint so a resumed epoch reports whole."""

    steps: int = 0
    slices: int = 0
    seconds: float = 0.0
    sums: dict[str, float] = field(default_factory=dict)

    def add(self, losses: dict[str, float], steps: int) -> None:
        for key, value in losses.items():
            self.sums[key] = self.sums.get(key, 0.0) + value
        self.steps += steps

    def means(self) -> dict[str, float]:
        return {key: value / max(self.steps, 1) for key, value in self.sums.items()}

    def to_dict(self) -> dict[str, Any]:
        return {"steps": self.steps, "slices": self.slices, "seconds": self.seconds, "sums": dict(self.sums)}


class DeviceLossSums:
    """Losses summed on the device, step by step: a GPU step never waits for the host to read them.

    :meth:`drain_into` moves the sums into an :class:`EpochStats` with one host transfer, when a
    handler logs or a checkpoint is saved.
    """

    def __init__(self) -> None:
        self._sums: dict[str, torch.Tensor] = {}
        self._steps = 0

    def add(self, losses: dict[str, torch.Tensor]) -> None:
        for key, value in losses.items():
            self._sums[key] = self._sums[key] + value if key in self._sums else value.float()
        self._steps += 1

    def drain_into(self, stats: EpochStats) -> None:
        if not self._steps:
            return
        keys = list(self._sums)
        values = torch.stack([self._sums[k] for k in keys]).tolist()
        stats.add(dict(zip(keys, values, strict=True)), self._steps)
        self._sums, self._steps = {}, 0
