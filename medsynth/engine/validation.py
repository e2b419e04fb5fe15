"""Validation during training: whole held-out volumes from the cache, scored in the network's space.

Each validation subject is synthesised through the very :class:`~medsynth.model.synthesis.SynthesisModel`
inference loads from the checkpoint (on the live generator), and PSNR / SSIM / MAE are taken inside the
subject's foreground mask in the normalised [-1, 1] space (data range 2), the space the network is
trained in.

What is scored depends on the data:

* ``target``: subjects that have the run's inputs and its target are scored against the real target (a
  unified model on every modality of the subject, from all the others);
* ``registered target``: as ``target``, after each held-out target was registered onto the subject's
  (first) source once (rigid, mutual information: :func:`medsynth.data.registration.register_pair` on
  the cached normalised volumes), for methods that train through misalignment or when
  ``train.register_validation`` asks: a misaligned held-out pair would otherwise score a blurred
  synthesis above a sharp one and choose ``checkpoint_best.pt`` for it;
* ``round trip``: when no validation subject has both sides (unpaired data whose held-out subjects have one
  image each), a model whose objective also trained the reverse direction is scored on the round trip
  ``x -> G -> F`` for a subject's source and ``y -> F -> G`` for its target. That checks consistency, not
  accuracy, and the run says so once. A near-copy of the input wins it (``G`` and ``F`` both close to the
  identity close the cycle best), so this mode also reports ``divergence``: the Jensen-Shannon divergence
  of the synthetic targets' intensity histogram (inside the head, the network's space) from the training
  targets' mean histogram, which a copy of the source cannot win, and model selection uses it
  (:class:`~medsynth.engine.handlers.selection.BestSelection`).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from ..data.cache import Cohort
from ..data.fingerprint import Fingerprint
from ..errors import MedsynthError
from ..io.volume import Volume
from ..metrics import mae, psnr, ssim_3d
from ..model.synthesis import SynthesisModel
from ..task import Task

log = logging.getLogger("medsynth")

#: (modality, synthetic, truth, mask, inputs): slice-first normalised arrays of one scored case.
Case = tuple[str, np.ndarray, np.ndarray, np.ndarray, list[np.ndarray]]


def _to_volume(array: np.ndarray) -> np.ndarray:
    """The cache's ``(k, i, j)`` as the canonical ``(i, j, k)`` view :class:`SynthesisModel` takes."""
    return np.transpose(array, (1, 2, 0))


def _to_slices(array: np.ndarray) -> np.ndarray:
    return np.transpose(array, (2, 0, 1))


def target_divergence(
    fingerprint: Fingerprint, target: str, images: Sequence[tuple[np.ndarray, np.ndarray]]
) -> float:
    """Divergence of synthetic ``target`` images (normalised, with their masks) from the training targets.

    The images pooled into one intensity histogram (inside their masks) against the mean of the
    fingerprint's histograms of the training subjects that have the target, in the space the network
    writes; NaN when there is nothing to compare.
    """
    from ..data.appearance import normalised_histogram
    from ..model.ood import HistogramReference, js_divergence

    training = [
        np.asarray(entry[target]["appearance"]["histogram"])
        for entry in fingerprint.subjects.values()
        if target in entry and "appearance" in entry[target]
    ]
    if not images or not training:
        return math.nan
    values = np.concatenate([image[mask] for image, mask in images])
    return js_divergence(normalised_histogram(values), HistogramReference.from_histograms(training).mean)


