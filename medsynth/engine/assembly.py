"""Everything a training run is made of, built once before the loop starts.

The loop (:mod:`.trainer`) only trains; what it trains is assembled here from the builders that own
each part: the data set (data layer: paired slices, unpaired draws or 3D patches), the generator
(model home: :func:`~medsynth.model.networks.build_model_generator`), the precision decision
(:mod:`.precision`), the :class:`~medsynth.model.plan.SynthesisPlan` inference will read, the
objective (registry: :mod:`.objectives`), validation (:mod:`.validation`) and the data loader.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..config import Config
from ..data.augment import source_augmentation
from ..data.datasets import PatchDataset, SliceDataset, make_loader, place_on_device
from ..data.pairing import UnpairedSamples, unpaired_slices
from ..errors import ConfigError, MedsynthError
from ..model.device import PrecisionChoice, pick_device
from ..model.layout import InputLayout
from ..model.networks import build_model_generator
from ..model.plan import SynthesisPlan
from ..model.synthesis import SynthesisModel
from ..task import Task
from .distributed import Dist
from .graphs import graphed_step
from .objectives import build_objective, objective_class
from .objectives.base import Objective
from .precision import decide_training_precision, training_measure
from .setup import RunData
from .validation import Validation

log = logging.getLogger("medsynth")

Dataset = SliceDataset | PatchDataset | UnpairedSamples


@dataclass
class TrainingParts:
    """The built run: data, networks, optimisers, objective, validation, and the step to call."""

    device: torch.device
    dataset: Dataset
    generator: torch.nn.Module
    precision: PrecisionChoice
    memory_format: torch.memory_format
    plan: SynthesisPlan
    model: SynthesisModel  #: the live generator behind the very object inference loads
    opt_g: torch.optim.Optimizer
    objective: Objective
    direction_models: list[SynthesisModel]  #: further directions the objective trains (reverse generator)
    validation: Validation
    optimizers: list[torch.optim.Optimizer]
    step: Any  #: the objective's step, captured in a CUDA graph where asked and possible
    loader: Any


def assemble(
    config: Config, task: Task, data: RunData, run_dir: Path, dist: Dist, *, quiet: bool
) -> TrainingParts:
    """Build the run's parts in the order their decisions depend on each other."""
    train = config.train
    objective_class(train.objective).check_config(config)  # before any data or network is built
    device = dist.device(pick_device(train.device))
    dataset = make_dataset(config, task, data)
    if len(dataset) == 0:
        raise MedsynthError("no training slices with foreground; check the data with `medsynth data check`")
    layout = InputLayout(
        tuple(task.modalities if task.is_unified else task.sources), config.data.context, task.is_unified
    )
    generator, generator_spec = build_model_generator(config.model, layout.channels)
    generator = dist.sync_batchnorm(generator, device)
    generator.to(device)
    #: Precision and memory format: measured on this network where the CPU has a bf16 unit.
    precision = decide_precision(config, dataset, generator, layout.channels, device, run_dir, dist)
    channels_last = torch.channels_last if config.model.spatial_dims == 2 else torch.channels_last_3d
    memory_format = channels_last if precision.channels_last else torch.contiguous_format
    generator.to(memory_format=memory_format)
    plan = SynthesisPlan(
        task=task, generator=generator_spec, spatial_dims=config.model.spatial_dims, axis=config.data.axis,
        context=config.data.context, window=training_window(dataset), sliding_overlap=config.data.sliding_overlap,
        precision=precision.precision,
    )  # fmt: skip
    model = SynthesisModel(plan, generator, data.fingerprint, device=device, precision=precision)
    opt_g = torch.optim.Adam(
        generator.parameters(), lr=train.lr_generator, betas=(train.beta1, train.beta2),
        fused=device.type == "cuda",
        capturable=train.cuda_graphs and device.type == "cuda",  # a CUDA graph steps it on the GPU
    )  # fmt: skip
    # Under torchrun the step trains through DDP; state dicts and validation use the bare module.
    forward = dist.wrap(generator, device)
    forward = torch.compile(forward) if train.compile else forward
    objective = build_objective(
        train.objective, config=config, generator=forward, in_channels=layout.channels, optimizer=opt_g,
        device=device, memory_format=memory_format, precision=plan.precision, distributed=dist, plan=plan,
    )  # fmt: skip
    direction_models = [
        SynthesisModel(plan, module, data.fingerprint, device=device, precision=precision)
        for plan, module in objective.directions()
    ]
    validation = Validation(
        task,
        data.cohort,
        model,
        direction_models,
        train.inference_batch_size,
        quiet=quiet or not dist.is_main,
        register_targets=train.register_validation or objective.registers_validation,
    )
    optimizers = [opt_g, *objective.optimizers]
    for optimizer in optimizers:
        for group in optimizer.param_groups:
            group.setdefault("initial_lr", group["lr"])
    # CUDA: slices resident on the GPU (else pinned host batches); a CPU run is unchanged.
    place_on_device(dataset, device, resident=train.data_on_device)
    if train.cuda_graphs and dist.enabled and device.type == "cuda":
        # DDP's gradient all-reduce inside a captured graph is not supported here (yet).
        raise ConfigError("train.cuda_graphs does not combine with torchrun; set train.cuda_graphs=false")
    step = graphed_step(objective.step, optimizers, device, enabled=wants_graphs(config, objective))
    loader = make_loader(
        dataset, train.batch_size, shuffle=True, seed=train.seed, drop_last=True,
        rank=dist.rank, world_size=dist.world_size,
    )  # fmt: skip
    return TrainingParts(
        device=device, dataset=dataset, generator=generator, precision=precision, memory_format=memory_format,
        plan=plan, model=model, opt_g=opt_g, objective=objective, direction_models=direction_models,
        validation=validation, optimizers=optimizers, step=step, loader=loader,
    )  # fmt: skip


