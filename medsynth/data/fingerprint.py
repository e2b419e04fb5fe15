"""The normalisation fingerprint: per-modality statistics of the training subjects, cached as JSON.

Two different jobs, deliberately kept apart:

* **Inputs** are normalised with their *own* statistics (:meth:`Fingerprint.input_normalizer`), taken
  inside the volume's own foreground mask. Inference sees only the sources, so a per-volume rule that
  needs nothing else is the only one it can reproduce exactly; it also absorbs scanner gain changes.
* **Outputs** (a synthetic target in ``[-1, 1]``) are mapped back with *cohort-level* parameters
  (:meth:`Fingerprint.output_normalizer`): the median over training subjects of the per-subject ones,
  so the synthetic image lands on the modality's typical intensity scale. Medians, so one odd subject
  cannot move it.

Only training subjects may be passed to :meth:`Fingerprint.compute`; statistics from validation or test
subjects would leak into the model. The fingerprint's :meth:`~Fingerprint.digest` is stored in
checkpoints and in the preprocessed cache's key.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import ConfigError, DataError, MedsynthError
from ..io.atomic import atomic_write_text
from ..io.volume import Volume
from .appearance import appearance_statistics
from .masks import foreground_mask
from .normalize import (
    INNER_LANDMARKS,
    HistogramNormalizer,
    Normalizer,
    PercentileNormalizer,
    WindowNormalizer,
    ZScoreNormalizer,
    fit_standard,
    normalizer_from_dict,
)

if TYPE_CHECKING:  # augment.py imports torch, needed only when a run augments
    from .augment import AppearanceDraws

_FORMAT = "medsynth-fingerprint"
_VERSION = 1
_SCHEMES = ("percentile", "zscore", "window", "histogram")
#: ``(subject_id, {modality: Volume})`` pairs of the training subjects.
Subjects = Iterable[tuple[str, dict[str, Volume]]]


@dataclass(frozen=True)
class NormalizationSpec:
    """How one modality is normalised (a config value; the fitted numbers live in the Fingerprint).

    ``percentile`` (MR default): the foreground's ``lower_percentile`` .. ``upper_percentile`` onto [-1, 1].
    ``histogram``: the same outer percentiles plus the deciles mapped onto the training cohort's
    (:class:`~medsynth.data.normalize.HistogramNormalizer`): for sources that come from several protocols.
    ``zscore``: foreground mean and standard deviation. ``window`` (CT default): a fixed HU ``window``.
    """

    scheme: str = "percentile"
    lower_percentile: float = 0.5
    upper_percentile: float = 99.5
    window: tuple[float, float] = (-1024.0, 3071.0)

    def __post_init__(self) -> None:
        if self.scheme not in _SCHEMES:
            raise ConfigError(
                f"unknown normalisation scheme {self.scheme!r}; valid schemes: {', '.join(_SCHEMES)}"
            )
        for name in ("lower_percentile", "upper_percentile"):
            if not _is_number(getattr(self, name)):
                raise ConfigError(f"{name} must be a number, got {getattr(self, name)!r}")
        window = self.window
        if not (isinstance(window, (list, tuple)) and len(window) == 2 and all(map(_is_number, window))):
            raise ConfigError(f"window must be two numbers [low, high] in HU, got {window!r}")
        if self.scheme == "histogram" and not (
            self.lower_percentile < INNER_LANDMARKS[0] and self.upper_percentile > INNER_LANDMARKS[-1]
        ):
            raise ConfigError(
                "the histogram scheme's inner landmarks are the deciles: lower_percentile must be below 10 and "
                f"upper_percentile above 90, got {self.lower_percentile} and {self.upper_percentile}"
            )
        object.__setattr__(self, "window", tuple(float(v) for v in self.window))
        self.make()  # validates the numbers with the normaliser's own checks

    @classmethod
    def for_modality(cls, modality: str) -> NormalizationSpec:
        """The default: a fixed HU window for CT, foreground percentiles for MR contrasts."""
        return cls(scheme="window") if modality == "ct" else cls()

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> NormalizationSpec:
        return cls(**{**data, "window": tuple(data.get("window", cls.window))})

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "window": list(self.window)}

    def for_screen(self) -> NormalizationSpec:
        """The spec whose view of an image the out-of-distribution screen compares (:mod:`medsynth.model.ood`).

        Itself, except for ``histogram``: standardisation maps every input's deciles onto the training
        cohort's, whatever its contrast (a T2w given as the T1w included), so its histograms would all
        match; the screen compares the percentile scheme's view instead, with the same outer percentiles.
        """
        return replace(self, scheme="percentile") if self.scheme == "histogram" else self

    def make(self, standard: list[float] | None = None) -> Normalizer:
        """A fresh (unfitted, except for the fixed window) normaliser following this spec; ``standard``:
        the cohort's landmarks a ``histogram`` normaliser maps onto (ignored by the other schemes)."""
        if self.scheme == "percentile":
            return PercentileNormalizer(self.lower_percentile, self.upper_percentile)
        if self.scheme == "histogram":
            percentiles = (self.lower_percentile, *INNER_LANDMARKS, self.upper_percentile)
            return HistogramNormalizer(percentiles, standard=standard)
        if self.scheme == "zscore":
            return ZScoreNormalizer()
        return WindowNormalizer(self.window)