class Validation:
    """Scores the validation subjects of one run; :attr:`kind` says what was scored."""

    def __init__(
        self,
        task: Task,
        cohort: Cohort,
        model: SynthesisModel,
        direction_models: Sequence[SynthesisModel],
        batch_size: int,
        *,
        quiet: bool = False,
        register_targets: bool = False,
    ) -> None:
        self.task, self.cohort, self.model = task, cohort, model
        self.direction_models, self.batch_size, self.quiet = list(direction_models), batch_size, quiet
        if register_targets and task.is_unified:
            raise MedsynthError(
                "registered validation needs a source to register onto; a unified task has none"
            )
        #: ``target`` (synthetic vs real target), ``registered target`` or ``round trip``.
        self.kind = "registered target" if register_targets else "target"
        #: Held-out targets registered onto their sources, by subject (slice-first, normalised).
        self._registered: dict[str, np.ndarray] = {}
        #: The round trip's synthetic targets of the current validation, with their masks.
        self._synthetic_targets: list[tuple[np.ndarray, np.ndarray]] = []

    def run(self, subject_ids: Sequence[str]) -> tuple[dict[str, float], list[Any]]:
        """Mean PSNR / SSIM / MAE over the scored cases, and the first case for the sample figure."""
        scorable = [s for s in subject_ids if self._scorable(s)]
        if scorable:
            cases: Iterator[Case] = (case for s in scorable for case in self.synthesize_subject(s))
        else:
            self._say_round_trip()
            cases = (case for s in subject_ids for case in self.round_trip_subject(s))
        scores: dict[str, list[float]] = {"psnr": [], "ssim": [], "mae": []}
        samples: list[Any] = []
        self._synthetic_targets = []
        for target, prediction, truth, mask, inputs in cases:
            scores["psnr"].append(psnr(prediction, truth, mask=mask, data_range=2.0))
            scores["ssim"].append(ssim_3d(prediction, truth, mask=mask, data_range=2.0))
            scores["mae"].append(mae(prediction, truth, mask=mask, data_range=2.0))
            if not samples:
                samples.append((inputs, prediction, truth, mask, target))
        if self.kind == "round trip":
            target = str(self.task.target)
            scores["divergence"] = [
                target_divergence(self.model.fingerprint, target, self._synthetic_targets)
            ]
        return {
            key: float(np.mean(values)) if values else math.nan for key, values in scores.items()
        }, samples

    def _scorable(self, subject_id: str) -> bool:
        """Whether a subject has the run's inputs and target (a unified model: any two of its modalities)."""
        held = set(self.cohort.subject(subject_id).modalities)
        if self.task.is_unified:
            return len(held & set(self.task.modalities)) >= 2
        return {*self.task.sources, str(self.task.target)} <= held

    def _say_round_trip(self) -> None:
        if self.kind == "round trip":
            return
        if self._reverse_model() is None:
            raise MedsynthError(
                f"no validation subject has both {' and '.join(self.task.required_modalities)} and "
                f"{self.task.target}; put subjects with both in the val split (splits.json)"
            )
        self.kind = "round trip"
        if not self.quiet:
            source, target = self.task.sources[0], self.task.target
            print(
                f"no validation subject has both {source} and {target}: validation scores the round trip "
                f"{source} -> {target} -> {source} (and back from the target), which checks consistency, not "
                "accuracy",
                flush=True,
            )

    def _reverse_model(self) -> SynthesisModel | None:
        """The direction model that maps the run's target back to its single source, if one was trained."""
        if self.task.is_unified or len(self.task.sources) != 1:
            return None
        wanted = Task(sources=(str(self.task.target),), target=self.task.sources[0])
        return next((m for m in self.direction_models if m.task == wanted), None)

    def round_trip_subject(self, subject_id: str) -> Iterator[Case]:
        """``x -> G -> F`` for the subject's source, ``y -> F -> G`` for its target (whichever it has)."""
        back = self._reverse_model()
        assert back is not None
        cached = self.cohort.subject(subject_id)
        mask = np.asarray(cached.mask, dtype=bool)
        source, target = self.task.sources[0], str(self.task.target)
        for start, there, back_again in ((source, self.model, back), (target, back, self.model)):
            if start not in cached.modalities:
                continue
            image = _to_volume(cached.image(start))
            middle = str(there.task.target)
            halfway = there.synthesize_normalised(
                {start: image}, _to_volume(mask), middle, batch_size=self.batch_size
            )
            returned = back_again.synthesize_normalised(
                {middle: halfway}, _to_volume(mask), start, batch_size=self.batch_size
            )
            if start == source:
                self._synthetic_targets.append((_to_slices(halfway), mask))
            yield start, _to_slices(returned), np.asarray(cached.image(start)), mask, [_to_slices(image)]

    def synthesize_subject(self, subject_id: str) -> Iterator[Case]:
        """The run's synthesis of one subject against its real target (a unified model: every modality
        from all the others)."""
        cached = self.cohort.subject(subject_id)
        mask = np.asarray(cached.mask, dtype=bool)
        if self.task.is_unified:
            available = [m for m in self.task.modalities if m in cached.modalities]
            pairs = [(t, [m for m in available if m != t]) for t in available]
        else:
            pairs = [(str(self.task.target), list(self.task.sources))]
        for target, sources in pairs:
            images = {m: _to_volume(cached.image(m)) for m in sources}
            prediction = self.model.synthesize_normalised(
                images, _to_volume(mask), target, batch_size=self.batch_size
            )
            inputs = [_to_slices(images[m]) for m in sources]
            truth = (
                self.registered_target(subject_id)
                if self.kind == "registered target"
                else np.asarray(cached.image(target))
            )
            yield target, _to_slices(prediction), truth, mask, inputs

    def registered_target(self, subject_id: str) -> np.ndarray:
        """The subject's target registered onto its first source, computed once per run session.

        Mutual information needs no common intensity scale, so the cached normalised volumes register
        as the originals would; a registration that fails leaves the target as it is, said once.
        """
        if subject_id not in self._registered:
            from ..data.registration import RegistrationError, RegistrationSettings, register_pair

            cached = self.cohort.subject(subject_id)
            target, source = str(self.task.target), self.task.sources[0]
            # Shifted by +1 so that the [-1, 1] space's background is 0, the value an MR gets outside
            # the moved field of view (mutual information ignores the shift; it is undone after).
            reference = Volume(_to_volume(cached.image(source)) + 1.0, cached.affine)
            moving = Volume(_to_volume(cached.image(target)) + 1.0, cached.affine)
            try:
                pair = register_pair(reference, moving, ct=False, settings=RegistrationSettings())
                self._registered[subject_id] = _to_slices(pair.after.array) - 1.0
            except RegistrationError as exc:
                log.warning("validation subject %s scored without registration: %s", subject_id, exc)
                self._registered[subject_id] = np.asarray(cached.image(target))
        return self._registered[subject_id]
