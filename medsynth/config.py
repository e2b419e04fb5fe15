"""Typed run configuration: YAML recipes in ``configs/`` → dataclasses, with dotted overrides.

A recipe is plain YAML with four sections (``task``, ``data``, ``model``, ``train``). Loading is strict:
an unknown key or a value of the wrong type is a :class:`~medsynth.errors.ConfigError` that names the
key, the file and the valid choices, so a typo never silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .engine.objectives.registry import OBJECTIVES, UNPAIRED
from .errors import ConfigError
from .io.atomic import atomic_write_text
from .task import Task

#: Recipes ship inside the package (``medsynth/configs``; the repository's ``configs/`` links there),
#: so an installed wheel finds ``--config demo_cpu`` wherever it runs.
CONFIG_DIR = Path(str(importlib.resources.files("medsynth") / "configs"))
#: ``data.pairing``: ``paired`` samples are aligned source/target slices of one subject; ``unpaired``
#: draws source and target slices independently (other subjects, other positions) and accepts subjects
#: that have only one of them, for objectives that learn without pairs (:data:`UNPAIRED`).
PAIRINGS = ("paired", "unpaired")


@dataclass
class DataConfig:
    """Where the data is and how volumes become training samples."""

    root: str | None = None
    manifest: str | None = None
    #: Shared preprocessed cache; default ``<runs root>/.cache``. Never inside the input tree.
    cache_dir: str | None = None
    #: Slicing axis in canonical RAS: 2 = axial, 1 = coronal, 0 = sagittal.
    axis: int = 2
    #: 2.5D: number of neighbouring slices per source given as channels (odd; 1 = plain 2D).
    context: int = 1
    #: In-plane crop (2D) or patch size (3D); None derives it from the foreground bounding boxes.
    crop_size: list[int] | None = None
    #: Training skips slices with fewer foreground voxels than this: no FLOPs on slices of air.
    min_foreground: int = 32
    #: Validation subjects: a fraction (0.15) or a count (2).
    val: int | float = 0.15
    test: int | float = 0.15
    split_seed: int = 0
    #: A user-provided splits.json (subject ids under "train", "val", "test").
    splits_file: str | None = None
    #: Per-modality normalisation: {"t1": {"scheme": "percentile", "lower_percentile": 0.5, ...}}; schemes
    #: percentile (MR default), histogram (sources from several protocols), zscore, window (CT default).
    normalization: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: Pick one volume of 4D inputs.
    volume_index: int | None = None
    #: 3D only: random patches drawn per epoch.
    patches_per_epoch: int = 64
    #: 3D only: overlap of neighbouring sliding windows at inference (Gaussian-blended), in [0, 1).
    sliding_overlap: float = 0.5
    #: 3D only: share of patch centres drawn on the foreground (head) mask, the rest uniform over the
    #: volume (nnU-Net-style oversampling; 1 = always on the foreground).
    foreground_fraction: float = 1.0
    #: Unified mode: how each sample's available inputs are drawn, ``uniform`` (every non-empty subset
    #: of the other modalities alike) or ``emphasis`` (a third all, a third one, a third uniform).
    unified_subsets: str = "uniform"
    #: ``paired`` (aligned source and target of one subject per sample) or ``unpaired`` (see PAIRINGS).
    pairing: str = "paired"
    #: Per-sample changes of the source images (never the target), as another site's scanner would make
    #: them: null (off), ``robust``, or {intensity, bias, noise, blur: bool, probability} (data/augment.py).
    augment: dict[str, Any] | str | bool | None = None

    def validate(self) -> None:
        if self.pairing not in PAIRINGS:
            raise ConfigError(f"data.pairing must be {' or '.join(PAIRINGS)}, got {self.pairing!r}")
        if self.axis not in (0, 1, 2):
            raise ConfigError(f"data.axis must be 0, 1 or 2, got {self.axis}")
        if self.context < 1 or self.context % 2 == 0:
            raise ConfigError(
                f"data.context must be an odd number >= 1 (slices per source), got {self.context}"
            )
        if not 0.0 <= self.sliding_overlap < 1.0:
            raise ConfigError(f"data.sliding_overlap must be in [0, 1), got {self.sliding_overlap}")
        if not 0.0 <= self.foreground_fraction <= 1.0:
            raise ConfigError(f"data.foreground_fraction must be in [0, 1], got {self.foreground_fraction}")
        if self.unified_subsets not in ("uniform", "emphasis"):
            raise ConfigError(
                f"data.unified_subsets must be uniform or emphasis, got {self.unified_subsets!r}"
            )
        for name in ("val", "test"):
            value = getattr(self, name)
            if value < 0:
                raise ConfigError(f"data.{name} must be >= 0 (a fraction or a subject count), got {value}")
        if self.augment is not None:
            from .data.augment import AugmentSpec  # torch: loaded only when a recipe augments

            AugmentSpec.from_config(self.augment)
        if self.normalization:
            from .data.fingerprint import normalization_spec  # numpy only; imported late like the above

            for modality, options in self.normalization.items():
                normalization_spec(modality, options)


@dataclass
class ModelConfig:
    """Which networks, with which constructor arguments (passed through to the registry)."""

    spatial_dims: int = 2
    generator: str = "unet"
    generator_args: dict[str, Any] = field(default_factory=dict)
    critic: str = "patchgan"
    critic_args: dict[str, Any] = field(default_factory=dict)
    #: Initialise the generator from a local state-dict file (ResViT: e.g. a CNN-only pre-training).
    generator_weights: str | None = None
    #: The generator also predicts a per-voxel Laplace scale ``b`` (a second output channel, trained
    #: with the Laplace likelihood): the model's own estimate of its error (docs/trust.md).
    predict_scale: bool = False

    def validate(self) -> None:
        if self.spatial_dims not in (2, 3):
            raise ConfigError(f"model.spatial_dims must be 2 or 3, got {self.spatial_dims}")
        if self.predict_scale and self.generator != "unet":
            raise ConfigError(
                f"model.predict_scale needs the unet generator (its tanh_scale output), not {self.generator!r}"
            )


@dataclass
class TrainConfig:
    """The pix2pix recipe's knobs plus what makes a run observable and resumable."""

    #: Epochs at the initial learning rate, then ``decay_epochs`` of linear decay to zero (pix2pix).
    epochs: int = 100
    decay_epochs: int = 100
    batch_size: int = 8
    lr_generator: float = 2e-4
    lr_critic: float = 2e-4
    beta1: float = 0.5
    beta2: float = 0.999
    lambda_l1: float = 100.0
    #: ``gan`` (pix2pix: PatchGAN critic, LSGAN + lambda_l1 * L1), ``l1`` (no critic: the ablation), or an
    #: objective for unpaired data; medsynth/engine/objectives/ lists them.
    objective: str = "gan"
    #: Settings of the objective beyond the shared ones above, checked by the objective itself (e.g. its
    #: loss weights); empty means its defaults.
    objective_args: dict[str, Any] = field(default_factory=dict)
    #: Weight of the adversarial term of the ``gan`` objective.
    adversarial_weight: float = 1.0
    #: With ``model.predict_scale``: the Laplace NLL's per-voxel weight ``b.detach() ** laplace_beta``.
    #: 0 (the plain NLL) ranks the error best, for 0.2-0.9 dB of PSNR; 1 keeps the image's gradient
    #: exactly L1's but fits ``b`` on an absolute scale that barely tells small errors apart (docs/trust.md).
    laplace_beta: float = 0.0
    masked_l1: bool = False
    #: Cap on optimisation steps per epoch (None = one pass over the training slices).
    steps_per_epoch: int | None = None
    seed: int = 0
    #: CPU threads for torch (None: all cores).
    num_threads: int | None = None
    device: str = "auto"
    #: ``auto`` (bf16 autocast where the device computes bf16 faster: CUDA from compute capability 8.0, a
    #: CPU with AMX or AVX-512 BF16 when a short measurement of the network agrees; fp16 on older cards;
    #: else fp32), or ``bf16`` / ``fp16`` / ``fp32`` to insist (medsynth/model/device.py decides).
    precision: str = "auto"
    #: Legacy switch kept for saved run configs: false forces fp32 whatever ``precision`` says.
    amp: bool = True
    compile: bool = False
    #: CUDA only: capture the whole training step in a CUDA graph and replay it (removes the per-step
    #: launch floor; needs fixed batches, which the loader guarantees). Ignored, with a log line, on a CPU.
    cuda_graphs: bool = False
    channels_last: bool = True
    #: CUDA only: keep the training slices on the GPU and gather batches there (falls back to pinned
    #: host memory when they exceed half the free GPU memory). Ignored on a CPU.
    data_on_device: bool = True
    #: Time budget of the whole training job in minutes (None: run all epochs). The learning-rate
    #: schedule is mapped onto the budget; ``--resume`` with a larger value extends a stopped run.
    max_minutes: float | None = None
    #: Validate (and draw figures, choose checkpoint_best.pt) every this many epochs and at the end.
    val_every: int = 1
    #: Validation metric that chooses checkpoint_best.pt.
    best_metric: str = "psnr"
    #: Save checkpoint_latest.pt every this many steps as well as at each epoch end (0 = epoch ends only).
    checkpoint_every: int = 0
    #: Limit validation to this many held-out subjects (None = all).
    val_subjects: int | None = None
    #: Register each held-out target onto its source (rigid, mutual information) once before validation
    #: scores it, so that pairs that are not aligned do not choose checkpoint_best.pt. Objectives that
    #: train through misalignment always do (their ``registers_validation``).
    register_validation: bool = False
    inference_batch_size: int = 16

    def validate(self) -> None:
        if self.epochs < 1 or self.decay_epochs < 0:
            raise ConfigError("train.epochs must be >= 1 and train.decay_epochs >= 0")
        if self.batch_size < 1:
            raise ConfigError(f"train.batch_size must be >= 1, got {self.batch_size}")
        for name in ("lr_generator", "lr_critic"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ConfigError(f"train.{name} must be a positive number, got {value}")
        for name in ("beta1", "beta2"):
            value = getattr(self, name)
            if not (math.isfinite(value) and 0 <= value < 1):
                raise ConfigError(f"train.{name} (Adam) must be in [0, 1), got {value}")
        for name in ("lambda_l1", "adversarial_weight", "laplace_beta"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ConfigError(f"train.{name} must be >= 0, got {value}")
        if self.objective not in OBJECTIVES:
            raise ConfigError(
                f"train.objective must be one of {', '.join(OBJECTIVES)}, got {self.objective!r}"
            )
        if self.objective == "gan" and self.adversarial_weight == 0:
            raise ConfigError(
                "train.adversarial_weight=0 trains without a critic: set train.objective=l1 instead"
            )
        if self.max_minutes is not None and not (math.isfinite(self.max_minutes) and self.max_minutes > 0):
            raise ConfigError(
                f"train.max_minutes must be a positive number of minutes, got {self.max_minutes}"
            )
        for name in ("val_every", "inference_batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"train.{name} must be >= 1, got {getattr(self, name)}")
        if self.cuda_graphs and self.compile:
            raise ConfigError(
                "train.cuda_graphs and train.compile are two ways to the same end; set one of them"
            )
        if self.checkpoint_every < 0:
            raise ConfigError(f"train.checkpoint_every must be >= 0, got {self.checkpoint_every}")
        if self.best_metric not in ("psnr", "ssim", "mae"):
            raise ConfigError(f"train.best_metric must be psnr, ssim or mae, got {self.best_metric!r}")
        if self.precision not in ("auto", "bf16", "fp16", "fp32"):
            raise ConfigError(f"train.precision must be auto, bf16, fp16 or fp32, got {self.precision!r}")
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ConfigError(f"train.device must be auto, cpu or cuda, got {self.device!r}")

    @property
    def total_epochs(self) -> int:
        return self.epochs + self.decay_epochs


@dataclass
class Config:
    """A complete, resolved run configuration."""

    task: str = "t1->t2"
    #: Modality list for ``task: unified``.
    modalities: str | None = None
    name: str | None = None
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def validate(self) -> Config:
        task = self.parsed_task()
        self.data.validate()
        self.model.validate()
        self.train.validate()
        if self.data.pairing == "unpaired" and self.train.objective not in UNPAIRED:
            raise ConfigError(
                f"data.pairing=unpaired needs an objective that learns without pairs ({', '.join(UNPAIRED)}); "
                f"train.objective={self.train.objective} needs pairs (one subject's source and target)"
            )
        if self.data.pairing == "unpaired" and (task.is_unified or len(task.sources) != 1):
            # Unpaired data is drawn as one source's slices against one target's (data/pairing.py).
            raise ConfigError(
                f"data.pairing=unpaired (train.objective={self.train.objective}) translates between two "
                f"modalities; {task} has {'a modality set' if task.is_unified else f'{len(task.sources)} sources'}: "
                "give one source and one target"
            )
        return self

    def parsed_task(self) -> Task:
        return Task.parse(self.task, self.modalities)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def save(self, path: str | Path) -> Path:
        return atomic_write_text(path, yaml.safe_dump(self.to_dict(), sort_keys=False))


def load_config(
    source: str | Path | None, overrides: list[str] | None = None, values: dict[str, Any] | None = None
) -> Config:
    """Load a recipe (a path, or the name of a file in ``configs/``), then apply ``key.sub=value``
    overrides (values parsed as YAML) and ``values`` (dotted keys, taken as they are: CLI flags)."""
    raw: dict[str, Any] = {}
    origin = "defaults"
    if source is not None:
        path = resolve_recipe(source)
        origin = str(path)
        try:
            raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"not valid YAML ({exc.__class__.__name__})", path) from exc
        if not isinstance(raw, dict):
            raise ConfigError("a recipe must be a mapping of sections (task, data, model, train)", path)
    for item in overrides or []:
        key, value = parse_override(item)
        set_dotted(raw, key, value)
    for key, value in (values or {}).items():
        set_dotted(raw, key, value)
    return _build(Config, raw, origin).validate()


def resolve_recipe(source: str | Path) -> Path:
    """A recipe path as given, or a bare name looked up in the packaged ``configs/`` folder."""
    path = Path(source)
    if path.is_file():
        return path
    for candidate in (CONFIG_DIR / path.name, CONFIG_DIR / f"{path.name}.yaml"):
        if candidate.is_file():
            return candidate
    known = ", ".join(sorted(p.stem for p in CONFIG_DIR.glob("*.yaml")))
    raise ConfigError(f"no such recipe; give a YAML path or one of: {known}", source)


def parse_override(item: str) -> tuple[str, Any]:
    """``train.epochs=5`` -> ``("train.epochs", 5)``; the value is parsed as YAML."""
    key, sep, value = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {item!r} must look like section.key=value, e.g. train.epochs=5")
    try:
        return key.strip(), yaml.safe_load(value)
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {item!r}: the value is not valid YAML") from exc


def set_dotted(raw: dict[str, Any], key: str, value: Any) -> None:
    """Set ``raw["train"]["epochs"] = value`` for ``key = "train.epochs"``."""
    parts = key.split(".")
    node = raw
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{key}: {part!r} is not a section")
    node[parts[-1]] = value


def _build(cls: type, raw: Any, where: str, prefix: str = "") -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'} must be a mapping, got {raw!r} ({where})")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise ConfigError(
            f"unknown key {prefix}{unknown[0]} in {where}; valid keys here: {', '.join(sorted(fields))}"
        )
    values = {}
    for name, value in raw.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            values[name] = _build(hint, value, where, f"{prefix}{name}.")
        else:
            values[name] = _check_type(value, hint, f"{prefix}{name}", where)
    return cls(**values)


def _check_type(value: Any, hint: Any, key: str, where: str) -> Any:
    """Accept ``value`` if it fits ``hint`` (ints widen to floats); otherwise a ConfigError."""
    origin = typing.get_origin(hint)
    options = typing.get_args(hint) if origin in (typing.Union, types.UnionType) else (hint,)
    for option in options:
        base = typing.get_origin(option) or option
        if option is type(None) and value is None:
            return None
        if base is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if base is float and isinstance(value, str):
            try:  # YAML 1.1 reads "1e-3" (no dot) as a string
                return float(value)
            except ValueError:
                pass
        if base is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if base in (str, bool, dict) and isinstance(value, base):
            return value
        if base is list and isinstance(value, (list, tuple)):
            return list(value)
    expected = " or ".join(getattr(o, "__name__", str(o)) for o in options)
    raise ConfigError(f"{key} must be {expected}, got {value!r} ({where})")
