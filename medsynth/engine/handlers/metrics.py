"""The run's numbers: one ``metrics.csv`` row per epoch (rank 0), and the same row as TensorBoard scalars."""

from __future__ import annotations

import contextlib
import csv
import logging
import os
import time
from pathlib import Path
from typing import Any

from ...io.atomic import atomic_path, disk_full_error, disk_full_is_one_line, is_disk_full
from ..events import EpochRecord, Handler, Loop

log = logging.getLogger("medsynth")

METRICS_FIELDS = [
    "epoch", "steps", "seconds", "val_seconds", "io_seconds", "slices_per_s", "lr",
    "loss_critic", "loss_adv", "loss_l1", "val_psnr", "val_ssim", "val_mae",
    "loss_nll",  # model.predict_scale: the Laplace likelihood (engine/objectives/pix2pix.py)
    "partial",  # "k/n": an epoch the time budget ended after k of its n steps (empty for whole epochs)
]  # fmt: skip


def metrics_fields(loss_names: tuple[str, ...], round_trip: bool = False) -> list[str]:
    """metrics.csv's columns: :data:`METRICS_FIELDS`, then any loss of the run's objective not among them,
    then ``val_divergence`` for a run that can validate on the round trip (it trains the reverse direction)."""
    extra = [name for name in loss_names if name not in METRICS_FIELDS]
    return METRICS_FIELDS + extra + (["val_divergence"] if round_trip else [])


def epoch_row(record: EpochRecord) -> dict[str, Any]:
    """``record`` as a metrics.csv row; ``io_seconds``: main-thread seconds of the epoch's end so far."""
    validated = record.metrics is not None
    return {
        "epoch": record.epoch,
        "steps": record.steps,
        "seconds": round(record.seconds, 3),
        "val_seconds": round(record.val_seconds if validated else 0.0, 3),
        "slices_per_s": round(record.slices / max(record.seconds, 1e-9), 2),
        "lr": record.lr,
        **{k: round(v, 6) for k, v in record.losses.items()},
        **({f"val_{k}": round(v, 6) for k, v in record.metrics.items()} if record.metrics else {}),
        "partial": f"{record.trained}/{record.batches}" if record.partial else "",
        "io_seconds": round(time.perf_counter() - record.io_started, 3),
    }


class MetricsCsv(Handler):
    """``metrics.csv`` (rank 0): rows of epochs a resume trains again are dropped once it trains."""

    def __init__(self, path: Path, fields: list[str]) -> None:
        self.path, self.fields = path, fields

    def started(self, loop: Loop) -> None:
        # Not before: a resume with nothing to train keeps the record of a partial epoch.
        if loop.resumed_epoch is not None and not loop.end_requested:
            truncate_metrics(self.path, loop.resumed_epoch, self.fields)

    def epoch_done(self, loop: Loop, record: EpochRecord) -> None:
        append_metrics(self.path, epoch_row(record), self.fields)


class TensorBoardLog(Handler):
    """The metrics row as TensorBoard scalars (rank 0), under ``RUN/tensorboard``."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._writer: Any = None

    def started(self, loop: Loop) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # pragma: no cover - tensorboard is a dependency, but keep training without it
            log.warning("tensorboard is not installed; metrics go to metrics.csv only")
            return
        self._writer = SummaryWriter(log_dir=str(self.folder))

    def epoch_done(self, loop: Loop, record: EpochRecord) -> None:
        if self._writer is None:
            return
        for key, value in epoch_row(record).items():
            if key not in ("epoch", "partial"):
                self._writer.add_scalar(key, value, record.epoch)

    def closed(self, loop: Loop) -> None:
        if self._writer is not None:
            with disk_full_is_one_line(self.folder, loop.resume_hint):
                self._writer.close()
            self._writer = None


def append_metrics(path: Path, row: dict[str, Any], fields: list[str] = METRICS_FIELDS) -> None:
    """Append one row; a failed append (a full disk) leaves the file as it was and says so in one line."""
    new = not path.exists()
    size = 0 if new else path.stat().st_size
    try:
        with open(path, "a", newline="", encoding="utf-8") as stream:
            writer = csv.DictWriter(stream, fieldnames=fields)
            if new:
                writer.writeheader()
            writer.writerow(row)
    except OSError as exc:
        with contextlib.suppress(OSError):  # no half row: shrinking a file needs no space
            os.truncate(path, size)
        if is_disk_full(exc):
            raise disk_full_error(
                path, f"free some space and continue with: medsynth train --resume {path.parent}"
            ) from exc
        raise


def truncate_metrics(path: Path, completed_epochs: int, fields: list[str] = METRICS_FIELDS) -> None:
    """Drop rows of epochs after the resumed checkpoint (they will be trained again)."""
    if not path.exists():
        return
    with open(path, newline="", encoding="utf-8") as stream:
        rows = [r for r in csv.DictReader(stream) if int(r["epoch"]) <= completed_epochs]
    with atomic_path(path) as temp, open(temp, "w", newline="", encoding="utf-8") as stream:
        writer = csv.DictWriter(stream, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
