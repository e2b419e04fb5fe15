"""Figures of a validated epoch (rank 0, background thread): ``samples/epoch_XXX.png`` and ``curves.png``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ...viz import comparison_grid, plot_curves
from ..events import EpochRecord, Handler, Loop
from .background import BackgroundWriter


class Figures(Handler):
    """After ``metrics.csv`` has the epoch's row (attached after :class:`~.metrics.MetricsCsv`)."""

    def __init__(self, run_dir: Path, writer: BackgroundWriter) -> None:
        self.run_dir, self.writer = run_dir, writer

    def epoch_done(self, loop: Loop, record: EpochRecord) -> None:
        if record.metrics is not None:
            self.writer.submit(self.save, loop.samples, record.epoch)

    def save(self, samples: list[Any], epoch: int) -> None:
        """Sample grid of the first validation subject (three slices across its mask) and the learning curves."""
        plot_curves(self.run_dir / "metrics.csv", self.run_dir / "curves.png")
        if not samples:
            return
        inputs, prediction, truth, mask, _target = samples[0]
        present = np.flatnonzero(mask.any(axis=(1, 2)))
        if present.size == 0:
            return
        picks = np.linspace(present[0], present[-1], 5)[1:4].astype(int)
        rows = [{"input": inputs[0][k], "synthetic": prediction[k], "target": truth[k]} for k in picks]
        comparison_grid(rows, self.run_dir / "samples" / f"epoch_{epoch:03d}.png")
