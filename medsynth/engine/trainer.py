"""The pix2pix training loop: conditional PatchGAN critic, LSGAN + lambda * L1, resumable.

One optimisation step:

1. critic step on ``(source, target)`` (real) vs ``(source, G(source).detach())`` (synthetic);
2. generator step on the least-squares adversarial term plus ``lambda * L1``, with the critic's
   parameters frozen so no critic weight gradients are computed.

Every epoch ends with validation on whole held-out volumes (the same slice-wise synthesis inference
uses), a row in ``metrics.csv``, a sample PNG and ``checkpoint_latest.pt`` (``checkpoint_best.pt`` when the
validation metric improves). SIGTERM/SIGINT finish the current step, save ``checkpoint_latest.pt`` and
exit, and ``--resume`` continues at the next step with the same data order and RNG state.
"""

from __future__ import annotations

import csv
import functools
import logging
import math
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from ..config import Config
from ..data.datasets import PatchDataset, SliceDataset, make_loader
from ..errors import ConfigError, MedsynthError
from ..inference.slicing import synthesize_slices, unified_planes
from ..inference.sliding import synthesize_patches
from ..io.atomic import atomic_path
from ..losses import GeneratorLoss, LSGANLoss
from ..metrics import mae, psnr, ssim_3d
from ..nets.registry import build_critic, build_generator
from ..task import Task
from ..viz import comparison_grid, plot_curves
from .checkpoint import load_checkpoint, save_checkpoint
from .setup import RunData

log = logging.getLogger("medsynth")

METRICS_FIELDS = [
    "epoch", "steps", "seconds", "slices_per_s", "lr", "loss_critic", "loss_adv", "loss_l1",
    "val_psnr", "val_ssim", "val_mae",
]  # fmt: skip


