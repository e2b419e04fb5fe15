"""Model selection: which validated epoch is the run's best (``checkpoint_best.pt``, ``loop.best``)."""

from __future__ import annotations

import math

from ..events import EpochRecord, Handler, Loop

#: Metrics where lower is better.
LOWER_IS_BETTER = ("mae", "divergence")


class BestSelection(Handler):
    """Compares each validation with ``loop.best`` on ``train.best_metric`` (``mae``: lower is better).

    A round-trip validation (unpaired held-out subjects without both sides) selects on its ``divergence``
    instead, whatever ``best_metric`` says: the round trip's PSNR is won by a near-copy of the input, the
    synthetic targets' distance from the training targets' intensity histogram cannot be
    (:mod:`medsynth.engine.validation`).

    ``loop.best`` lives on the loop (every checkpoint carries it, ``fit()`` returns it); this handler
    decides when it changes. Attached before the checkpoint and logging handlers: they read
    ``record.improved``.
    """

    def __init__(self, metric: str) -> None:
        self.metric = metric

    def is_better(self, value: float, best: float | None, metric: str | None = None) -> bool:
        if math.isnan(value):
            return False
        if best is None:
            return True
        return value < best if (metric or self.metric) in LOWER_IS_BETTER else value > best

    def epoch_done(self, loop: Loop, record: EpochRecord) -> None:
        metrics = record.metrics
        round_trip = metrics is not None and not math.isnan(metrics.get("divergence", math.nan))
        metric = "divergence" if round_trip else self.metric
        if metrics is None or not self.is_better(metrics[metric], loop.best.get("value"), metric):
            return
        record.improved = True
        loop.best = {"metric": metric, "value": metrics[metric], "epoch": record.epoch,
                     **{f"val_{k}": v for k, v in metrics.items()},
                     "validation": loop.validation.kind}  # fmt: skip
