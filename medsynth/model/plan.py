"""The inference contract of a trained model: a typed plan stored in every checkpoint.

Training writes it once; validation, ``medsynth infer``, ``evaluate`` and ``convert`` read it, and
nothing reads slicing or layout settings from anywhere else (nnU-Net's plans play the same role).
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any

from ..errors import CheckpointError, ConfigError, MedsynthError
from ..modalities import DISPLAY_NAMES, canonical_modality
from ..task import Task
from .layout import InputLayout

#: Autocast precisions on a GPU (a CPU always computes in fp32: bf16 is emulated and slower there).
PRECISIONS = ("bf16", "fp16", "fp32")


@dataclass(frozen=True)
class NetworkSpec:
    """A registry name and the constructor arguments that rebuild the network."""

    name: str
    init_args: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "init_args": dict(self.init_args)}


@dataclass(frozen=True)
class SynthesisPlan:
    """Everything, besides weights and the normalisation fingerprint, that defines how a model is run.

    ``window`` is the training crop (2D: in-plane ``(H, W)``) or patch (3D: ``(I, J, K)``); whole-volume
    synthesis frames slices like training crops and tiles 3D volumes with windows of that size.
    ``scale_channel``: the generator's channel 1 is ``log b``, the log of a Laplace scale in normalised
    target units (``model.predict_scale``); synthesis returns channel 0 as the image and ``b`` as the
    uncertainty. It follows from the generator spec (``final_activation="tanh_scale"``) when not given,
    so plans written before the field existed load as ``False``.
    """

    task: Task
    generator: NetworkSpec
    spatial_dims: int = 2
    axis: int = 2
    context: int = 1
    window: tuple[int, ...] | None = None
    sliding_overlap: float = 0.5
    precision: str = "bf16"
    scale_channel: bool | None = None

    def __post_init__(self) -> None:
        spec_scale = self.generator.init_args.get("final_activation") == "tanh_scale"
        if self.scale_channel is None:
            object.__setattr__(self, "scale_channel", spec_scale)
        elif bool(self.scale_channel) != spec_scale:
            raise ConfigError(
                f"scale_channel={self.scale_channel} contradicts the generator, whose final_activation is "
                f"{self.generator.init_args.get('final_activation')!r} (tanh_scale has a scale channel)"
            )
        if self.spatial_dims not in (2, 3):
            raise ConfigError(f"spatial_dims must be 2 or 3, got {self.spatial_dims}")
        if self.spatial_dims == 3 and (self.task.is_unified or self.context != 1):
            raise ConfigError("a 3D model takes one fixed task without 2.5D context (data.context=1)")
        if self.axis not in (0, 1, 2):
            raise ConfigError(f"slicing axis must be 0, 1 or 2, got {self.axis}")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")

    @property
    def layout(self) -> InputLayout:
        modalities = self.task.modalities if self.task.is_unified else self.task.sources
        return InputLayout(tuple(modalities), self.context, self.task.is_unified)

    @property
    def required_modalities(self) -> tuple[str, ...]:
        """Inputs a fixed-task model needs (in order); for a unified model, the modalities it knows."""
        return self.task.modalities if self.task.is_unified else self.task.sources

    def resolve_target(self, given: Collection[str], target: str | None) -> tuple[str, list[str]]:
        """Check the input modalities against the task; return the target and the inputs in model order.

        The one place that decides what a model can be asked: ``infer``, ``evaluate`` and ``convert``
        (before it reads any study, with the modalities it found) all call it.
        """
        task, given = self.task, set(given)
        if not task.is_unified:
            wanted = str(task.target)
            if target is not None and canonical_modality(target) != wanted:
                raise MedsynthError(
                    f"this checkpoint synthesises {DISPLAY_NAMES[wanted]} only, not {target!r}"
                )
            extra = sorted(given - set(task.sources))
            if extra:
                raise MedsynthError(
                    f"the checkpoint does not use {', '.join(extra)}; it takes {', '.join(task.sources)}"
                )
            missing = [m for m in task.sources if m not in given]
            if missing:
                raise MedsynthError(
                    f"the checkpoint needs {', '.join(task.sources)} as inputs; missing: {', '.join(missing)}"
                )
            return wanted, list(task.sources)
        known = task.modalities
        unknown = sorted(given - set(known))
        if unknown:
            raise MedsynthError(f"this unified model knows {', '.join(known)}; not {', '.join(unknown)}")
        if target is None:
            raise MedsynthError(f"a unified model needs --target (one of {', '.join(known)}, or 'missing')")
        target = canonical_modality(target)
        if target not in known:
            raise MedsynthError(f"target {target!r} is outside this unified model's set: {', '.join(known)}")
        if target in given:
            raise MedsynthError(
                f"{target} is given as an input; the target must be a modality you do not have"
            )
        if not given:
            raise MedsynthError("give at least one input volume")
        return target, [m for m in known if m in given]

    # ------------------------------------------------------------------------------ storage
    def to_dict(self) -> dict[str, Any]:
        return {
            "task": self.task.to_dict(),
            "generator": self.generator.to_dict(),
            "spatial_dims": self.spatial_dims,
            "axis": self.axis,
            "context": self.context,
            "window": list(self.window) if self.window else None,
            "sliding_overlap": self.sliding_overlap,
            "precision": self.precision,
            "scale_channel": bool(self.scale_channel),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SynthesisPlan:
        window = data.get("window")
        return cls(
            task=Task.from_dict(data["task"]),
            generator=NetworkSpec(str(data["generator"]["name"]), dict(data["generator"]["init_args"])),
            spatial_dims=int(data["spatial_dims"]),
            axis=int(data["axis"]),
            context=int(data["context"]),
            window=tuple(int(w) for w in window) if window else None,
            sliding_overlap=float(data["sliding_overlap"]),
            precision=str(data["precision"]),
            scale_channel=data.get("scale_channel"),
        )

    @classmethod
    def from_checkpoint(cls, payload: dict[str, Any], source: str = "<memory>") -> SynthesisPlan:
        """The plan of a checkpoint; format 1 checkpoints (an untyped ``slicing`` dict) are converted."""
        try:
            if "plan" in payload:
                return cls.from_dict(payload["plan"])
            slicing = payload["slicing"]
            legacy = {
                "task": payload["task"],
                "generator": payload["generator"],
                "spatial_dims": slicing.get("spatial_dims", 2),
                "axis": slicing.get("axis", 2),
                "context": slicing.get("context", 1),
                "window": slicing.get("crop_size"),
                "sliding_overlap": slicing.get("sliding_overlap", 0.5),
                "precision": "fp16",  # what format-1 inference used on a GPU
            }
            return cls.from_dict(legacy)
        except (KeyError, TypeError, ValueError, ConfigError) as exc:
            raise CheckpointError(f"incomplete or incompatible medsynth checkpoint ({exc})", source) from exc