def pick_device(name: str) -> torch.device:
    """``auto`` means CUDA when present; asking for CUDA without one is a user error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise MedsynthError("--device cuda asked for, but no CUDA device is available; use --device cpu")
    return torch.device(name)


def network_channels(task: Task, context: int) -> int:
    """Generator input channels: image channels, plus availability and target codes when unified."""
    if task.is_unified:
        count = len(task.modalities)
        return count * context + 2 * count
    return len(task.sources) * context


@dataclass
class EpochStats:
    """Running sums for the epoch summary; part of the checkpoint so a resumed epoch reports whole."""

    steps: int = 0
    slices: int = 0
    seconds: float = 0.0
    sums: dict[str, float] = field(
        default_factory=lambda: {"loss_critic": 0.0, "loss_adv": 0.0, "loss_l1": 0.0}
    )

    def add(self, batch_size: int, seconds: float, **losses: float) -> None:
        self.steps += 1
        self.slices += batch_size
        self.seconds += seconds
        for key, value in losses.items():
            self.sums[key] += value

    def means(self) -> dict[str, float]:
        return {key: value / max(self.steps, 1) for key, value in self.sums.items()}

    def to_dict(self) -> dict[str, Any]:
        return {"steps": self.steps, "slices": self.slices, "seconds": self.seconds, "sums": dict(self.sums)}


class Trainer:
    """Train a generator/critic pair on a prepared run; ``fit()`` is resumable at any step."""

    def __init__(
        self, config: Config, task: Task, data: RunData, run_dir: Path, *, quiet: bool = False
    ) -> None:
        self.config, self.task, self.data, self.run_dir, self.quiet = config, task, data, run_dir, quiet
        train = config.train
        if train.num_threads:
            torch.set_num_threads(train.num_threads)
        torch.manual_seed(train.seed)
        self.device = pick_device(train.device)
        self.amp = train.amp and self.device.type == "cuda"
        channels_last = torch.channels_last if config.model.spatial_dims == 2 else torch.channels_last_3d
        self.memory_format = channels_last if train.channels_last else torch.contiguous_format

        context = config.data.context
        self.in_channels = network_channels(task, context)
        self.generator = build_generator(
            config.model.generator,
            spatial_dims=config.model.spatial_dims,
            in_channels=self.in_channels,
            out_channels=1,
            **config.model.generator_args,
        )
        self.critic = build_critic(
            config.model.critic,
            spatial_dims=config.model.spatial_dims,
            in_channels=self.in_channels + 1,
            **config.model.critic_args,
        )
        if config.model.generator_weights:
            if not hasattr(self.generator, "load_pretrained"):
                raise ConfigError(
                    f"model.generator_weights: the {config.model.generator} generator has no initialisation from a file; use resvit"
                )
            self.generator.load_pretrained(config.model.generator_weights)
        self.generator.to(self.device, memory_format=self.memory_format)
        self.critic.to(self.device, memory_format=self.memory_format)
        self.use_critic = train.adversarial_weight > 0
        betas = (train.beta1, train.beta2)
        self.opt_g = torch.optim.Adam(self.generator.parameters(), lr=train.lr_generator, betas=betas)
        self.opt_d = torch.optim.Adam(self.critic.parameters(), lr=train.lr_critic, betas=betas)
        decay = lambda epoch: _linear_decay(epoch, train.epochs, train.decay_epochs)  # noqa: E731
        self.sched_g = torch.optim.lr_scheduler.LambdaLR(self.opt_g, decay)
        self.sched_d = torch.optim.lr_scheduler.LambdaLR(self.opt_d, decay)
        self.generator_loss = GeneratorLoss(train.lambda_l1, train.adversarial_weight)
        self.forward_g: nn.Module = torch.compile(self.generator) if train.compile else self.generator
        self.forward_d: nn.Module = torch.compile(self.critic) if train.compile else self.critic

        self.spatial_dims = config.model.spatial_dims
        self.dataset = self._make_dataset()
        if len(self.dataset) == 0:
            raise MedsynthError(
                "no training slices with foreground; check the data with `medsynth data check`"
            )
        self.loader = make_loader(
            self.dataset, train.batch_size, shuffle=True, seed=train.seed, drop_last=True
        )
        self.epoch = 0
        self.step_in_epoch = 0
        self.global_step = 0
        self.best: dict[str, Any] = {"metric": train.best_metric, "value": None, "epoch": None}
        self.stats = EpochStats()
        self._stop_signal: int | None = None

    def _make_dataset(self) -> SliceDataset | PatchDataset:
        """2D/2.5D slices, or foreground-weighted random 3D patches."""
        data, task = self.config.data, self.task
        crop = tuple(data.crop_size) if data.crop_size else None
        if self.spatial_dims == 3:
            if task.is_unified:
                raise MedsynthError("unified synthesis is 2D/2.5D only; set model.spatial_dims=2")
            if data.context != 1:
                raise MedsynthError("data.context (2.5D) applies to 2D models; a 3D model sees the volume")
            try:
                return PatchDataset(
                    self.data.cohort, self.data.splits["train"], task.sources, str(task.target),
                    patch_size=crop or (64, 64, 64), samples_per_epoch=data.patches_per_epoch,
                    seed=self.config.train.seed,
                )  # fmt: skip
            except ConfigError as exc:  # users set the patch as data.crop_size
                raise ConfigError(f"data.crop_size: {exc}") from exc
        return SliceDataset(
            self.data.cohort, self.data.splits["train"], task.sources, task.target,
            context=data.context, crop_size=crop, unified_modalities=task.modalities or None, axis=data.axis,
            min_foreground=data.min_foreground, seed=self.config.train.seed,
        )  # fmt: skip

    @property
    def window(self) -> list[int] | None:
        """The training crop (2D) or patch (3D) size, recorded for inference."""
        size = getattr(self.dataset, "crop_size", None) or getattr(self.dataset, "patch_size", None)
        return [int(s) for s in size] if size else None

    # ----------------------------------------------------------------------------------- state
    def state(self, *, for_inference: bool = False) -> dict[str, Any]:
        """The checkpoint payload: self-describing for inference, complete for resume."""
        payload: dict[str, Any] = {
            "task": self.task.to_dict(),
            "generator": {"name": self.config.model.generator, "init_args": self.generator.init_args},
            "critic": {"name": self.config.model.critic, "init_args": self.critic.init_args},
            "generator_state": self.generator.state_dict(),
            "fingerprint": self.data.fingerprint.to_dict(),
            "slicing": {
                "spatial_dims": self.config.model.spatial_dims,
                "axis": self.config.data.axis,
                "context": self.config.data.context,
                "crop_size": self.window,
                "unified_modalities": list(self.task.modalities),
                "sliding_overlap": self.config.data.sliding_overlap,
            },
            "data": {"fingerprint_digest": self.data.fingerprint.digest(), "splits": self.data.splits},
            "config": self.config.to_dict(),
            "epoch": self.epoch,
            "global_step": self.global_step,
            "best": dict(self.best),
        }
        if for_inference:
            return payload
        payload.update(
            critic_state=self.critic.state_dict(),
            optimizer_generator=self.opt_g.state_dict(),
            optimizer_critic=self.opt_d.state_dict(),
            scheduler_generator=self.sched_g.state_dict(),
            scheduler_critic=self.sched_d.state_dict(),
            step_in_epoch=self.step_in_epoch,
            epoch_stats=self.stats.to_dict(),
            rng={"torch": torch.get_rng_state(), "cuda": _cuda_rng_states()},
        )
        return payload

    def resume(self, path: Path) -> None:
        """Restore weights, optimisers, schedulers, counters and RNG state from ``checkpoint_latest.pt``."""
        state = load_checkpoint(path)
        if Task.from_dict(state["task"]) != self.task:
            raise MedsynthError(
                f"the run in {path.parent} trains {Task.from_dict(state['task'])}, not {self.task}"
            )
        self.generator.load_state_dict(state["generator_state"])
        self.critic.load_state_dict(state["critic_state"])
        self.opt_g.load_state_dict(state["optimizer_generator"])
        self.opt_d.load_state_dict(state["optimizer_critic"])
        self.sched_g.load_state_dict(state["scheduler_generator"])
        self.sched_d.load_state_dict(state["scheduler_critic"])
        self.epoch, self.step_in_epoch = state["epoch"], state["step_in_epoch"]
        self.global_step, self.best = state["global_step"], state["best"]
        stats = state["epoch_stats"]
        self.stats = EpochStats(stats["steps"], stats["slices"], stats["seconds"], dict(stats["sums"]))
        torch.set_rng_state(state["rng"]["torch"])
        if state["rng"]["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])
        _truncate_metrics(self.run_dir / "metrics.csv", self.epoch)

    def save_latest(self) -> None:
        save_checkpoint(self.state(), self.run_dir / "checkpoint_latest.pt")

    # ------------------------------------------------------------------------------------ loop
    def fit(self) -> dict[str, Any]:
        """Train to the configured number of epochs (from wherever the run stands) and validate."""
        total = self.config.train.total_epochs
        writer = _tensorboard(self.run_dir / "tensorboard")
        previous = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            while self.epoch < total:
                self._train_epoch(total)
                if self._stop_signal is not None:
                    self.save_latest()
                    raise SystemExit(128 + self._stop_signal)
                metrics = self.validate()
                self._end_epoch(metrics, writer)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            if writer is not None:
                writer.close()
        return self.best

    def _on_signal(self, signum: int, _frame: object) -> None:
        self._stop_signal = signum

    def _train_epoch(self, total_epochs: int) -> None:
        train = self.config.train
        self.loader.set_epoch(self.epoch)
        batches = (
            len(self.loader)
            if train.steps_per_epoch is None
            else min(train.steps_per_epoch, len(self.loader))
        )
        bar = tqdm(
            total=batches, initial=self.step_in_epoch, desc=f"epoch {self.epoch + 1}/{total_epochs}",
            unit="step", disable=True if self.quiet else None, leave=False, dynamic_ncols=True,
        )  # fmt: skip
        with bar:
            for index, batch in enumerate(self.loader):
                if index < self.step_in_epoch:
                    continue  # resumed mid-epoch: these batches were trained before the stop
                if index >= batches:
                    break
                started = time.perf_counter()
                losses = self.train_step(batch)
                self.step_in_epoch += 1
                self.global_step += 1
                self.stats.add(batch["source"].shape[0], time.perf_counter() - started, **losses)
                bar.set_postfix(
                    {k.removeprefix("loss_"): f"{v:.3f}" for k, v in losses.items()}, refresh=False
                )
                bar.update()
                every = train.checkpoint_every
                if self._stop_signal is not None:
                    return
                if every and self.global_step % every == 0:
                    self.save_latest()

    def train_step(self, batch: dict[str, torch.Tensor]) -> dict[str, float]:
        """One critic step and one generator step; returns the batch's losses."""
        source = (
            batch["source"].to(self.device, non_blocking=True).contiguous(memory_format=self.memory_format)
        )
        target = (
            batch["target"].to(self.device, non_blocking=True).contiguous(memory_format=self.memory_format)
        )
        mask = batch["mask"].to(self.device, non_blocking=True) if self.config.train.masked_l1 else None
        with self._autocast():
            synthetic = self.forward_g(source)
        loss_critic = torch.zeros((), device=self.device)
        if self.use_critic:
            self.critic.requires_grad_(True)
            with self._autocast():
                real_score = self.forward_d(torch.cat([source, target], dim=1))
                fake_score = self.forward_d(torch.cat([source, synthetic.detach()], dim=1))
                loss_critic = LSGANLoss.critic(real_score, fake_score)
            self.opt_d.zero_grad(set_to_none=True)
            loss_critic.backward()
            self.opt_d.step()
            # The generator step needs gradients through the critic, not of its weights.
            self.critic.requires_grad_(False)
        with self._autocast():
            fake_scores = self.forward_d(torch.cat([source, synthetic], dim=1)) if self.use_critic else None
            terms = self.generator_loss(fake_scores, synthetic.float(), target, mask)
        self.opt_g.zero_grad(set_to_none=True)
        terms.total.backward()
        self.opt_g.step()
        # One device-to-host transfer per step for the three logged numbers.
        losses = torch.stack([loss_critic.detach(), terms.adversarial, terms.l1]).tolist()
        return dict(zip(("loss_critic", "loss_adv", "loss_l1"), losses, strict=True))

    def _autocast(self) -> Any:
        # bf16 on CUDA needs no gradient scaler; on CPU, fp32 is faster than emulated bf16 here.
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=self.amp)

    # ------------------------------------------------------------------------------ validation
    def validate(self) -> dict[str, float]:
        """Whole-volume synthesis of the validation subjects; PSNR/SSIM/MAE inside the foreground mask.

        Intensity space: normalised [-1, 1] (data range 2), the space the network is trained in.
        """
        subject_ids = self.data.splits["val"][: self.config.train.val_subjects or None]
        scores: dict[str, list[float]] = {"psnr": [], "ssim": [], "mae": []}
        self.samples = []
        for subject_id in subject_ids:
            for target, prediction, truth, mask, inputs in self.synthesize_subject(subject_id):
                scores["psnr"].append(psnr(prediction, truth, mask=mask, data_range=2.0))
                scores["ssim"].append(ssim_3d(prediction, truth, mask=mask, data_range=2.0))
                scores["mae"].append(mae(prediction, truth, mask=mask, data_range=2.0))
                if len(self.samples) < 1:
                    self.samples.append((inputs, prediction, truth, mask, target))
        self.generator.train()
        return {key: float(np.mean(values)) if values else math.nan for key, values in scores.items()}

    def synthesize_subject(self, subject_id: str):
        """Yield (target, synthetic, truth, mask, inputs) slice-first normalised arrays for one subject.

        A unified model is scored on every modality of the subject from all the others.
        """
        cached = self.data.cohort.subject(subject_id)
        mask = np.asarray(cached.mask, dtype=bool)
        context = self.config.data.context
        synthesize = functools.partial(
            synthesize_slices,
            self.generator,
            context=context,
            batch_size=self.config.train.inference_batch_size,
            device=self.device,
            amp=self.amp,
            window=self.window,
        )
        if self.spatial_dims == 3:
            # The cache is slice-first (k, i, j); 3D networks work on (i, j, k).
            to_volume = lambda a: np.ascontiguousarray(np.transpose(a, (1, 2, 0)))  # noqa: E731
            to_slices = lambda a: np.transpose(a, (2, 0, 1))  # noqa: E731
            inputs = [to_volume(np.asarray(cached.image(m))) for m in self.task.sources]
            prediction = synthesize_patches(
                self.generator, inputs, to_volume(mask), patch_size=self.window,
                overlap=self.config.data.sliding_overlap, batch_size=self.config.train.inference_batch_size,
                device=self.device,
            )  # fmt: skip
            yield (
                self.task.target,
                to_slices(prediction),
                np.asarray(cached.image(self.task.target)),
                mask,
                [to_slices(a) for a in inputs],
            )
            return
        if not self.task.is_unified:
            inputs = [np.asarray(cached.image(m)) for m in self.task.sources]
            prediction = synthesize(inputs, mask)
            yield self.task.target, prediction, np.asarray(cached.image(self.task.target)), mask, inputs
            return
        available = [m for m in self.task.modalities if m in cached.modalities]
        for target in available:
            images = [
                np.asarray(cached.image(m))
                if m in available and m != target
                else np.zeros(mask.shape, np.float32)
                for m in self.task.modalities
            ]
            planes = unified_planes(self.task.modalities, [m for m in available if m != target], target)
            prediction = synthesize(images, mask, planes=planes)
            yield target, prediction, np.asarray(cached.image(target)), mask, images

    # ---------------------------------------------------------------------------- epoch end
    def _end_epoch(self, metrics: dict[str, float], writer: Any) -> None:
        means = self.stats.means()
        row = {
            "epoch": self.epoch + 1,
            "steps": self.global_step,
            "seconds": round(self.stats.seconds, 3),
            "slices_per_s": round(self.stats.slices / max(self.stats.seconds, 1e-9), 2),
            "lr": self.opt_g.param_groups[0]["lr"],
            **{k: round(v, 6) for k, v in means.items()},
            **{f"val_{k}": round(v, 6) for k, v in metrics.items()},
        }
        _append_metrics(self.run_dir / "metrics.csv", row)
        if writer is not None:
            for key, value in row.items():
                if key != "epoch":
                    writer.add_scalar(key, value, self.epoch + 1)
        self._save_samples()
        plot_curves(self.run_dir / "metrics.csv", self.run_dir / "curves.png")
        self.sched_g.step()
        self.sched_d.step()
        improved = self._is_better(metrics[self.config.train.best_metric])
        if improved:
            self.best = {"metric": self.config.train.best_metric, "value": metrics[self.best["metric"]],
                         "epoch": self.epoch + 1, **{f"val_{k}": v for k, v in metrics.items()}}  # fmt: skip
        self.epoch += 1
        self.step_in_epoch = 0
        self.stats = EpochStats()
        if improved:
            save_checkpoint(self.state(for_inference=True), self.run_dir / "checkpoint_best.pt")
        self.save_latest()
        if not self.quiet:
            tqdm.write(
                f"epoch {row['epoch']:>3}/{self.config.train.total_epochs}  "
                f"critic {row['loss_critic']:.3f}  adv {row['loss_adv']:.3f}  L1 {row['loss_l1']:.4f}  "
                f"val PSNR {metrics['psnr']:.2f} dB  SSIM {metrics['ssim']:.3f}  MAE {metrics['mae']:.4f} "
                f"([-1,1] space, in mask)  {row['slices_per_s']:.0f} slices/s"
                + ("  *best" if improved else "")
            )

    def _is_better(self, value: float) -> bool:
        if math.isnan(value):
            return False
        best = self.best.get("value")
        if best is None:
            return True
        return value < best if self.config.train.best_metric == "mae" else value > best

    def _save_samples(self) -> None:
        if not getattr(self, "samples", None):
            return
        inputs, prediction, truth, mask, _target = self.samples[0]
        present = np.flatnonzero(mask.any(axis=(1, 2)))
        if present.size == 0:
            return
        picks = np.linspace(present[0], present[-1], 5)[1:4].astype(int)
        rows = [{"input": inputs[0][k], "synthetic": prediction[k], "target": truth[k]} for k in picks]
        comparison_grid(rows, self.run_dir / "samples" / f"epoch_{self.epoch + 1:03d}.png")


def _linear_decay(epoch: int, constant: int, decay: int) -> float:
    """pix2pix schedule: 1 for ``constant`` epochs, then linearly towards 0 over ``decay`` epochs."""
    return 1.0 - max(0, epoch + 1 - constant) / float(decay + 1)


def _cuda_rng_states() -> list[torch.Tensor]:
    return torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []


def _append_metrics(path: Path, row: dict[str, Any]) -> None:
    new = not path.exists()
    with open(path, "a", newline="", encoding="utf-8") as stream:
        writer = csv.DictWriter(stream, fieldnames=METRICS_FIELDS)
        if new:
            writer.writeheader()
        writer.writerow(row)


def _truncate_metrics(path: Path, completed_epochs: int) -> None:
    """Drop rows of epochs after the resumed checkpoint (they will be trained again)."""
    if not path.exists():
        return
    with open(path, newline="", encoding="utf-8") as stream:
        rows = [r for r in csv.DictReader(stream) if int(r["epoch"]) <= completed_epochs]
    with atomic_path(path) as temp, open(temp, "w", newline="", encoding="utf-8") as stream:
        writer = csv.DictWriter(stream, fieldnames=METRICS_FIELDS)
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
