"""A trained synthesis model: whole volumes in, a synthetic volume on the input's grid out.

:class:`SynthesisModel` is the one implementation of "run the model on a subject". Validation during
training calls :meth:`~SynthesisModel.synthesize_normalised` on the cache's arrays; ``infer``,
``evaluate`` and ``convert`` call :meth:`~SynthesisModel.predict`, which adds the steps around it:

    read (any orientation) -> canonical RAS -> foreground mask -> per-volume normalisation
    -> slice-wise (2D/2.5D) or sliding-window (3D) synthesis inside the head's bounding box
    -> inverse normalisation with the cohort-level target parameters -> original orientation
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..data.fingerprint import Fingerprint
from ..data.masks import foreground_mask
from ..errors import CheckpointError, GeometryError, MedsynthError
from ..io.geometry import grid_mismatch
from ..io.volume import Volume, to_canonical
from ..modalities import canonical_modality
from ..nets.registry import build_generator
from ..task import Task
from .checkpoint import file_digest, load_checkpoint, resolve_checkpoint
from .device import PrecisionChoice, autocast, check_precision_wish, choose_precision, pick_device, time_call
from .memory import BatchBackoff
from .plan import SynthesisPlan
from .slicing import synthesize_slices
from .sliding import synthesize_patches

log = logging.getLogger("medsynth")


@dataclass
class Prediction:
    """A synthetic volume and the intermediate arrays evaluation needs."""

    volume: Volume
    normalised: np.ndarray  # canonical RAS, [-1, 1]
    mask: np.ndarray  # canonical RAS foreground of the inputs
    target: str
    seconds: float
    #: canonical RAS voxel size (mm) of the arrays above.
    spacing: tuple[float, float, float]
    #: canonical RAS predicted Laplace scale ``b`` (normalised units) of a model with a scale head.
    scale: np.ndarray | None = None


class SynthesisModel:
    """A generator with the plan and normalisation it was trained with, ready to synthesise volumes."""

    def __init__(
        self,
        plan: SynthesisPlan,
        generator: torch.nn.Module,
        fingerprint: Fingerprint,
        *,
        device: str | torch.device = "cpu",
        source: str = "<memory>",
        digest: str | None = None,
        epoch: int | None = None,
        splits: dict[str, list[str]] | None = None,
        precision: str | PrecisionChoice = "fp32",
    ) -> None:
        self.plan, self.generator, self.fingerprint = plan, generator, fingerprint
        self.device = pick_device(str(device))
        #: ``fp32`` (the default: the same bytes for the same input, whatever the machine's load), or a
        #: faster ``bf16`` / ``fp16`` / ``auto`` a user asked for, decided on first use (:attr:`precision`);
        #: or a choice already made (validation during training computes as the training step does).
        self._precision = precision if isinstance(precision, PrecisionChoice) else None
        self.precision_wish = (
            precision.precision
            if isinstance(precision, PrecisionChoice)
            else check_precision_wish(precision, "--precision")
        )
        self.source, self.digest, self.epoch = source, digest, epoch
        #: Subject-level splits of the training run, so evaluation scores the held-out subjects.
        self.checkpoint_splits: dict[str, list[str]] = dict(splits or {})
        #: The largest batch that fitted after an out-of-memory: later volumes start there (one log line).
        self.batch_limit: int | None = None
        #: Every direction its checkpoint holds (``t1->t2``, ``t2->t1``), this model's among them.
        self.directions: list[str] = [str(plan.task)]
        #: How its training data was sampled: ``paired`` or ``unpaired`` (``data.pairing``).
        self.pairing = "paired"

    @classmethod
    def from_payload(
        cls,
        payload: dict[str, Any],
        *,
        device: str = "cpu",
        source: str = "<memory>",
        precision: str = "fp32",
        target: str | None = None,
    ) -> SynthesisModel:
        """Rebuild the generator from a loaded checkpoint alone.

        ``target``: of a checkpoint that holds several directions (an objective's forward and reverse
        generators), the one that synthesises this modality; the run's own direction when None.
        """
        payload = direction_payload(payload, target, source)
        plan = SynthesisPlan.from_checkpoint(payload, source)
        try:
            generator = build_generator(plan.generator.name, **plan.generator.init_args)
            generator.load_state_dict(payload["generator_state"])
            fingerprint = Fingerprint.from_dict(payload["fingerprint"])
        except (KeyError, TypeError, RuntimeError, ValueError) as exc:
            raise CheckpointError(f"incomplete or incompatible medsynth checkpoint ({exc})", source) from exc
        model = cls(
            plan, generator, fingerprint, device=device, source=source, epoch=payload.get("epoch"),
            splits=payload.get("data", {}).get("splits", {}), precision=precision,
        )  # fmt: skip
        model.directions = checkpoint_directions(payload)
        model.pairing = str(payload.get("data", {}).get("pairing", "paired"))
        model.generator.to(model.device).eval()
        if plan.spatial_dims == 2:
            model.generator.to(memory_format=torch.channels_last)
        return model

    @classmethod
    def from_checkpoint(
        cls, path: str | Path, device: str = "cpu", precision: str = "fp32", target: str | None = None
    ) -> SynthesisModel:
        """Load a checkpoint file, or the best checkpoint of a run folder (``target``: see from_payload)."""
        path = resolve_checkpoint(path)
        model = cls.from_payload(
            load_checkpoint(path), device=device, source=str(path), precision=precision, target=target
        )
        model.digest = file_digest(path)
        return model

    # ------------------------------------------------------------------------------- describe
    @property
    def task(self) -> Task:
        return self.plan.task

    @property
    def sources(self) -> tuple[str, ...]:
        return self.task.sources

    @property
    def target(self) -> str | None:
        return self.task.target

    @property
    def required_modalities(self) -> tuple[str, ...]:
        return self.plan.required_modalities

    def describe(self) -> dict[str, Any]:
        """The sidecar's ``checkpoint`` block; an exported model adds the SHA-256 of the checkpoint it
        was exported from (``source_checkpoint_sha256``), so its outputs trace back to the trained run."""
        described = {
            "task": str(self.task),
            "checkpoint": self.source,
            "sha256": self.digest,
            "epoch": self.epoch,
        }
        if len(self.directions) > 1 or self.pairing != "paired":
            described.update(directions=list(self.directions), trained_on=f"{self.pairing} data")
        exported_from = getattr(self, "exported_from", None)  # set by model.export.load_exported
        if exported_from:
            described["source_checkpoint_sha256"] = str(exported_from)
        return described

    @property
    def precision(self) -> PrecisionChoice:
        """What synthesis computes in (:func:`medsynth.model.device.choose_precision`), decided once.

        ``fp32`` (the default) measures nothing and keeps channels_last, so an output depends on the
        input, the model and the machine only, never on how busy the machine was. Asked for, ``auto``
        is on CUDA the precision the model was trained with, narrowed to what the card can do; on a CPU
        with a bf16 unit, a short measurement of this generator on a few training-sized slices, whose
        outcome can change with the machine's load (every output records it: :meth:`precision_record`).
        """
        if self._precision is None:
            wish = self.precision_wish
            if wish == "auto" and self.device.type == "cuda":
                wish = self.plan.precision
            measure = self._measure if self.plan.window else None
            formats = (True, False) if self.plan.spatial_dims == 2 else (True,)  # 3D windows ignore it
            self._precision = choose_precision(
                self.device, wish, channels_last=True, measure=measure, formats=formats
            )
            self._apply_memory_format()
            log.debug("synthesis precision: %s", self._precision.describe())  # in every sidecar
        return self._precision

    def precision_record(self) -> dict[str, Any]:
        """The sidecar's ``precision`` block: what was asked for and what ran (with why and any timings)."""
        return {"asked": self.precision_wish, **self.precision.to_dict()}

    def _apply_memory_format(self) -> None:
        assert self._precision is not None
        if self.plan.spatial_dims == 2:
            layout = torch.channels_last if self._precision.channels_last else torch.contiguous_format
            self.generator.to(memory_format=layout)

    def _measure(self, precision: str, channels_last: bool) -> float:
        """Seconds of one forward pass over 16 training-sized slices (or one 3D patch)."""
        assert self.plan.window
        channels = (
            self.plan.layout.channels if self.plan.spatial_dims == 2 else len(self.plan.layout.modalities)
        )
        batch = torch.zeros(
            (16 if self.plan.spatial_dims == 2 else 1, channels, *self.plan.window), device=self.device
        )
        if self.plan.spatial_dims == 2:
            layout = torch.channels_last if channels_last else torch.contiguous_format
            self.generator.to(memory_format=layout)
            batch = batch.contiguous(memory_format=layout)
        self.generator.eval()

        def forward() -> None:
            with torch.inference_mode(), autocast(self.device, precision):
                self.generator(batch)

        return time_call(forward, warmup=1, repeats=1)

    # ------------------------------------------------------------------------------- compute
    def normalise(
        self, canonical: Mapping[str, np.ndarray], own_masks: Mapping[str, np.ndarray] | None = None
    ) -> dict[str, np.ndarray]:
        """Canonical arrays -> normalised inputs, by the same rule the training cache used.

        ``own_masks`` may hold each array's own ``foreground_mask([array])``, already computed.
        """
        own_masks = own_masks or {}
        return {
            m: self.fingerprint.input_normalizer(m, a, own_mask=own_masks.get(m)).forward(a)
            for m, a in canonical.items()
        }

    def synthesize_normalised(
        self, images: Mapping[str, np.ndarray], mask: np.ndarray, target: str | None = None, **options: Any
    ) -> np.ndarray:
        """Canonical ``(I, J, K)`` normalised inputs -> canonical normalised synthetic ``target``.

        ``images`` holds the sources of a fixed task, or any subset of a unified model's modalities
        without ``target``. Views are fine (the cache's memory maps, transposed): nothing is written.
        ``options`` (``batch_size``, ``flip_tta``, ``progress``) are those of :meth:`synthesize_with_scale`.
        """
        return self.synthesize_with_scale(images, mask, target, **options)[0]

    def synthesize_with_scale(
        self,
        images: Mapping[str, np.ndarray],
        mask: np.ndarray,
        target: str | None = None,
        *,
        batch_size: int = 16,
        flip_tta: bool = False,
        progress: bool = False,
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """:meth:`synthesize_normalised` and, when the plan has a scale channel, the predicted Laplace
        scale ``b`` (canonical, normalised units: the expected absolute error) from the same pass."""
        plan, with_scale = self.plan, bool(self.plan.scale_channel)
        target = str(plan.task.target) if target is None else target
        what = "inference batch" if plan.spatial_dims == 2 else "inference batch (3D windows)"
        batch_size = min(batch_size, self.batch_limit or batch_size)
        backoff = BatchBackoff(batch_size, what=what, device=self.device)
        try:
            return self._synthesize(images, mask, target, backoff, flip_tta, progress, with_scale)
        finally:
            if backoff.shrunk:
                self.batch_limit = backoff.batch

    def _synthesize(
        self,
        images: Mapping[str, np.ndarray],
        mask: np.ndarray,
        target: str,
        backoff: BatchBackoff,
        flip_tta: bool,
        progress: bool,
        with_scale: bool,
    ) -> tuple[np.ndarray, np.ndarray | None]:
        plan, batch_size = self.plan, backoff.batch
        if plan.spatial_dims == 3:
            result = synthesize_patches(
                self.generator, [images[m] for m in plan.layout.modalities], mask,
                patch_size=plan.window or (64, 64, 64), overlap=plan.sliding_overlap,
                batch_size=batch_size, device=self.device, precision=self.precision.precision, progress=progress,
                with_scale=with_scale, backoff=backoff,
            )  # fmt: skip
            return result if isinstance(result, tuple) else (result, None)
        axis = plan.axis
        result = synthesize_slices(
            self.generator,
            {m: np.moveaxis(a, axis, 0) for m, a in images.items()},
            np.moveaxis(mask, axis, 0),
            layout=plan.layout,
            target=target,
            window=plan.window,
            batch_size=batch_size,
            device=self.device,
            precision=self.precision.precision,
            channels_last=self.precision.channels_last,
            flip_tta=flip_tta,
            progress=progress,
            with_scale=with_scale,
            backoff=backoff,
        )
        if isinstance(result, tuple):
            return np.moveaxis(result[0], 0, axis), np.moveaxis(result[1], 0, axis)
        return np.moveaxis(result, 0, axis), None

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
        target, order = self.plan.resolve_target(inputs, target)
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
            volume, reorientation = to_canonical(inputs[modality])
            canonical[modality] = volume.array
        canonical_spacing = volume.spacing
        # The synthesis mask is the inputs' joint foreground; with one input it is that input's own mask,
        # which its normalisation needs too (computed once: seconds at 1 mm).
        mask = foreground_mask([canonical[m] for m in order])
        own = {order[0]: mask} if len(order) == 1 else None
        normalised, scale = self.synthesize_with_scale(
            self.normalise(canonical, own),
            mask,
            target,
            batch_size=batch_size,
            flip_tta=flip_tta,
            progress=progress,
        )
        native = self.fingerprint.output_normalizer(target).inverse(normalised)
        array = reorientation.undo(native.astype(np.float32))
        volume = reference.with_array(array, modality=target, synthetic=True, path=None)
        seconds = time.perf_counter() - started
        return Prediction(volume, normalised, mask, target, seconds, canonical_spacing, scale)


# ----------------------------------------------------------------------------- directions
def checkpoint_directions(payload: dict[str, Any]) -> list[str]:
    """Tasks of every direction a checkpoint holds, the training run's own first."""
    tasks = [str(SynthesisPlan.from_checkpoint(payload).task)]
    for entry in payload.get("directions") or []:
        tasks.append(str(Task.from_dict(entry["plan"]["task"])))
    own = payload.get("run_direction")
    if own in tasks:
        tasks.remove(own)
        tasks.insert(0, own)
    return tasks


def direction_payload(
    payload: dict[str, Any], target: str | None, source: str = "<memory>"
) -> dict[str, Any]:
    """The checkpoint seen as the model of the direction that synthesises ``target``.

    A checkpoint stores its run's own direction as ``plan`` + ``generator_state`` (what every reader
    understands) and further directions its objective trained under ``directions``. Asking for one of
    those swaps it in; the others, the run's own included, stay listed under ``directions``. Without
    ``target``, or for a checkpoint of one direction, the payload is returned unchanged (its plan then
    judges the target, as for every model).
    """
    directions = payload.get("directions") or []
    if target is None or not directions or target == "missing":
        return payload
    wanted = canonical_modality(target)
    own = SynthesisPlan.from_checkpoint(payload, source)
    if own.task.target == wanted:
        return payload
    try:
        plans = [SynthesisPlan.from_dict(entry["plan"]) for entry in directions]
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"the checkpoint's further directions are unreadable ({exc})", source) from exc
    for number, plan in enumerate(plans):
        if plan.task.target == wanted:
            others = [d for i, d in enumerate(directions) if i != number]
            own_entry = {"plan": own.to_dict(), "generator_state": payload["generator_state"]}
            return {
                **payload,
                "plan": directions[number]["plan"],
                "generator_state": directions[number]["generator_state"],
                "directions": [own_entry, *others],
                "run_direction": str(own.task),
            }
    offered = ", ".join(str(p.task) for p in [own, *plans])
    raise MedsynthError(f"this checkpoint synthesises {offered}; none of them makes {target!r}", source)
