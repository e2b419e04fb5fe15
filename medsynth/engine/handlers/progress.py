"""What a person watching sees: a progress bar per epoch and one line per epoch (not with ``--quiet``)."""

from __future__ import annotations

import math
from typing import Any

from tqdm.auto import tqdm

from ..events import EpochRecord, Handler, Loop
from .metrics import epoch_row

#: Steps between bar updates of the running losses (each update waits for the device).
POSTFIX_EVERY = 10


class Progress(Handler):
    """The bar's postfix: mean losses so far and the job's elapsed / remaining time."""

    def __init__(self, budget_seconds: float | None) -> None:
        self.budget = budget_seconds
        self._bar: Any = None

    def epoch_started(self, loop: Loop) -> None:
        self._close_bar()  # an epoch tried again at a smaller batch (out of memory) starts a new bar
        self._bar = tqdm(
            total=loop.epoch_batches, initial=loop.step_in_epoch, unit="step", leave=False, dynamic_ncols=True,
            desc=f"epoch {loop.epoch + 1}/{loop.config.train.total_epochs}",
        )  # fmt: skip

    def step_done(self, loop: Loop) -> None:
        index = loop.step_in_epoch - 1
        if index % POSTFIX_EVERY == 0 or index + 1 == loop.epoch_batches:
            loop.absorb_losses()
            postfix = {k.removeprefix("loss_"): f"{v:.3f}" for k, v in loop.stats.means().items()}
            self._bar.set_postfix({**postfix, "job": self.job_progress(loop)}, refresh=False)
        self._bar.update()

    def epoch_trained(self, loop: Loop) -> None:
        self._close_bar()

    def closed(self, loop: Loop) -> None:
        self._close_bar()

    def _close_bar(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def epoch_done(self, loop: Loop, record: EpochRecord) -> None:
        row, metrics = epoch_row(record), record.metrics
        kind = {"round trip": ", round trip", "registered target": ", target registered"}.get(
            loop.validation.kind, ""
        )
        val = (
            f"val PSNR {metrics['psnr']:.2f} dB  SSIM {metrics['ssim']:.3f}  MAE {metrics['mae']:.4f} "
            f"([-1,1] space, in mask{kind})  "
            if metrics is not None
            else ""
        )
        losses = "  ".join(f"{k.removeprefix('loss_')} {v:.4f}" for k, v in record.losses.items())
        tqdm.write(
            f"epoch {record.epoch:>3}/{loop.config.train.total_epochs}  {losses}  {val}"
            f"{row['slices_per_s']:.0f} slices/s  train {row['seconds']:.1f} s / val {row['val_seconds']:.1f} s"
            f" / io {row['io_seconds']:.1f} s  [{self.job_progress(loop)}]"
            + ("  *best" if record.improved else "")
            + (f"  (partial: {row['partial']} steps, time budget)" if record.partial else "")
        )

    def job_progress(self, loop: Loop) -> str:
        """Elapsed / remaining time of the whole training job (budget, or an estimate from epochs done)."""
        elapsed = loop.clock()
        if self.budget is not None:
            remaining = max(self.budget - elapsed, 0.0)
        else:
            total = loop.config.train.total_epochs
            done = loop.epoch + loop.step_in_epoch / max(len(loop.loader), 1)
            remaining = elapsed / done * (total - done) if done > 0 else math.nan
        return f"{_mmss(elapsed)} elapsed, {_mmss(remaining)} left"


def _mmss(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    minutes, secs = divmod(int(round(seconds)), 60)
    return f"{minutes}:{secs:02d}"
