"""Model selection: which validated epoch is the run's best (``checkpoint_best.pt``, ``loop.best``)."""

from __future__ import annotations

import math

from ..events import EpochRecord, Handler, Loop


class BestSelection(Handler):
    """Compares each validation with ``loop.best`` on ``train.best_metric`` (``mae``: lower is better).

    ``loop.best`` lives on the loop (every checkpoint carries it, ``fit()`` returns it); this handler
    decides when it changes. Attached before the checkpoint and logging handlers: they read
    ``record.improved``.
    """

    def __init__(self, metric: str) -> None:
        self.metric = metric

    def is_better(self, value: float, best: float | None) -> bool:
        if math.isnan(value):
            return False
        if best is None:
            return True
        return value < best if self.metric == "mae" else value > best

    def epoch_done(self, loop: Loop, record: EpochRecord) -> None:
        metrics = record.metrics
        if metrics is None or not self.is_better(metrics[self.metric], loop.best.get("value")):
            return
        record.improved = True
        loop.best = {"metric": self.metric, "value": metrics[self.metric], "epoch": record.epoch,
                     **{f"val_{k}": v for k, v in metrics.items()},
                     "validation": loop.validation.kind}  # fmt: skip