def normalization_spec(modality: str, options: Any) -> NormalizationSpec:
    """A recipe's ``data.normalization.<modality>`` as a spec; a bad entry is one line naming it."""
    if not isinstance(options, dict):
        raise ConfigError(
            f"data.normalization.{modality} must be a mapping such as {{scheme: percentile}}, got {options!r}"
        )
    try:
        return NormalizationSpec(**options)
    except TypeError as exc:
        known = ", ".join(f.name for f in fields(NormalizationSpec))
        raise ConfigError(f"data.normalization.{modality}: unknown key ({exc}); valid keys: {known}") from exc
    except ConfigError as exc:
        raise ConfigError(f"data.normalization.{modality}: {exc}") from exc


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _cohort_normalizer(per_subject: list[dict[str, Any]]) -> dict[str, Any]:
    """Median of each numeric parameter over subjects, element-wise for lists of numbers (a histogram
    normaliser's landmarks); non-numeric ones are shared by construction."""
    merged = dict(per_subject[0])
    for key, value in per_subject[0].items():
        if _is_number(value):
            merged[key] = float(np.median([entry[key] for entry in per_subject]))
        elif isinstance(value, list) and value and all(_is_number(v) for v in value):
            merged[key] = np.median(
                np.array([entry[key] for entry in per_subject], dtype=np.float64), axis=0
            ).tolist()
    return merged


def _fit_standards(subjects: Subjects, specs: dict[str, NormalizationSpec]) -> dict[str, list[float]]:
    """The standard landmarks of each ``histogram`` modality, over the training subjects that have it."""
    relative: dict[str, list[np.ndarray]] = {m: [] for m, spec in specs.items() if spec.scheme == "histogram"}
    for _, volumes in subjects:
        for modality, found in relative.items():
            if modality in volumes:
                array = volumes[modality].array
                normalizer = specs[modality].make().fit(array, foreground_mask([array]))
                assert isinstance(normalizer, HistogramNormalizer)
                found.append(normalizer.relative_landmarks())
    return {modality: fit_standard(found) for modality, found in relative.items() if found}


