"""The training loop: epochs of objective steps, then validation, figures and checkpoints at a cadence.

What one step does belongs to the objective (:mod:`.objectives`: the pix2pix GAN step, L1 alone, or
an unpaired method's reverse generator and two critics); the loop owns the generator of the run's direction, its
optimiser, the data order, the learning-rate schedule, the clock and the run folder, and saves every
further direction the objective trains beside its own (``directions`` in each checkpoint):

* learning rate: pix2pix's constant-then-linear-decay over ``train.epochs + train.decay_epochs``, or,
  with a time budget (``train.max_minutes``), the same shape mapped onto the budget's minutes;
* validation (``train.val_every`` epochs, and always at the end; :mod:`.validation`): whole held-out
  volumes through the same :class:`~medsynth.model.synthesis.SynthesisModel` inference uses, a row in
  ``metrics.csv``, a sample PNG, ``curves.png``, ``checkpoint_best.pt`` when the validation metric improves;
* ``checkpoint_latest.pt`` at every epoch end (and every ``train.checkpoint_every`` steps). PNGs and
  checkpoints are written by a background thread from copies, so the next epoch does not wait for disk.

Losses stay on the device and are read only when logged, so a GPU step never waits for the host.
SIGTERM/SIGINT finish the current step, save ``checkpoint_latest.pt`` and exit; ``--resume`` continues
at the next step with the same data order and RNG state.
"""

from __future__ import annotations

import contextlib
import csv
import logging
import math
import os
import signal
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from ..config import Config
from ..data.datasets import PatchDataset, SliceDataset, make_loader, place_on_device
from ..data.pairing import UnpairedSamples, unpaired_slices
from ..errors import ConfigError, MedsynthError
from ..io.atomic import atomic_path, disk_full_error, disk_full_is_one_line, is_disk_full
from ..model.checkpoint import BEST, LATEST, load_checkpoint, save_checkpoint
from ..model.device import PrecisionChoice, pick_device
from ..model.layout import InputLayout
from ..model.memory import BatchBackoff, describe_memory, lr_scale
from ..model.networks import build_model_generator
from ..model.plan import SynthesisPlan
from ..model.synthesis import SynthesisModel
from ..task import Task
from ..viz import comparison_grid, plot_curves
from . import distributed
from .graphs import graphed_step
from .objectives import build_objective, objective_class
from .objectives.base import MASK_ENTRIES
from .precision import decide_training_precision, training_measure
from .setup import RunData
from .validation import Validation

log = logging.getLogger("medsynth")

METRICS_FIELDS = [
    "epoch", "steps", "seconds", "val_seconds", "io_seconds", "slices_per_s", "lr",
    "loss_critic", "loss_adv", "loss_l1", "val_psnr", "val_ssim", "val_mae",
    "loss_nll",  # model.predict_scale: the Laplace likelihood (engine/objectives/pix2pix.py)
    "partial",  # "k/n": an epoch the time budget ended after k of its n steps (empty for whole epochs)
]  # fmt: skip


def metrics_fields(loss_names: tuple[str, ...]) -> list[str]:
    """metrics.csv's columns: :data:`METRICS_FIELDS`, then any loss of the run's objective not among them."""
    return METRICS_FIELDS + [name for name in loss_names if name not in METRICS_FIELDS]


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


