"""``medsynth train``: resolve task and recipe, own the run folder, start or resume the Trainer."""

from __future__ import annotations

import argparse
import logging
import os
import re
import time
from pathlib import Path
from typing import Any

import yaml

from ..config import Config, load_config
from ..data.augment import pinned_augment
from ..errors import MedsynthError
from ..io.atomic import disk_full_error, is_disk_full, remove_stale_partials
from ..model.checkpoint import BEST, LATEST
from ..model_card import refresh_model_card, validation_note
from ..task import Task
from . import distributed
from .lock import LOCK_NAME, RunFolderLock
from .objectives import objective_class
from .setup import prepare_run_data
from .trainer import Trainer

log = logging.getLogger("medsynth")
DEFAULT_RECIPE = "t1_to_t2_unet2d"


def task_from_args(args: argparse.Namespace) -> str | None:
    """The task string from ``TASK`` or ``--source/--target``; None when neither was given."""
    if args.task and (args.source or args.target):
        raise MedsynthError("give the task either as TASK ('t1->t2') or with --source/--target, not both")
    if args.source or args.target:
        if not (args.source and args.target):
            raise MedsynthError("--source and --target go together, e.g. --source t1 --target t2")
        return f"{args.source}->{args.target}"
    return args.task


def config_from_args(args: argparse.Namespace) -> Config:
    """Recipe, then ``--set`` overrides, then explicit flags (which win), validated."""
    values: dict[str, Any] = {}
    task = task_from_args(args)
    if task is not None:
        Task.parse(task, args.modalities)  # fail early with the task's own message
        values["task"] = task
    flags = {"modalities": "modalities", "data": "data.root", "epochs": "train.epochs",
             "decay_epochs": "train.decay_epochs", "device": "train.device", "name": "name"}  # fmt: skip
    for flag, key in flags.items():
        value = getattr(args, flag, None)
        if value is not None:
            values[key] = str(value) if isinstance(value, Path) else value
    return load_config(args.config or DEFAULT_RECIPE, args.overrides, values)


def default_run_name(config: Config) -> str:
    task = config.parsed_task()
    slug = (
        "unified-" + "-".join(task.modalities)
        if task.is_unified
        else "-".join(task.sources) + "_to_" + str(task.target)
    )
    return re.sub(r"[^A-Za-z0-9_.-]", "", f"{slug}-{config.model.generator}{config.model.spatial_dims}d")


def train_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """``medsynth train``, alone or as one of torchrun's processes (then rank 0 claims the folder)."""
    try:
        config, run_dir = _run_from_args(args)
    except MedsynthError:
        if int(os.environ.get("RANK", "0")) > 0:  # torchrun: every rank fails alike; rank 0 says why
            raise SystemExit(2) from None
        raise
    dist = distributed.init(config.train.device)
    lock: RunFolderLock | None = None
    try:
        # One training per folder: rank 0 holds the lock for the job (a second job is refused here).
        lock = dist.on_main(lambda: RunFolderLock(run_dir).acquire())
        try:
            if not args.resume:
                dist.on_main(lambda: claim_run_dir(run_dir, config))
            best = train(
                config, run_dir, resume=bool(args.resume), quiet=args.quiet, runs_root=run_dir.parent
            )
            # Leave together: rank 0 still writes the card and figures after the loop, and a rank that tears
            # its gloo group down and exits meanwhile was seen to abort (SIGABRT) under a loaded machine.
            dist.barrier()
            return best
        except (OSError, RuntimeError) as exc:  # a full disk at any write of the run is one line
            if not is_disk_full(exc):
                raise
            raise disk_full_error(run_dir, _after_disk_full(run_dir)) from exc
    except MedsynthError as exc:
        # Set-up errors (data, recipe, run folder) are the same on every rank: rank 0 prints the one line.
        if dist.rank > 0 and not isinstance(exc, distributed.PeerFailure):
            raise SystemExit(2) from None
        raise
    finally:
        if lock is not None:
            lock.release()
        distributed.teardown()


def _after_disk_full(run_dir: Path) -> str:
    """What to do once space is free: resume from the last checkpoint, or start again without one."""
    if (run_dir / LATEST).is_file():
        return f"free some space and continue with: medsynth train --resume {run_dir}"
    return "free some space and run the same command again"


def _run_from_args(args: argparse.Namespace) -> tuple[Config, Path]:
    """The configuration and run folder the command names; nothing is written yet."""
    if args.resume:
        run_dir = args.resume
        saved = run_dir / "config.yaml"
        if not saved.is_file():
            raise MedsynthError("nothing to resume: no medsynth run here (no config.yaml)", run_dir)
        if not (run_dir / LATEST).is_file():
            if int(os.environ.get("RANK", "0")) == 0:
                # Refused below; but a training still preparing its data is named (the lock), and what a
                # killed first checkpoint write left (a partial, a stale lock) is removed on the way.
                with RunFolderLock(run_dir):
                    remove_leftovers(run_dir)
            raise MedsynthError(
                "nothing to resume: the run stopped before its first checkpoint_latest.pt; "
                "start it again with the same command, without --resume",
                run_dir,
            )
        config = load_config(saved, args.overrides)
        if args.device:
            config.train.device = args.device
    else:
        config = config_from_args(args)
        run_dir = args.runs_dir / (config.name or default_run_name(config))
    # A recipe its objective cannot train is one line before any folder, lock, cache or network exists.
    objective_class(config.train.objective).check_config(config)
    return config, run_dir


