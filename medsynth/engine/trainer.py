"""The training loop: epochs of objective steps, validation at a cadence, events for everything else.

What one step does belongs to the objective (:mod:`.objectives`); what the run is made of is built by
:mod:`.assembly`; everything around the iteration (time budget, learning-rate schedule, signals, batch
back-off, replica checks, checkpoints, ``metrics.csv`` and TensorBoard, figures, progress) is a handler
(:mod:`.handlers`) attached to the loop's events (:mod:`.events`). The loop owns the counters, the
clock, the epoch's loss sums and the job's agreement on clock and stop signal under torchrun.

Losses stay on the device and are read only when logged, so a GPU step never waits for the host.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from ..config import Config
from ..errors import MedsynthError
from ..model.checkpoint import load_checkpoint
from ..model.plan import SynthesisPlan
from ..task import Task
from . import distributed
from .assembly import assemble
from .events import EpochRecord, Handler, Handlers
from .failures import one_line_failures
from .handlers import default_handlers
from .objectives.base import step_inputs
from .setup import RunData
from .stats import DeviceLossSums, EpochStats


class Trainer:
    """Train a generator with an objective on a prepared run; ``fit()`` is resumable at any step.

    ``handlers``: further handlers, fired after the run's own (:func:`.handlers.default_handlers`).
    """

    def __init__(self, config: Config, task: Task, data: RunData, run_dir: Path, *, quiet: bool = False,
                 handlers: list[Handler] | None = None) -> None:  # fmt: skip
        self.config, self.task, self.data, self.run_dir = config, task, data, run_dir
        #: The torchrun job (one process without torchrun): rank 0 alone validates and writes.
        self.dist = distributed.current()
        self.quiet = quiet or not self.dist.is_main
        train = config.train
        if train.num_threads:  # the machine's threads, shared by the processes torchrun put on it
            torch.set_num_threads(max(1, train.num_threads // self.dist.local_world_size))
        torch.manual_seed(train.seed)
        parts = assemble(config, task, data, run_dir, self.dist, quiet=quiet)
        self.device, self.dataset, self.generator = parts.device, parts.dataset, parts.generator
        self.precision, self.memory_format, self.plan = parts.precision, parts.memory_format, parts.plan
        self.model, self.opt_g, self.objective = parts.model, parts.opt_g, parts.objective
        self.direction_models, self.validation = parts.direction_models, parts.validation
        self.optimizers, self.objective_step, self.loader = parts.optimizers, parts.step, parts.loader
        distributed.seed_rank(self.dist, train.seed, 0)
        self.epoch = self.step_in_epoch = self.global_step = 0
        self.epoch_batches = 0  #: steps of the epoch being trained; fewer trained: a partial epoch
        self.resumed_epoch: int | None = None  #: the epoch a resume starts in
        self.best: dict[str, Any] = {"metric": train.best_metric, "value": None, "epoch": None}
        self.stats = EpochStats()
        self.end_requested = False  #: a handler ends the run after this step (the time budget)
        self.stop_signal: int | None = None  #: a signal stops the run after this step
        self.clock_now: float | None = None  #: the job's agreed clock after the last step (None: not agreed)
        self.samples: list[Any] = []  #: the last validation's volumes, for the figures
        self._val_seconds = 0.0
        self._elapsed_before = 0.0  #: seconds of fit() in earlier sessions of this run
        self._session_start = time.perf_counter()
        self._epoch_timer: float | None = None
        self._losses = DeviceLossSums()
        self.handlers = Handlers([*default_handlers(self), *(handlers or [])])

    @property
    def resume_hint(self) -> str:
        return f"free some space and continue with: medsynth train --resume {self.run_dir}"

    def clock(self) -> float:
        """Seconds of fit() over all sessions of this run (the time budget's clock)."""
        return self._elapsed_before + time.perf_counter() - self._session_start

    # ----------------------------------------------------------------------------------- state
    def state(self, *, for_inference: bool = False) -> dict[str, Any]:
        """The checkpoint payload: self-describing for inference, complete for resume (handlers' too)."""
        fingerprint = self.data.fingerprint
        payload: dict[str, Any] = {
            "plan": self.plan.to_dict(), "generator_state": self.generator.state_dict(),
            "fingerprint": fingerprint.to_dict(), "objective": self.objective.describe(),
            # Further directions the objective trains (a reverse generator), each served by --target.
            "directions": [{"plan": plan.to_dict(), "generator_state": module.state_dict()}
                           for plan, module in self.objective.directions()],
            "data": {"fingerprint_digest": fingerprint.digest(), "splits": self.data.splits,
                     "pairing": self.config.data.pairing},
            "config": self.config.to_dict(), "distributed": self.distributed_info(),
            "epoch": self.epoch, "global_step": self.global_step, "best": dict(self.best),
            #: True once the run has spent its epochs or ended early (``medsynth demo`` skips it then).
            "finished": self.epoch >= self.config.train.total_epochs or self.end_requested,
        }  # fmt: skip
        if for_inference:
            return payload
        self.absorb_losses()
        if self._epoch_timer is not None:  # a save mid-epoch: the epoch's seconds so far go with it
            now = time.perf_counter()
            self.stats.seconds, self._epoch_timer = self.stats.seconds + now - self._epoch_timer, now
        payload.update(
            objective_state=self.objective.state_dict(), optimizer_generator=self.opt_g.state_dict(),
            step_in_epoch=self.step_in_epoch, epoch_stats=self.stats.to_dict(), elapsed_seconds=self.clock(),
            rng=distributed.rng_state(), **self.handlers.state_dict(),
        )  # fmt: skip
        return payload

    def resume(self, path: Path) -> None:
        """Restore weights, optimisers, counters, clock, RNG and handler state from ``checkpoint_latest.pt``."""
        state = load_checkpoint(path)
        saved_plan = SynthesisPlan.from_checkpoint(state, str(path))
        if saved_plan.task != self.task:
            raise MedsynthError(f"the run in {path.parent} trains {saved_plan.task}, not {self.task}")
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
                "resume with the run's own config.yaml", path,
            ) from exc  # fmt: skip
        self.epoch, self.global_step, self.best = state["epoch"], state["global_step"], state["best"]
        self.step_in_epoch = distributed.resumed_step(
            state, self.dist, self.config.train.batch_size, self.epoch
        )
        self._elapsed_before = float(state.get("elapsed_seconds", 0.0))
        stats = state["epoch_stats"]
        self.stats = EpochStats(stats["steps"], stats["slices"], stats["seconds"], dict(stats["sums"]))
        distributed.restore_rng(state["rng"])
        distributed.seed_rank(self.dist, self.config.train.seed, self.global_step)
        self.handlers.load_state_dict(state)
        self.resumed_epoch = self.epoch

    def distributed_info(self) -> dict[str, Any]:
        """The job that trains; the rule: batch and learning rates are per process, never rescaled."""
        return distributed.job_info(self.dist, self.config.train)

    # ------------------------------------------------------------------------------------ loop
    def fit(self) -> dict[str, Any]:
        """Train until the configured epochs are spent or a handler ends the run; returns the best."""
        total = self.config.train.total_epochs
        self._session_start = time.perf_counter()
        try:
            with one_line_failures(self.run_dir, self.resume_hint):
                self.handlers.started(self)
                while self.epoch < total and not self.end_requested:
                    self._train_epoch_fitting_memory()
                    if self.stop_signal is not None:
                        self.handlers.stopping(self, self.stop_signal)
                        self.dist.barrier()  # the others exit once rank 0's checkpoint is on disk
                        raise SystemExit(128 + self.stop_signal)
                    due = self.epoch + 1 == total or self.end_requested
                    due = due or (self.epoch + 1) % self.config.train.val_every == 0
                    self._end_epoch(self.validate() if due and self.dist.is_main else None)
                    self.dist.barrier()  # while rank 0 validates and writes
                self.handlers.completed(self)
        finally:
            with one_line_failures(self.run_dir, self.resume_hint):
                self.handlers.closed(self)
        return self.best

    def _train_epoch_fitting_memory(self) -> None:
        """The epoch; an out-of-memory a handler can answer (a smaller batch) trains on from that step."""
        while True:
            try:
                return self._train_epoch()
            except torch.OutOfMemoryError:
                pass
            # Outside the except block: the failed step's tensors are released with its traceback.
            if not self.handlers.out_of_memory(self):
                raise MedsynthError(f"out of memory at training batch {self.config.train.batch_size}")

    def _train_epoch(self) -> None:
        steps = self.config.train.steps_per_epoch
        self.loader.set_epoch(self.epoch)
        self.epoch_batches = len(self.loader) if steps is None else min(steps, len(self.loader))
        self._epoch_timer = time.perf_counter()
        self.handlers.epoch_started(self)
        # Resumed mid-epoch: the batches trained before the stop are skipped, not gathered.
        for index, batch in enumerate(self.loader.batches(self.step_in_epoch), start=self.step_in_epoch):
            if index >= self.epoch_batches:
                break
            self._losses.add(self.train_step(batch))
            self.step_in_epoch += 1
            self.global_step += 1
            self.stats.slices += int(batch["source"].shape[0]) * self.dist.world_size
            self.clock_now, stop = self.dist.agree_every(
                self.dist.agree_interval, self.global_step, self.clock(), self.stop_signal
            )
            if stop is not None:
                self.stop_signal = stop  # a signal to any rank stops every rank at this step
            self.handlers.step_done(self)
            if self.stop_signal is not None or self.end_requested:
                break
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.stats.seconds += time.perf_counter() - self._epoch_timer
        self._epoch_timer = None
        self.absorb_losses()
        if self.dist.enabled:  # metrics.csv reports the mean loss over all ranks' batches
            self.stats.sums = self.dist.mean(self.stats.sums)
            # A signal that reached some ranks after the last agreement must stop all of them here,
            # or they would part ways at the next collective (save and exit vs. validate).
            self.stop_signal = self.dist.agree(self.clock(), self.stop_signal)[1]
        self.handlers.epoch_trained(self)

    def train_step(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """One step of the objective on the batch entries it takes; returns its losses (detached, on the device)."""
        masked = self.config.train.masked_l1
        return self.objective_step(
            *step_inputs(self.objective, batch, self.device, self.memory_format, masked)
        )

    def absorb_losses(self) -> None:
        """Move the device-side loss sums into the epoch statistics (one host transfer)."""
        self._losses.drain_into(self.stats)

    def validate(self) -> dict[str, float]:
        """Whole-volume synthesis of the validation subjects (:class:`.validation.Validation`)."""
        started = time.perf_counter()
        metrics, self.samples = self.validation.run(
            self.data.splits["val"][: self.config.train.val_subjects or None]
        )
        for module in (self.generator, *(model.generator for model in self.direction_models)):
            module.train()
        self._val_seconds = time.perf_counter() - started
        return metrics

    def _end_epoch(self, metrics: dict[str, float] | None) -> None:
        """Record the epoch, advance the counters past it (unless the budget cut it short), fire ``epoch_done``."""
        record = EpochRecord(
            epoch=self.epoch + 1, steps=self.global_step, trained=self.step_in_epoch, batches=self.epoch_batches,
            seconds=self.stats.seconds, slices=self.stats.slices, lr=self.opt_g.param_groups[0]["lr"],
            losses=self.stats.means(), metrics=metrics, val_seconds=self._val_seconds if metrics else 0.0,
        )  # fmt: skip
        if not record.partial:  # a partial epoch (time budget) is completed by --resume
            self.epoch, self.step_in_epoch, self.stats = self.epoch + 1, 0, EpochStats()
        self.handlers.epoch_done(self, record)