class Trainer:
    """Train a generator with an objective on a prepared run; ``fit()`` is resumable at any step."""

    def __init__(
        self, config: Config, task: Task, data: RunData, run_dir: Path, *, quiet: bool = False
    ) -> None:
        self.config, self.task, self.data, self.run_dir = config, task, data, run_dir
        #: The torchrun job (one process without torchrun): rank 0 alone validates and writes.
        self.dist = distributed.current()
        self.quiet = quiet or not self.dist.is_main
        train = config.train
        if train.num_threads:  # the machine's threads, shared by the processes torchrun put on it
            torch.set_num_threads(max(1, train.num_threads // self.dist.local_world_size))
        torch.manual_seed(train.seed)
        objective_class(train.objective).check_config(config)  # before any data or network is built
        self.device = self.dist.device(pick_device(train.device))
        self.spatial_dims = config.model.spatial_dims

        self.dataset = self._make_dataset()
        if len(self.dataset) == 0:
            raise MedsynthError(
                "no training slices with foreground; check the data with `medsynth data check`"
            )
        layout = InputLayout(
            tuple(task.modalities if task.is_unified else task.sources), config.data.context, task.is_unified
        )
        self.generator, generator_spec = build_model_generator(config.model, layout.channels)
        self.generator = self.dist.sync_batchnorm(self.generator, self.device)
        self.generator.to(self.device)
        #: Precision and memory format: measured on this network where the CPU has a bf16 unit.
        self.precision = self._decide_precision(layout.channels)
        channels_last = torch.channels_last if self.spatial_dims == 2 else torch.channels_last_3d
        self.memory_format = channels_last if self.precision.channels_last else torch.contiguous_format
        self.generator.to(memory_format=self.memory_format)
        self.plan = SynthesisPlan(
            task=task, generator=generator_spec, spatial_dims=self.spatial_dims, axis=config.data.axis,
            context=config.data.context, window=self.window, sliding_overlap=config.data.sliding_overlap,
            precision=self.precision.precision,
        )  # fmt: skip
        # Validation runs the very object inference loads from the checkpoint, on the live generator.
        self.model = SynthesisModel(
            self.plan,
            self.generator,
            data.fingerprint,
            device=self.device,
            precision=self.precision,
        )
        betas = (train.beta1, train.beta2)
        self.opt_g = torch.optim.Adam(
            self.generator.parameters(), lr=train.lr_generator, betas=betas, fused=self.device.type == "cuda",
            capturable=train.cuda_graphs and self.device.type == "cuda",  # a CUDA graph steps it on the GPU
        )  # fmt: skip
        # Under torchrun the step trains through DDP; state dicts and validation use the bare module.
        forward = self.dist.wrap(self.generator, self.device)
        forward = torch.compile(forward) if train.compile else forward
        self.objective = build_objective(
            train.objective, config=config, generator=forward, in_channels=layout.channels,
            optimizer=self.opt_g, device=self.device, memory_format=self.memory_format,
            precision=self.plan.precision, distributed=self.dist, plan=self.plan,
        )  # fmt: skip
        #: metrics.csv's columns: the shared ones and this objective's losses.
        self.metrics_fields = metrics_fields(self.objective.loss_names)
        #: Inference models of the other directions the objective trains (a reverse generator).
        self.direction_models = [
            SynthesisModel(plan, module, data.fingerprint, device=self.device, precision=self.precision)
            for plan, module in self.objective.directions()
        ]
        self.validation = Validation(
            task, data.cohort, self.model, self.direction_models, config.train.inference_batch_size,
            quiet=self.quiet,
        )  # fmt: skip
        self._seed_rank(0)
        #: Steps between agreements on the clock and on signals (a CUDA all-reduce waits for the GPU).
        self._sync_every = 8 if self.dist.backend == "nccl" else 1
        self.optimizers = [self.opt_g, *self.objective.optimizers]
        for optimizer in self.optimizers:
            for group in optimizer.param_groups:
                group.setdefault("initial_lr", group["lr"])
        # CUDA: slices resident on the GPU (else pinned host batches); a CPU run is unchanged.
        place_on_device(self.dataset, self.device, resident=train.data_on_device)
        if train.cuda_graphs and self.dist.enabled and self.device.type == "cuda":
            # DDP's gradient all-reduce inside a captured graph is not supported here (yet).
            raise ConfigError("train.cuda_graphs does not combine with torchrun; set train.cuda_graphs=false")
        #: The objective's step, captured in a CUDA graph with train.cuda_graphs on CUDA (engine/graphs.py).
        self._step = graphed_step(self.objective.step, self.optimizers, self.device, enabled=self._graphs)
        self.loader = make_loader(
            self.dataset, train.batch_size, shuffle=True, seed=train.seed, drop_last=True,
            rank=self.dist.rank, world_size=self.dist.world_size,
        )  # fmt: skip
        self.epoch = 0
        self.step_in_epoch = 0
        self.global_step = 0
        #: The time budget's clock: seconds of fit() in earlier sessions of this run, plus this session's.
        self._elapsed_at_start = 0.0
        self._session_start = time.perf_counter()
        self.stopped_by_budget = False
        #: Steps of the epoch being trained (set by _train_epoch); fewer trained means a partial epoch.
        self._epoch_batches = 0
        self._resumed_epoch: int | None = None
        self.best: dict[str, Any] = {"metric": train.best_metric, "value": None, "epoch": None}
        self.stats = EpochStats()
        self._running: dict[str, torch.Tensor] = {}
        self._running_steps = 0
        self._stop_signal: int | None = None
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="medsynth-writer")
        self._pending: list[Future] = []
        self._val_seconds = 0.0
        self.samples: list[Any] = []

    def _make_dataset(self) -> SliceDataset | PatchDataset | UnpairedSamples:
        """2D/2.5D slices, or foreground-weighted random 3D patches; paired, or drawn without pairs."""
        data, task = self.config.data, self.task
        crop = tuple(data.crop_size) if data.crop_size else None
        if data.pairing == "unpaired":
            if task.is_unified or len(task.sources) != 1:
                raise ConfigError(f"data.pairing=unpaired draws one source and one target; {task} has more")
            if self.spatial_dims == 3:
                raise ConfigError(
                    "data.pairing=unpaired draws 2D/2.5D slices; set model.spatial_dims=2 (or train 3D on pairs)"
                )
            return unpaired_slices(
                self.data.cohort, self.data.splits["train"], task.sources[0], str(task.target),
                context=data.context, crop_size=crop, axis=data.axis, min_foreground=data.min_foreground,
                seed=self.config.train.seed,
            )  # fmt: skip
        if self.spatial_dims == 3:
            if task.is_unified:
                raise MedsynthError("unified synthesis is 2D/2.5D only; set model.spatial_dims=2")
            if data.context != 1:
                raise MedsynthError("data.context (2.5D) applies to 2D models; a 3D model sees the volume")
            try:
                return PatchDataset(
                    self.data.cohort, self.data.splits["train"], task.sources, str(task.target),
                    patch_size=crop or (64, 64, 64), samples_per_epoch=data.patches_per_epoch,
                    seed=self.config.train.seed, foreground_fraction=data.foreground_fraction,
                )  # fmt: skip
            except ConfigError as exc:  # users set the patch as data.crop_size
                raise ConfigError(f"data.crop_size: {exc}") from exc
        return SliceDataset(
            self.data.cohort, self.data.splits["train"], task.sources, task.target,
            context=data.context, crop_size=crop, unified_modalities=task.modalities or None, axis=data.axis,
            min_foreground=data.min_foreground, seed=self.config.train.seed,
            unified_subsets=data.unified_subsets,
            target_stack="target_stack" in objective_class(self.config.train.objective).inputs,
        )  # fmt: skip

    #: ``train.cuda_graphs`` was asked of an objective whose step cannot be captured (said once).
    _graphs_refused = False

    @property
    def _graphs(self) -> bool:
        """``train.cuda_graphs``, where the objective's step can be captured (said once when not)."""
        wanted = self.config.train.cuda_graphs
        if wanted and not self.objective.capturable and not self._graphs_refused:
            self._graphs_refused = True
            log.warning(
                "train.cuda_graphs: the %s objective's step cannot be captured in a CUDA graph; it runs eagerly",
                self.config.train.objective,
            )
        return bool(wanted) and self.objective.capturable

    def _decide_precision(self, in_channels: int) -> PrecisionChoice:
        """The run's precision (engine/precision.py): a CPU with a bf16 unit measures this network."""
        sample = self.dataset[0]
        # One forward pass of a training-sized input first: a network that cannot take the run's slices
        # (a ResViT patch larger than its feature map) is refused before anything is measured or saved.
        with torch.no_grad():
            self.generator.eval()(torch.as_tensor(sample["source"])[None].to(self.device))
        self.generator.train()
        measure = training_measure(
            self.config, self.generator, in_channels, tuple(sample["source"].shape),
            tuple(sample["target"].shape), self.device,
        )  # fmt: skip
        return decide_training_precision(self.config, self.run_dir, self.device, self.dist, measure)

    @property
    def window(self) -> tuple[int, ...] | None:
        """The training crop (2D) or patch (3D) size, recorded in the plan for inference."""
        size = getattr(self.dataset, "crop_size", None) or getattr(self.dataset, "patch_size", None)
        return tuple(int(s) for s in size) if size else None

    # ----------------------------------------------------------------------------------- state
    def state(self, *, for_inference: bool = False) -> dict[str, Any]:
        """The checkpoint payload: self-describing for inference, complete for resume."""
        payload: dict[str, Any] = {
            "plan": self.plan.to_dict(),
            "generator_state": self.generator.state_dict(),
            "fingerprint": self.data.fingerprint.to_dict(),
            "objective": self.objective.describe(),
            # Further directions the objective trains (a reverse generator), each served by --target.
            "directions": [
                {"plan": plan.to_dict(), "generator_state": module.state_dict()}
                for plan, module in self.objective.directions()
            ],
            "data": {
                "fingerprint_digest": self.data.fingerprint.digest(),
                "splits": self.data.splits,
                "pairing": self.config.data.pairing,
            },  # fmt: skip
            "config": self.config.to_dict(),
            "distributed": self.distributed_info(),
            "epoch": self.epoch,
            "global_step": self.global_step,
            "best": dict(self.best),
            #: True once the run has spent its epochs or its time budget (``medsynth demo`` skips it then).
            "finished": self.epoch >= self.config.train.total_epochs or self.stopped_by_budget,
        }
        if for_inference:
            return payload
        self._absorb_losses()
        payload.update(
            objective_state=self.objective.state_dict(),
            optimizer_generator=self.opt_g.state_dict(),
            step_in_epoch=self.step_in_epoch,
            epoch_stats=self.stats.to_dict(),
            elapsed_seconds=self._clock(),
            rng={"torch": torch.get_rng_state(), "cuda": _cuda_rng_states()},
        )
        return payload

    def resume(self, path: Path) -> None:
        """Restore weights, optimisers, counters, clock and RNG state from ``checkpoint_latest.pt``."""
        state = load_checkpoint(path)
        saved = SynthesisPlan.from_checkpoint(state, str(path))
        if saved.task != self.task:
            raise MedsynthError(f"the run in {path.parent} trains {saved.task}, not {self.task}")
        try:
            self.generator.load_state_dict(state["generator_state"])
            for (_plan, module), saved in zip(
                self.objective.directions(), state.get("directions", []), strict=True
            ):
                module.load_state_dict(saved["generator_state"])
            self.objective.load_state_dict(state["objective_state"])
            self.opt_g.load_state_dict(state["optimizer_generator"])
        except (KeyError, RuntimeError, ValueError) as exc:
            raise MedsynthError(
                f"checkpoint_latest.pt does not match this recipe ({exc.__class__.__name__}); "
                "resume with the run's own config.yaml",
                path,
            ) from exc
        self.epoch, self.step_in_epoch = state["epoch"], state["step_in_epoch"]
        self.global_step, self.best = state["global_step"], state["best"]
        self._elapsed_at_start = float(state.get("elapsed_seconds", 0.0))
        saved_world = state.get("distributed", {"world_size": 1, "batch_size_per_process": None})
        if saved_world["world_size"] != self.dist.world_size and self.step_in_epoch:
            # Samples of this epoch already trained, in the order every world size shares.
            seen = self.step_in_epoch * (
                saved_world["batch_size_per_process"] or self.config.train.batch_size
            )
            seen *= saved_world["world_size"]
            self.step_in_epoch = seen // (self.config.train.batch_size * self.dist.world_size)
            log.info(
                "the checkpoint was written by %d processes, this job has %d: resuming at step %d of "
                "epoch %d (%d samples already trained)",
                saved_world["world_size"], self.dist.world_size, self.step_in_epoch, self.epoch + 1, seen,
            )  # fmt: skip
        stats = state["epoch_stats"]
        self.stats = EpochStats(stats["steps"], stats["slices"], stats["seconds"], dict(stats["sums"]))
        torch.set_rng_state(state["rng"]["torch"])
        if state["rng"]["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])
        self._seed_rank(self.global_step)
        #: metrics.csv rows after this epoch are dropped once training goes on (fit), not before: a
        #: resume with nothing to train keeps the record of a partial epoch.
        self._resumed_epoch = self.epoch

    def _seed_rank(self, step: int) -> None:
        """Ranks other than 0 draw their own random numbers (dropout), from (seed, rank, step)."""
        if self.dist.rank:
            seed = np.random.SeedSequence([self.config.train.seed, self.dist.rank, step]).generate_state(1)
            torch.manual_seed(int(seed[0]))

    def distributed_info(self) -> dict[str, Any]:
        """The job that trains: processes, per-process and effective batch, learning rates.

        The rule: ``train.batch_size`` and the learning rates are per process and are not rescaled, so
        the effective batch is ``batch_size x world_size`` at the recipe's learning rates.
        """
        train = self.config.train
        return {
            "world_size": self.dist.world_size,
            "backend": self.dist.backend,
            "batch_size_per_process": train.batch_size,
            "effective_batch_size": train.batch_size * self.dist.world_size,
            "lr_generator": train.lr_generator,
            "lr_critic": train.lr_critic,
            "lr_rule": "per-process batch and learning rates as given (no scaling)",
        }

    def save_latest(self, *, background: bool = False) -> None:
        if not self.dist.is_main:
            return
        payload = self.state()
        if background:
            self._submit(save_checkpoint, _host_copy(payload), self.run_dir / LATEST)
        else:
            save_checkpoint(payload, self.run_dir / LATEST)

    # ------------------------------------------------------------------------------------ loop
    @property
    def budget_seconds(self) -> float | None:
        minutes = self.config.train.max_minutes
        return None if minutes is None else 60.0 * minutes

    def fit(self) -> dict[str, Any]:
        """Train until the configured epochs or the time budget are spent, validating at the cadence."""
        total = self.config.train.total_epochs
        writer = _tensorboard(self.run_dir / "tensorboard") if self.dist.is_main else None
        previous = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
        self._session_start = time.perf_counter()
        already_spent = self._budget_spent()
        resume_hint = f"free some space and continue with: medsynth train --resume {self.run_dir}"
        if self._resumed_epoch is not None and not already_spent and self.dist.is_main:
            _truncate_metrics(
                self.run_dir / "metrics.csv", self._resumed_epoch, self.metrics_fields
            )  # they are trained again
        try:
            if not already_spent and self.dist.is_main and not (self.run_dir / LATEST).exists():
                # A first checkpoint before the first step: a run stopped by a full disk (or a kill) in
                # its first epoch still has one to resume from, and a disk too full for one fails now.
                self.save_latest()
            while self.epoch < total and not self.stopped_by_budget:
                self._train_epoch_in_memory(total)
                if self._stop_signal is not None:
                    self._drain()
                    self.save_latest()
                    name = signal.Signals(self._stop_signal).name
                    if self.dist.is_main:
                        print(
                            f"stopped by {name} at epoch {self.epoch + 1}, step {self.step_in_epoch}; "
                            f"{self.run_dir / LATEST} saved; continue with: medsynth train --resume {self.run_dir}",
                            flush=True,
                        )
                    self.dist.barrier()  # the others exit once rank 0's checkpoint is on disk
                    raise SystemExit(128 + self._stop_signal)
                self._check_replicas()
                last = self.epoch + 1 == total or self.stopped_by_budget
                every = self.config.train.val_every
                due = last or (self.epoch + 1) % every == 0
                metrics = self.validate() if due and self.dist.is_main else None
                self._end_epoch(metrics, writer)
                self.dist.barrier()  # while rank 0 validates and writes
            self._drain()
        except (OSError, RuntimeError) as exc:
            if is_disk_full(exc):  # any write of the run: TensorBoard events, figures, logs
                raise disk_full_error(self.run_dir, resume_hint) from exc
            if isinstance(exc, RuntimeError) and distributed.is_peer_failure(exc):
                hint = f"torchrun ... -m medsynth train --resume {self.run_dir}"
                raise distributed.PeerFailure(distributed.peer_failure_message(exc, hint)) from exc
            raise
        finally:
            self._writer.shutdown(wait=True)
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            if writer is not None:
                with disk_full_is_one_line(self.run_dir / "tensorboard", resume_hint):
                    writer.close()
        if self.stopped_by_budget and not self.quiet:
            extend = f"extend it with: medsynth train --resume {self.run_dir} --set train.max_minutes=<more>"
            if already_spent:
                print(
                    f"the time budget (train.max_minutes={self.config.train.max_minutes}) was already "
                    f"spent ({self._clock() / 60:.2f} min trained): nothing trained; {extend}"
                )
            else:
                part = (
                    f" and {self.step_in_epoch} of {self._epoch_batches} steps of epoch {self.epoch + 1}"
                    if self.step_in_epoch
                    else ""
                )
                print(
                    f"stopped by the time budget (train.max_minutes={self.config.train.max_minutes}) after "
                    f"{self.epoch} whole epochs{part}; {extend}"
                )
        return self.best

    def _budget_spent(self) -> bool:
        """Before any step: a resumed run whose budget is spent trains nothing (and validates nothing)."""
        budget = self.budget_seconds
        if budget is None:
            return False
        clock = self.dist.agree(self._clock(), None)[0]  # rank 0's clock on every rank
        if clock < budget:
            return False
        self.stopped_by_budget = True
        return True

    def _on_signal(self, signum: int, _frame: object) -> None:
        self._stop_signal = signum

    def _clock(self) -> float:
        """Seconds of fit() over all sessions of this run."""
        return self._elapsed_at_start + time.perf_counter() - self._session_start

    def lr_factor(self, clock: float | None = None) -> float:
        """pix2pix's schedule: 1, then linear decay; over epochs, or over the time budget's minutes.

        ``clock``: the budget's seconds so far (rank 0's under torchrun, so every rank sets one rate).
        """
        train = self.config.train
        budget = self.budget_seconds
        if budget is None:
            return 1.0 - max(0, self.epoch + 1 - train.epochs) / float(train.decay_epochs + 1)
        constant = train.epochs / float(train.total_epochs)
        progress = min((self._clock() if clock is None else clock) / budget, 1.0)
        if progress < constant or constant >= 1.0:  # decay_epochs=0: constant to the end
            return 1.0
        return max(1.0 - (progress - constant) / (1.0 - constant), 0.01)

    def _set_lr(self, clock: float | None = None) -> float:
        factor = self.lr_factor(clock)
        for optimizer in self.optimizers:
            for group in optimizer.param_groups:
                group["lr"] = group["initial_lr"] * factor
        return self.opt_g.param_groups[0]["lr"]

    def _train_epoch(self, total_epochs: int) -> None:
        train = self.config.train
        self.loader.set_epoch(self.epoch)
        batches = (
            len(self.loader)
            if train.steps_per_epoch is None
            else min(train.steps_per_epoch, len(self.loader))
        )
        self._epoch_batches = batches
        bar = tqdm(
            total=batches, initial=self.step_in_epoch, desc=f"epoch {self.epoch + 1}/{total_epochs}",
            unit="step", disable=True if self.quiet else None, leave=False, dynamic_ncols=True,
        )  # fmt: skip
        budget = self.budget_seconds
        started = time.perf_counter()
        self._set_lr(self.dist.agree(self._clock(), None)[0] if self.dist.enabled else None)
        with bar:
            # Resumed mid-epoch: the batches trained before the stop are skipped, not gathered.
            for index, batch in enumerate(self.loader.batches(self.step_in_epoch), start=self.step_in_epoch):
                if index >= batches:
                    break
                losses = self.train_step(batch)
                self._accumulate(losses)
                self.step_in_epoch += 1
                self.global_step += 1
                self.stats.slices += int(batch["source"].shape[0]) * self.dist.world_size
                clock, stop = self._agree()
                if budget is not None and clock is not None:
                    self._set_lr(clock)
                if not self.quiet and (index % 10 == 0 or index + 1 == batches):  # waits for the device
                    self._absorb_losses()
                    bar.set_postfix(self._postfix(), refresh=False)
                bar.update()
                if stop is not None:
                    self._stop_signal = stop  # a signal to any rank stops every rank at this step
                    break
                every = train.checkpoint_every
                if every and self.global_step % every == 0:
                    self.stats.seconds += time.perf_counter() - started
                    started = time.perf_counter()
                    self.save_latest(background=True)
                if budget is not None and clock is not None and clock >= budget:
                    self.stopped_by_budget = True
                    break
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.stats.seconds += time.perf_counter() - started
        self._absorb_losses()
        if self.dist.enabled:  # metrics.csv reports the mean loss over all ranks' batches
            self.stats.sums = self.dist.mean(self.stats.sums)
            # A signal that reached some ranks after the last agreement must stop all of them here,
            # or they would part ways at the next collective (save and exit vs. validate).
            self._stop_signal = self.dist.agree(self._clock(), self._stop_signal)[1]

    # ------------------------------------------------------------------ out of device memory
    #: An out-of-memory within this many steps of a session's start (or of a smaller batch) halves the
    #: batch; later, it is an error line (the card filled up meanwhile). A CUDA graph is captured at step 4.
    OOM_BACKOFF_STEPS = 8
    #: The smallest training batch the back-off tries.
    OOM_BATCH_FLOOR = 4
    _oom_window_start: int | None = None
    _oom_backoff: BatchBackoff | None = None
    _oom_lrs: tuple[float, float] = (0.0, 0.0)

    def _train_epoch_in_memory(self, total_epochs: int) -> None:
        """:meth:`_train_epoch`; an out-of-memory in the first steps halves the batch and trains on."""
        while True:
            if self._oom_window_start is None:
                self._oom_window_start = self.global_step
            try:
                self._train_epoch(total_epochs)
                return
            except torch.OutOfMemoryError:
                pass
            # Outside the except block: the failed step's tensors are released with its traceback.
            self._smaller_batch()

    def _smaller_batch(self) -> None:
        """Halve the batch (down to :attr:`OOM_BATCH_FLOOR`), scale the learning rates by the recipes'
        ``sqrt(batch / 8)`` rule, record both in config.yaml and the checkpoint, recapture the graph."""
        train, old = self.config.train, self.config.train.batch_size
        assert self._oom_window_start is not None
        fitted = self.global_step - self._oom_window_start
        if self.dist.enabled:  # every process must train one batch size: no back-off under torchrun
            raise MedsynthError(
                f"out of memory at training batch {old} in process {self.dist.rank} ({describe_memory(self.device)}); "
                f"set a smaller batch, e.g. --set train.batch_size={max(old // 2, 1)}"
            )
        if fitted >= self.OOM_BACKOFF_STEPS:
            raise MedsynthError(
                f"out of memory at training batch {old} ({describe_memory(self.device)}) after {fitted} steps "
                f"had fitted (did another process take memory?); continue with: medsynth train --resume "
                f"{self.run_dir} (its first steps halve the batch if the card is still short)"
            )
        if self._oom_backoff is None:
            self._oom_backoff = BatchBackoff(
                old, floor=self.OOM_BATCH_FLOOR, what="training batch", device=self.device,
                hint="use a smaller model or train.crop_size, free the card, or use one with more memory",
            )  # fmt: skip
            self._oom_lrs = (train.lr_generator, train.lr_critic)
        backoff = self._oom_backoff
        self._step = None  # type: ignore[assignment]  # a captured graph holds memory of the old shapes
        for optimizer in self.optimizers:
            optimizer.zero_grad(set_to_none=True)
        backoff.shrink()  # frees the cache; an error line at the floor
        new, factor = backoff.batch, lr_scale(old, backoff.batch)
        for optimizer in self.optimizers:
            for group in optimizer.param_groups:
                group["initial_lr"] *= factor
                group["lr"] *= factor
        train.batch_size = new
        train.lr_generator, train.lr_critic = train.lr_generator * factor, train.lr_critic * factor
        # Samples of this epoch already trained stay trained: the loader's order does not depend on the batch.
        self.step_in_epoch = self.step_in_epoch * old // new
        self.loader.batch_size = new
        step = graphed_step(self.objective.step, self.optimizers, self.device, enabled=self._graphs)

        def step_then_report(*batch: Any) -> dict[str, torch.Tensor]:
            losses = step(*batch)
            backoff.settled()  # one log line, at the first step that fits
            return losses

        self._step = step_then_report
        (lr_g, lr_c), total = self._oom_lrs, lr_scale(backoff.failed[0], new)
        backoff.note = (
            f"; learning rates x{total:.2f} by the recipes' sqrt(batch / 8) rule (generator {lr_g:.3g} -> "
            f"{train.lr_generator:.3g}, critic {lr_c:.3g} -> {train.lr_critic:.3g}), recorded in config.yaml"
        )
        self._oom_window_start = self.global_step
        if self.dist.is_main:  # a resumed run trains at the batch that fitted, with its learning rates
            self.config.save(self.run_dir / "config.yaml")
            self.save_latest()

    def _agree(self) -> tuple[float | None, int | None]:
        """(budget clock, stop signal) after a step: this process's, or under torchrun the job's.

        Rank 0's clock and any rank's signal are shared every ``_sync_every`` steps, so all ranks change
        the learning rate and stop at the same step; in between, (None, None).
        """
        if not self.dist.enabled:
            return self._clock(), self._stop_signal
        if self.global_step % self._sync_every:
            return None, None
        return self.dist.agree(self._clock(), self._stop_signal)

    def _check_replicas(self) -> None:
        """Every rank must hold the same weights after an epoch; a difference is a bug, said at once."""
        if not self.dist.enabled:
            return
        modules = [self.generator, *self.objective.modules]
        checksum = (
            torch.stack([p.detach().double().sum() for m in modules for p in m.parameters()]).sum().item()
        )
        if not self.dist.same_on_all(checksum):
            raise MedsynthError(
                f"the training processes hold different weights after epoch {self.epoch + 1}; "
                "this is a bug in medsynth's distributed training, please report it"
            )

    def train_step(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """One step of the objective on the batch entries it takes; returns its losses (detached, on the device)."""
        masked = self.config.train.masked_l1
        inputs: list[torch.Tensor | None] = []
        for name in self.objective.inputs:
            value = batch.get(name)
            if value is None or (name in MASK_ENTRIES and not masked):
                inputs.append(None)
            elif name in MASK_ENTRIES:
                inputs.append(value.to(self.device, non_blocking=True))
            else:
                inputs.append(
                    value.to(self.device, non_blocking=True).contiguous(memory_format=self.memory_format)
                )
        return self._step(*inputs)

    def _accumulate(self, losses: dict[str, torch.Tensor]) -> None:
        for key, value in losses.items():
            self._running[key] = self._running[key] + value if key in self._running else value.float()
        self._running_steps += 1

    def _absorb_losses(self) -> None:
        """Move the device-side loss sums into the epoch statistics (one host transfer)."""
        if not self._running_steps:
            return
        keys = list(self._running)
        values = torch.stack([self._running[k] for k in keys]).tolist()
        self.stats.add(dict(zip(keys, values, strict=True)), self._running_steps)
        self._running, self._running_steps = {}, 0

    def _postfix(self) -> dict[str, str]:
        postfix = {k.removeprefix("loss_"): f"{v:.3f}" for k, v in self.stats.means().items()}
        postfix["job"] = self._job_progress()
        return postfix

    def _job_progress(self) -> str:
        """Elapsed / remaining time of the whole training job (budget, or an estimate from epochs done)."""
        elapsed = self._clock()
        if self.budget_seconds is not None:
            remaining = max(self.budget_seconds - elapsed, 0.0)
        else:
            total = self.config.train.total_epochs
            done = self.epoch + self.step_in_epoch / max(len(self.loader), 1)
            remaining = elapsed / done * (total - done) if done > 0 else math.nan
        return f"{_mmss(elapsed)} elapsed, {_mmss(remaining)} left"

    # ------------------------------------------------------------------------------ validation
    def validate(self) -> dict[str, float]:
        """Whole-volume synthesis of the validation subjects (:class:`.validation.Validation`)."""
        started = time.perf_counter()
        metrics, self.samples = self.validation.run(
            self.data.splits["val"][: self.config.train.val_subjects or None]
        )
        self.generator.train()
        for model in self.direction_models:
            model.generator.train()
        self._val_seconds = time.perf_counter() - started
        return metrics

    # ---------------------------------------------------------------------------- epoch end
    def _end_epoch(self, metrics: dict[str, float] | None, writer: Any) -> None:
        io_started = time.perf_counter()
        self._check_pending()
        means = self.stats.means()
        validated = metrics is not None
        # The time budget may end an epoch early: it is recorded as partial, and resume completes it.
        partial = self.step_in_epoch < self._epoch_batches
        row: dict[str, Any] = {
            "epoch": self.epoch + 1,
            "steps": self.global_step,
            "seconds": round(self.stats.seconds, 3),
            "val_seconds": round(self._val_seconds if validated else 0.0, 3),
            "slices_per_s": round(self.stats.slices / max(self.stats.seconds, 1e-9), 2),
            "lr": self.opt_g.param_groups[0]["lr"],
            **{k: round(v, 6) for k, v in means.items()},
            **({f"val_{k}": round(v, 6) for k, v in metrics.items()} if validated else {}),
            "partial": f"{self.step_in_epoch}/{self._epoch_batches}" if partial else "",
        }
        improved = validated and self._is_better(metrics[self.config.train.best_metric])
        if improved:
            self.best = {"metric": self.config.train.best_metric, "value": metrics[self.best["metric"]],
                         "epoch": self.epoch + 1, **{f"val_{k}": v for k, v in metrics.items()},
                         "validation": self.validation.kind}  # fmt: skip
        if not partial:
            self.epoch += 1
            self.step_in_epoch = 0
            self.stats = EpochStats()
        # The latest checkpoint first: a failed write of the best one must not cost the resumable state.
        self.save_latest(background=True)
        if improved:
            self._submit(save_checkpoint, _host_copy(self.state(for_inference=True)), self.run_dir / BEST)
        # Main-thread seconds of this epoch end (copies for the writer, metrics, events); disk writes
        # themselves happen in the background while the next epoch trains.
        row["io_seconds"] = round(time.perf_counter() - io_started, 3)
        if self.dist.is_main:
            _append_metrics(self.run_dir / "metrics.csv", row, self.metrics_fields)
        if writer is not None:
            for key, value in row.items():
                if key not in ("epoch", "partial"):
                    writer.add_scalar(key, value, row["epoch"])
        if validated:
            self._submit(self._save_figures, self.samples, row["epoch"])
        if not self.quiet:
            kind = ", round trip" if self.validation.kind == "round trip" else ""
            val = (
                f"val PSNR {metrics['psnr']:.2f} dB  SSIM {metrics['ssim']:.3f}  MAE {metrics['mae']:.4f} "
                f"([-1,1] space, in mask{kind})  "
                if validated
                else ""
            )
            losses = "  ".join(f"{k.removeprefix('loss_')} {v:.4f}" for k, v in means.items())
            tqdm.write(
                f"epoch {row['epoch']:>3}/{self.config.train.total_epochs}  {losses}  {val}"
                f"{row['slices_per_s']:.0f} slices/s  train {row['seconds']:.1f} s / val {row['val_seconds']:.1f} s"
                f" / io {row['io_seconds']:.1f} s  [{self._job_progress()}]"
                + ("  *best" if improved else "")
                + (f"  (partial: {row['partial']} steps, time budget)" if partial else "")
            )

    def _is_better(self, value: float) -> bool:
        if math.isnan(value):
            return False
        best = self.best.get("value")
        if best is None:
            return True
        return value < best if self.config.train.best_metric == "mae" else value > best

    def _save_figures(self, samples: list[Any], epoch: int) -> None:
        """Sample grid of the first validation subject and the learning curves (background thread)."""
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

    # ------------------------------------------------------------------------ background I/O
    def _submit(self, function: Any, *args: Any) -> None:
        self._pending.append(self._writer.submit(function, *args))

    def _check_pending(self) -> None:
        """Surface an error of a finished background write (e.g. a full disk) in the main thread."""
        done = [f for f in self._pending if f.done()]
        self._pending = [f for f in self._pending if not f.done()]
        for future in done:
            future.result()

    def _drain(self) -> None:
        for future in self._pending:
            future.result()
        self._pending = []


def _host_copy(payload: Any) -> Any:
    """A deep copy whose tensors live on the CPU: the background writer must not see later updates."""
    if isinstance(payload, torch.Tensor):
        return payload.detach().to("cpu", copy=True)
    if isinstance(payload, dict):
        return {k: _host_copy(v) for k, v in payload.items()}
    if isinstance(payload, (list, tuple)):
        return type(payload)(_host_copy(v) for v in payload)
    return payload


def _mmss(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    minutes, secs = divmod(int(round(seconds)), 60)
    return f"{minutes}:{secs:02d}"


def _cuda_rng_states() -> list[torch.Tensor]:
    return torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []


def _append_metrics(path: Path, row: dict[str, Any], fields: list[str] = METRICS_FIELDS) -> None:
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


def _truncate_metrics(path: Path, completed_epochs: int, fields: list[str] = METRICS_FIELDS) -> None:
    """Drop rows of epochs after the resumed checkpoint (they will be trained again)."""
    if not path.exists():
        return
    with open(path, newline="", encoding="utf-8") as stream:
        rows = [r for r in csv.DictReader(stream) if int(r["epoch"]) <= completed_epochs]
    with atomic_path(path) as temp, open(temp, "w", newline="", encoding="utf-8") as stream:
        writer = csv.DictWriter(stream, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def _tensorboard(folder: Path) -> Any:
    """TensorBoard event writer, or None when tensorboard is not installed."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # pragma: no cover - tensorboard is a dependency, but keep training without it
        log.warning("tensorboard is not installed; metrics go to metrics.csv only")
        return None
    return SummaryWriter(log_dir=str(folder))