def claim_run_dir(run_dir: Path, config: Config) -> None:
    """Refuse a folder that holds another run; resuming is explicit and nothing is overwritten.

    A folder whose run never saved a checkpoint (it failed while preparing data, or was stopped in its
    first epoch) holds nothing worth keeping: it is taken again, and when the configuration changed
    (the user fixed a ``--set``), the splits and fingerprint derived from the old one are dropped.
    """
    saved = run_dir / "config.yaml"
    # A preset is saved as what it means today: a run started before a preset changes (``robust`` went
    # from half the samples to a tenth) and resumed after it trains on as it started.
    config.data.augment = pinned_augment(config.data.augment)
    if (run_dir / LATEST).exists():
        raise MedsynthError(
            f"this folder already holds a run; continue it with --resume {run_dir} or pick another --name",
            run_dir,
        )
    if saved.exists():
        if yaml.safe_load(saved.read_text(encoding="utf-8")) != config.to_dict():
            log.info(
                "run folder %s never saved a checkpoint; starting it afresh with the new settings", run_dir
            )
            for derived in ("splits.json", "fingerprint.json", "metrics.csv"):
                (run_dir / derived).unlink(missing_ok=True)
    elif run_dir.exists() and any(p.name != LOCK_NAME for p in run_dir.iterdir()):
        raise MedsynthError(
            "output folder is not empty and holds no medsynth run; pick another --name", run_dir
        )
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise MedsynthError(f"cannot create the run folder ({exc.strerror})", run_dir) from exc
    config.save(saved)


def train(config: Config, run_dir: Path, *, resume: bool = False, quiet: bool = False,
          runs_root: Path | None = None) -> dict[str, Any]:  # fmt: skip
    """Prepare the data of ``run_dir`` and train; returns the best validation metrics."""
    task = config.parsed_task()
    cache_dir = (
        Path(config.data.cache_dir) if config.data.cache_dir else (runs_root or run_dir.parent) / ".cache"
    )
    started = time.perf_counter()
    dist = distributed.current()
    dist.on_main(lambda: remove_leftovers(run_dir))
    # Under torchrun rank 0 scans, splits, fingerprints and caches; the others then read its files.
    prepare = lambda: prepare_run_data(  # noqa: E731
        config, task, run_dir, cache_dir=cache_dir, progress=not quiet and dist.is_main
    )
    data = dist.on_main(prepare)
    if data is None:  # another rank: read what rank 0 prepared
        data = prepare()
    trainer = Trainer(config, task, data, run_dir, quiet=quiet)
    if resume:
        trainer.resume(run_dir / LATEST)
        log.info("resuming %s at epoch %d, step %d; precision %s", run_dir, trainer.epoch + 1,
                 trainer.step_in_epoch, trainer.precision.describe())  # fmt: skip
    elif not trainer.quiet:
        sizes = {k: len(v) for k, v in data.splits.items()}
        print(
            f"training {task.describe()} on {sizes.get('train', 0)} subjects "
            f"({len(trainer.dataset)} slices), validating on {sizes.get('val', 0)}; run folder {run_dir}"
        )
        print(f"precision: {trainer.precision.describe()}")
    if dist.enabled and not trainer.quiet:
        info = trainer.distributed_info()
        print(
            f"distributed: {dist.world_size} processes ({dist.backend}), batch {info['batch_size_per_process']} "
            f"per process = {info['effective_batch_size']} per step, learning rates as in the recipe"
        )
    best = trainer.fit()
    if not dist.is_main:
        return best
    minutes = (time.perf_counter() - started) / 60
    value = best.get("value")
    if isinstance(value, (int, float)) and (run_dir / BEST).is_file():
        kind = validation_note(best)
        print(
            f"done in {minutes:.1f} min: best validation {best['metric']} {value:.4g}{kind} "
            f"at epoch {best.get('epoch')} -> {run_dir / BEST}"
        )
    else:
        print(
            f"done in {minutes:.1f} min: nothing validated yet, so no {BEST}; continue with --resume {run_dir}"
        )
    refresh_model_card(run_dir)  # model_card.md/.json; `medsynth evaluate` adds the held-out results
    return best


def remove_leftovers(run_dir: Path) -> list[Path]:
    """Remove what killed writers left in the run folder (``.checkpoint_latest.<pid>-...partial.pt``).

    Called when a run starts or resumes: a checkpoint write killed mid-way (SIGKILL, out of memory, a
    lost node) leaves a temporary file the size of a checkpoint. Files of live writers are kept.
    """
    removed = remove_stale_partials(run_dir, recursive=True)
    if removed:
        names = ", ".join(p.name for p in removed[:3]) + (", ..." if len(removed) > 3 else "")
        log.info(
            "removed %d unfinished file(s) of an interrupted write in %s: %s", len(removed), run_dir, names
        )
    return removed