def make_dataset(config: Config, task: Task, data: RunData) -> Dataset:
    """2D/2.5D slices, or foreground-weighted random 3D patches; paired, or drawn without pairs."""
    settings, seed = config.data, config.train.seed
    crop = tuple(settings.crop_size) if settings.crop_size else None
    spatial_dims = config.model.spatial_dims
    augmentation = source_augmentation(settings.augment, spatial_dims)
    if settings.pairing == "unpaired":
        if task.is_unified or len(task.sources) != 1:
            raise ConfigError(f"data.pairing=unpaired draws one source and one target; {task} has more")
        if spatial_dims == 3:
            raise ConfigError(
                "data.pairing=unpaired draws 2D/2.5D slices; set model.spatial_dims=2 (or train 3D on pairs)"
            )
        return unpaired_slices(
            data.cohort, data.splits["train"], task.sources[0], str(task.target), context=settings.context,
            crop_size=crop, axis=settings.axis, min_foreground=settings.min_foreground, seed=seed,
            augmentation=augmentation,
        )  # fmt: skip
    if spatial_dims == 3:
        if task.is_unified:
            raise MedsynthError("unified synthesis is 2D/2.5D only; set model.spatial_dims=2")
        if settings.context != 1:
            raise MedsynthError("data.context (2.5D) applies to 2D models; a 3D model sees the volume")
        try:
            return PatchDataset(
                data.cohort, data.splits["train"], task.sources, str(task.target),
                patch_size=crop or (64, 64, 64), samples_per_epoch=settings.patches_per_epoch, seed=seed,
                foreground_fraction=settings.foreground_fraction, augmentation=augmentation,
            )  # fmt: skip
        except ConfigError as exc:  # users set the patch as data.crop_size
            raise ConfigError(f"data.crop_size: {exc}") from exc
    return SliceDataset(
        data.cohort, data.splits["train"], task.sources, task.target, context=settings.context,
        crop_size=crop, unified_modalities=task.modalities or None, axis=settings.axis,
        min_foreground=settings.min_foreground, seed=seed, unified_subsets=settings.unified_subsets,
        target_stack="target_stack" in objective_class(config.train.objective).inputs,
        augmentation=augmentation,
    )  # fmt: skip


def decide_precision(
    config: Config, dataset: Dataset, generator: torch.nn.Module, in_channels: int, device: torch.device,
    run_dir: Path, dist: Dist,
) -> PrecisionChoice:  # fmt: skip
    """The run's precision (:mod:`.precision`): a CPU with a bf16 unit measures this network."""
    sample = dataset[0]
    # One forward pass of a training-sized input first: a network that cannot take the run's slices
    # (a ResViT patch larger than its feature map) is refused before anything is measured or saved.
    with torch.no_grad():
        generator.eval()(torch.as_tensor(sample["source"])[None].to(device))
    generator.train()
    measure = training_measure(
        config, generator, in_channels, tuple(sample["source"].shape), tuple(sample["target"].shape), device
    )
    return decide_training_precision(config, run_dir, device, dist, measure)


def training_window(dataset: Dataset) -> tuple[int, ...] | None:
    """The training crop (2D) or patch (3D) size, recorded in the plan for inference."""
    size = getattr(dataset, "crop_size", None) or getattr(dataset, "patch_size", None)
    return tuple(int(s) for s in size) if size else None


def wants_graphs(config: Config, objective: Objective, *, say_why_not: bool = True) -> bool:
    """``train.cuda_graphs``, where the objective's step can be captured (``say_why_not``: warn when not)."""
    wanted = bool(config.train.cuda_graphs)
    if wanted and not objective.capturable and say_why_not:
        log.warning(
            "train.cuda_graphs: the %s objective's step cannot be captured in a CUDA graph; it runs eagerly",
            config.train.objective,
        )
    return wanted and objective.capturable