@dataclass
class Fingerprint:
    """Normalisation specs, per-subject statistics and cohort-level parameters of the training set.

    ``subjects[id][modality]`` holds ``normalizer`` (fitted parameters), ``spacing`` and ``shape``;
    ``cohort[modality]`` the median normaliser used to bring synthetic outputs back to intensity scale.
    """

    specs: dict[str, NormalizationSpec]
    cohort: dict[str, dict[str, Any]]
    subjects: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)

    @classmethod
    def compute(
        cls,
        subjects: Subjects | Callable[[], Subjects],
        specs: dict[str, NormalizationSpec],
        *,
        partial: bool = False,
        augmented: AppearanceDraws | None = None,
    ) -> Fingerprint:
        """Fit per-subject parameters on **training** subjects and take their medians.

        ``subjects`` yields ``(subject_id, {modality: Volume})``, or is a function returning such an
        iterable; a generator that loads one subject at a time keeps memory flat. A ``histogram`` spec
        needs two passes (the cohort's standard landmarks first, then each subject mapped onto them), so
        with one, ``subjects`` must be a function or a sequence. Modalities not in ``specs`` are ignored.
        ``partial`` (unpaired data): a subject may lack some modalities; each modality's medians are
        taken over the subjects that have it, and every modality needs at least one. ``augmented`` (a
        run with ``data.augment``) adds each of its modalities' ``augmented_histograms`` to the
        subject's appearance: the out-of-distribution screen's reference for that run.
        """
        if not specs:
            raise ConfigError("a fingerprint needs at least one modality's normalisation spec")
        passes: Callable[[], Subjects] = subjects if callable(subjects) else lambda: subjects
        standards: dict[str, list[float]] = {}
        if any(spec.scheme == "histogram" for spec in specs.values()):
            if not callable(subjects) and iter(subjects) is subjects:
                raise TypeError(
                    "a histogram normalisation spec needs the subjects twice: pass a function or a list"
                )
            standards = _fit_standards(passes(), specs)
        per_subject: dict[str, dict[str, dict[str, Any]]] = {}
        for index, (subject_id, volumes) in enumerate(passes()):
            missing = sorted(set(specs) - set(volumes))
            if missing and not partial:
                raise DataError(
                    f"subject {subject_id!r} has no {', '.join(missing)} image; add it or drop the subject"
                )
            entry = {}
            for modality, spec in specs.items():
                if modality not in volumes:
                    continue
                volume = volumes[modality]
                mask = foreground_mask([volume.array])
                normalizer = spec.make(standards.get(modality)).fit(volume.array, mask)
                screen = (
                    normalizer
                    if spec.for_screen() == spec
                    else spec.for_screen().make().fit(volume.array, mask)
                )
                entry[modality] = {
                    "normalizer": normalizer.to_dict(),
                    "spacing": [round(s, 6) for s in volume.spacing],
                    "shape": list(volume.shape),
                    # What out-of-distribution checks compare inputs with (medsynth.model.ood).
                    "appearance": appearance_statistics(
                        volume, screen, mask, depth_normalizer=None if screen is normalizer else normalizer
                    ),
                }
                if augmented is not None and modality in augmented.modalities:
                    entry[modality]["appearance"]["augmented_histograms"] = augmented.histograms(
                        screen.forward(volume.array), mask, index
                    )
            per_subject[subject_id] = entry
        if not per_subject:
            raise DataError("no training subjects to compute the normalisation fingerprint from")
        absent = [m for m in specs if not any(m in entry for entry in per_subject.values())]
        if absent:
            raise DataError(
                f"no training subject has {', '.join(absent)}; the fingerprint needs at least one each"
            )
        cohort = {
            modality: _cohort_normalizer(
                [entry[modality]["normalizer"] for entry in per_subject.values() if modality in entry]
            )
            for modality in specs
        }
        return cls(specs=dict(specs), cohort=cohort, subjects=per_subject)

    @property
    def modalities(self) -> tuple[str, ...]:
        return tuple(self.specs)

    def _spec(self, modality: str) -> NormalizationSpec:
        if modality not in self.specs:
            known = ", ".join(self.specs) or "none"
            raise MedsynthError(f"the fingerprint has no statistics for {modality!r} (it covers: {known})")
        return self.specs[modality]

    def input_normalizer(
        self, modality: str, array: np.ndarray, *, own_mask: np.ndarray | None = None
    ) -> Normalizer:
        """Normaliser fitted on this volume inside its *own* foreground mask.

        The one rule for every image the network sees or is scored against: the cache (training and
        validation), inference and evaluation all call it. ``own_mask`` is only a way to pass
        ``foreground_mask([array])`` when the caller has it already (it costs seconds at 1 mm); never a
        joint mask of several inputs, which would scale each input differently from training.
        """
        spec = self._spec(modality)
        normalizer = spec.make(self.cohort[modality].get("standard"))
        return normalizer.fit(array, foreground_mask([array]) if own_mask is None else own_mask)

    def output_normalizer(self, modality: str) -> Normalizer:
        """Cohort-level normaliser whose ``inverse`` maps a synthetic ``modality`` back to intensities."""
        self._spec(modality)
        return normalizer_from_dict(self.cohort[modality])

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": _FORMAT,
            "version": _VERSION,
            "specs": {m: spec.to_dict() for m, spec in self.specs.items()},
            "cohort": self.cohort,
            "subjects": self.subjects,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Fingerprint:
        """Rebuild from :meth:`to_dict` output (e.g. the copy stored in a checkpoint)."""
        if data.get("format") != _FORMAT or data.get("version") != _VERSION:
            raise ValueError(f"not a version {_VERSION} medsynth fingerprint")
        specs = {m: NormalizationSpec.from_dict(s) for m, s in data["specs"].items()}
        return cls(specs=specs, cohort=data["cohort"], subjects=data.get("subjects", {}))

    def digest(self) -> str:
        """Short content hash: equal digests mean equal normalisation."""
        text = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def save(self, path: str | Path) -> Path:
        """Write ``fingerprint.json`` atomically."""
        return atomic_write_text(path, json.dumps(self.to_dict(), indent=1, sort_keys=True) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> Fingerprint:
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError as exc:
            raise DataError("fingerprint file not found; run training once to create it", path) from exc
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise DataError(f"cannot read the fingerprint ({exc}); delete it to recompute it", path) from exc
        try:
            return cls.from_dict(data)
        except (ConfigError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise DataError(
                f"not a valid medsynth fingerprint ({exc}); delete it to recompute it", path
            ) from exc
