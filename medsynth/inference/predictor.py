"""Rebuild a trained generator from its checkpoint alone and synthesise whole volumes.

``Predictor.predict`` takes the input volumes on their own grids, and returns the synthetic volume on the
exact grid of the first input, in the target modality's intensity scale:

    read (any orientation) -> canonical RAS -> foreground mask -> per-volume normalisation
    -> slice-wise (2D/2.5D) or sliding-window (3D) synthesis inside the head's bounding box
    -> inverse normalisation with the cohort-level target parameters -> original orientation
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..data.fingerprint import Fingerprint
from ..data.masks import foreground_mask
from ..engine.checkpoint import file_digest, load_checkpoint
from ..errors import CheckpointError, GeometryError, MedsynthError
from ..io.geometry import grid_mismatch
from ..io.volume import Volume, to_canonical
from ..modalities import DISPLAY_NAMES, canonical_modality
from ..nets.registry import build_generator
from ..task import Task
from .slicing import synthesize_slices, unified_planes


@dataclass
class Prediction:
    """A synthetic volume and the intermediate arrays evaluation needs."""

    volume: Volume
    normalised: np.ndarray  # canonical RAS, [-1, 1]
    mask: np.ndarray  # canonical RAS foreground of the inputs
    target: str
    seconds: float


class Predictor:
    """A generator ready for inference, with the task and normalisation it was trained with."""

    def __init__(self, checkpoint: dict[str, Any], *, device: str = "cpu", source: str = "<memory>") -> None:
        try:
            self.task = Task.from_dict(checkpoint["task"])
            spec = checkpoint["generator"]
            self.generator = build_generator(spec["name"], **spec["init_args"])
            self.generator.load_state_dict(checkpoint["generator_state"])
            self.fingerprint = Fingerprint.from_dict(checkpoint["fingerprint"])
            self.slicing = dict(checkpoint["slicing"])
        except (KeyError, TypeError, RuntimeError) as exc:
            raise CheckpointError(f"incomplete or incompatible medsynth checkpoint ({exc})", source) from exc
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise MedsynthError("--device cuda asked for, but no CUDA device is available; use --device cpu")
        self.device = torch.device(device)
        self.generator.to(self.device).eval()
        if self.slicing.get("spatial_dims", 2) == 2:
            self.generator.to(memory_format=torch.channels_last)
        self.source = source
        self.digest: str | None = None
        self.epoch = checkpoint.get("epoch")
        #: Subject-level splits of the training run, so evaluation scores the held-out subjects.
        self.checkpoint_splits: dict[str, list[str]] = dict(checkpoint.get("data", {}).get("splits", {}))

    @classmethod
    def from_checkpoint(cls, path: str | Path, device: str = "cpu") -> Predictor:
        path = Path(path)
        if path.is_dir():
            path = path / "checkpoint_best.pt"
        predictor = cls(load_checkpoint(path), device=device, source=str(path))
        predictor.digest = file_digest(path)
        return predictor

    # ------------------------------------------------------------------------------- describe
    @property
    def sources(self) -> tuple[str, ...]:
        return self.task.sources

    @property
    def target(self) -> str | None:
        return self.task.target

    @property
    def required_modalities(self) -> tuple[str, ...]:
        """Inputs a fixed-task model needs (in order); for a unified model, the modalities it knows."""
        return self.task.modalities if self.task.is_unified else self.task.sources

    def describe(self) -> dict[str, Any]:
        return {"task": str(self.task), "checkpoint": self.source, "sha256": self.digest, "epoch": self.epoch}

    # ---------------------------------------------------------------------------------- predict
    def resolve_target(self, inputs: dict[str, Volume], target: str | None) -> tuple[str, list[str]]:
        """Check the inputs against the task; return the target and the input order the network expects."""
        if not self.task.is_unified:
            if target is not None and canonical_modality(target) != self.task.target:
                raise MedsynthError(
                    f"this checkpoint synthesises {DISPLAY_NAMES[str(self.task.target)]} only, not {target!r}"
                )
            extra = sorted(set(inputs) - set(self.task.sources))
            if extra:
                raise MedsynthError(
                    f"the checkpoint does not use {', '.join(extra)}; it takes {', '.join(self.task.sources)}"
                )
            missing = [m for m in self.task.sources if m not in inputs]
            if missing:
                raise MedsynthError(
                    f"the checkpoint needs {', '.join(self.task.sources)} as inputs; missing: {', '.join(missing)}"
                )
            return str(self.task.target), list(self.task.sources)
        known = self.task.modalities
        unknown = sorted(set(inputs) - set(known))
        if unknown:
            raise MedsynthError(f"this unified model knows {', '.join(known)}; not {', '.join(unknown)}")
        if target is None:
            raise MedsynthError(f"a unified model needs --target (one of {', '.join(known)}, or 'missing')")
        target = canonical_modality(target)
        if target not in known:
            raise MedsynthError(f"target {target!r} is outside this unified model's set: {', '.join(known)}")
        if target in inputs:
            raise MedsynthError(
                f"{target} is given as an input; the target must be a modality you do not have"
            )
        if not inputs:
            raise MedsynthError("give at least one input volume")
        return target, [m for m in known if m in inputs]

    def predict(
        self,
        inputs: dict[str, Volume],
        target: str | None = None,
        *,
        batch_size: int = 16,
        flip_tta: bool = False,
        progress: bool = False,
    ) -> Prediction:
        """Synthesise ``target`` (or the task's target) on the grid of the first input volume."""
        started = time.perf_counter()
        target, order = self.resolve_target(inputs, target)
        reference = inputs[order[0]] if not self.task.is_unified else next(iter(inputs.values()))
        for modality, volume in inputs.items():
            problem = grid_mismatch(reference, volume)
            if problem:
                raise GeometryError(
                    f"{modality} is not on the grid of {reference.source} ({problem}); "
                    "register/resample the inputs onto one grid first",
                    volume.source,
                )
        canonical = {}
        for modality in order:
            canonical[modality], reorientation = to_canonical(inputs[modality])
        mask = foreground_mask([canonical[m].array for m in order])
        normalised = {
            m: self.fingerprint.input_normalizer(m, canonical[m].array, mask).forward(canonical[m].array)
            for m in order
        }
        prediction = self._synthesize(normalised, order, target, mask, batch_size, flip_tta, progress)
        native = self.fingerprint.output_normalizer(target).inverse(prediction)
        array = reorientation.undo(native.astype(np.float32))
        volume = reference.with_array(array, modality=target, synthetic=True, path=None)
        return Prediction(volume, prediction, mask, target, time.perf_counter() - started)

    def _synthesize(
        self,
        normalised: dict[str, np.ndarray],
        order: list[str],
        target: str,
        mask: np.ndarray,
        batch_size: int,
        flip_tta: bool,
        progress: bool,
    ) -> np.ndarray:
        """Run the network on canonical normalised arrays; returns a canonical normalised array."""
        if self.slicing.get("spatial_dims", 2) == 3:
            from .sliding import synthesize_patches

            return synthesize_patches(
                self.generator, [normalised[m] for m in order], mask,
                patch_size=self.slicing["crop_size"], overlap=float(self.slicing.get("sliding_overlap", 0.5)),
                batch_size=batch_size, device=self.device, progress=progress,
            )  # fmt: skip
        axis = int(self.slicing.get("axis", 2))
        to_slices = lambda a: np.ascontiguousarray(np.moveaxis(a, axis, 0))  # noqa: E731
        planes = None
        if self.task.is_unified:
            shape = normalised[order[0]].shape
            images = [normalised.get(m, np.zeros(shape, np.float32)) for m in self.task.modalities]
            planes = unified_planes(self.task.modalities, order, target)
        else:
            images = [normalised[m] for m in order]
        result = synthesize_slices(
            self.generator,
            [to_slices(image) for image in images],
            to_slices(mask),
            context=int(self.slicing.get("context", 1)),
            window=self.slicing.get("crop_size"),
            planes=planes,
            batch_size=batch_size,
            device=self.device,
            amp=self.device.type == "cuda",
            flip_tta=flip_tta,
            progress=progress,
        )
        return np.moveaxis(result, 0, axis)
