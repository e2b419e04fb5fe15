"""Intensity normalisation: map a modality's intensities to the network's range and back exactly.

MR intensities have no physical unit and vary between scanners and subjects, so MR volumes are
normalised with their own statistics inside the foreground (``PercentileNormalizer``,
``ZScoreNormalizer``). CT is calibrated in Hounsfield units, so it gets a fixed window
(``WindowNormalizer``) and needs no fitting. Every normaliser is a pair of affine maps (plus a clip for
the windowed ones), so ``inverse(forward(x)) == x`` for every ``x`` inside the clip range, up to float32
rounding; that is what lets a synthetic image go back to a modality's intensity scale.

Parameters round-trip through plain dicts (``to_dict`` / :func:`normalizer_from_dict`) so they can live
in ``fingerprint.json``, the cache's ``meta.json`` and checkpoints.

>>> import numpy as np
>>> norm = WindowNormalizer(window=(-1000.0, 1000.0))
>>> norm.forward(np.array([-1000.0, 0.0, 1000.0]))
array([-1.,  0.,  1.], dtype=float32)
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar

import numpy as np

from ..errors import ConfigError


def _foreground_values(array: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    """Voxels the statistics are taken from: the mask's, or all of them when the mask is absent or empty.

    An empty mask means no foreground was found (a blank or constant image); the whole image is then
    the only honest sample, and it keeps fitting total instead of failing deep inside training.
    """
    values = np.asarray(array, dtype=np.float64)
    if mask is None:
        return values.ravel()
    mask = np.asarray(mask, dtype=bool)
    if mask.shape != values.shape:
        raise ValueError(f"mask shape {mask.shape} does not match the image shape {values.shape}")
    selected = values[mask]
    return selected if selected.size else values.ravel()


class Normalizer(ABC):
    """Forward (intensity -> network range) and inverse maps with parameters fitted on one volume."""

    #: Name stored in ``to_dict()["scheme"]`` and used by :func:`normalizer_from_dict`.
    scheme: ClassVar[str]

    def fit(self, array: np.ndarray, mask: np.ndarray | None = None) -> Normalizer:
        """Estimate the parameters from ``array`` inside ``mask``; returns ``self`` for chaining."""
        return self

    @abstractmethod
    def forward(self, array: np.ndarray) -> np.ndarray:
        """Map intensities to the network's range (float32)."""

    @abstractmethod
    def inverse(self, array: np.ndarray) -> np.ndarray:
        """Map network outputs back to intensities (float32)."""

    @abstractmethod
    def params(self) -> dict[str, Any]:
        """The parameters as JSON types (without the scheme)."""

    def to_dict(self) -> dict[str, Any]:
        return {"scheme": self.scheme, **self.params()}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.params().items())
        return f"{type(self).__name__}({args})"


class _RangeNormalizer(Normalizer):
    """Clip to ``[lower, upper]`` then map that range linearly onto ``[-1, 1]``.

    Computed in float64 so the inverse reproduces the input to float32 precision.
    """

    lower: float | None
    upper: float | None

    def _bounds(self) -> tuple[float, float]:
        if self.lower is None or self.upper is None:
            raise RuntimeError(f"{type(self).__name__} is not fitted; call fit() first")
        return self.lower, self.upper

    def forward(self, array: np.ndarray) -> np.ndarray:
        lower, upper = self._bounds()
        clipped = np.clip(np.asarray(array, dtype=np.float64), lower, upper)
        return ((clipped - lower) * (2.0 / (upper - lower)) - 1.0).astype(np.float32)

    def inverse(self, array: np.ndarray) -> np.ndarray:
        lower, upper = self._bounds()
        values = np.asarray(array, dtype=np.float64)
        return ((values + 1.0) * ((upper - lower) / 2.0) + lower).astype(np.float32)


class PercentileNormalizer(_RangeNormalizer):
    """MR: clip to the foreground's lower/upper percentiles and scale that range to ``[-1, 1]``.

    Percentiles rather than min/max because a few hot voxels (vessels, artefacts) would otherwise
    squeeze the tissue contrast into a sliver of the range.
    """

    scheme = "percentile"

    def __init__(
        self,
        lower_percentile: float = 0.5,
        upper_percentile: float = 99.5,
        lower: float | None = None,
        upper: float | None = None,
    ) -> None:
        if not 0.0 <= lower_percentile < upper_percentile <= 100.0:
            raise ConfigError(
                f"percentiles must satisfy 0 <= lower < upper <= 100, got {lower_percentile} and {upper_percentile}"
            )
        self.lower_percentile = float(lower_percentile)
        self.upper_percentile = float(upper_percentile)
        self.lower = None if lower is None else float(lower)
        self.upper = None if upper is None else float(upper)

    def fit(self, array: np.ndarray, mask: np.ndarray | None = None) -> PercentileNormalizer:
        values = _foreground_values(array, mask)
        lower, upper = np.percentile(values, [self.lower_percentile, self.upper_percentile])
        # A constant foreground has no range; a unit range keeps the map invertible.
        self.lower, self.upper = float(lower), float(upper) if upper > lower else float(lower) + 1.0
        return self

    def params(self) -> dict[str, Any]:
        return {
            "lower_percentile": self.lower_percentile,
            "upper_percentile": self.upper_percentile,
            "lower": self.lower,
            "upper": self.upper,
        }


class WindowNormalizer(_RangeNormalizer):
    """CT: a fixed Hounsfield window (default the full 12-bit range) mapped to ``[-1, 1]``; no fitting.

    HU are already comparable between scanners, and a fixed window keeps a synthetic CT's numbers
    meaningful (air -1000, water 0, bone > 300) instead of relative to its own histogram.
    """

    scheme = "window"

    def __init__(self, window: tuple[float, float] = (-1024.0, 3071.0)) -> None:
        lower, upper = (float(v) for v in window)
        if not upper > lower:
            raise ConfigError(f"a CT window needs lower < upper, got {window}")
        self.lower, self.upper = lower, upper

    def params(self) -> dict[str, Any]:
        return {"window": [self.lower, self.upper]}


class ZScoreNormalizer(Normalizer):
    """Subtract the foreground mean and divide by its standard deviation (no clipping)."""

    scheme = "zscore"

    def __init__(self, mean: float | None = None, std: float | None = None) -> None:
        self.mean = None if mean is None else float(mean)
        self.std = None if std is None else float(std)

    def fit(self, array: np.ndarray, mask: np.ndarray | None = None) -> ZScoreNormalizer:
        values = _foreground_values(array, mask)
        std = float(values.std())
        self.mean, self.std = float(values.mean()), std if std > 0 else 1.0
        return self

    def _stats(self) -> tuple[float, float]:
        if self.mean is None or self.std is None:
            raise RuntimeError("ZScoreNormalizer is not fitted; call fit() first")
        return self.mean, self.std

    def forward(self, array: np.ndarray) -> np.ndarray:
        mean, std = self._stats()
        return ((np.asarray(array, dtype=np.float64) - mean) / std).astype(np.float32)

    def inverse(self, array: np.ndarray) -> np.ndarray:
        mean, std = self._stats()
        return (np.asarray(array, dtype=np.float64) * std + mean).astype(np.float32)

    def params(self) -> dict[str, Any]:
        return {"mean": self.mean, "std": self.std}


#: Inner landmarks of :class:`HistogramNormalizer`: the foreground's deciles (Nyul and Udupa's choice,
#: and TorchIO's ``HistogramStandardization`` default); the outer two are the spec's percentiles.
INNER_LANDMARKS = tuple(float(p) for p in range(10, 100, 10))


def _strictly_increasing(values: np.ndarray) -> np.ndarray:
    """Landmarks nudged apart where intensities tie (quantised or near-constant images), so the
    piecewise-linear map and its inverse stay functions; a constant foreground gets a unit range, as
    :class:`PercentileNormalizer` gives it."""
    values = np.asarray(values, dtype=np.float64)
    span = values[-1] - values[0]
    ramp = np.linspace(0.0, 1.0, len(values))
    if not span > 0:
        return values[0] + ramp
    values = np.maximum.accumulate(values)
    return values + ramp * (1e-6 * span) if np.any(np.diff(values) <= 0) else values


class HistogramNormalizer(Normalizer):
    """MR from several protocols: the foreground's percentile landmarks mapped onto the training cohort's.

    :class:`PercentileNormalizer` removes a scanner's gain and offset; it cannot remove a change in
    *contrast*: an MPRAGE or a 1.5 T T1w spaces grey matter, white matter and CSF differently from the
    spin echo a model was trained on, and the network sees tissue intensities it never met. Histogram
    standardisation (Nyul and Udupa 2000; TorchIO's ``HistogramStandardization``) takes, per volume,
    ``landmarks`` at the ``percentiles`` of its foreground (its 0.5th, its deciles, its 99.5th: tissue
    classes whose share of a head barely changes between people) and maps them piecewise-linearly onto the
    cohort's ``standard`` landmarks, which :class:`~medsynth.data.fingerprint.Fingerprint` fits on the
    training subjects (the median of their landmarks, each subject's first scaled to [-1, 1] between its
    outer ones). Intensities outside the outer landmarks are clipped, as the percentile scheme clips them,
    so the outer landmarks land on -1 and 1 and the map is that scheme's plus a monotone correction.

    Both maps are monotone and piecewise linear through the same points, so ``inverse(forward(x)) == x``
    between the outer landmarks, to float32 rounding.
    """

    scheme = "histogram"

    def __init__(
        self,
        percentiles: tuple[float, ...] | list[float] = (0.5, *INNER_LANDMARKS, 99.5),
        standard: list[float] | None = None,
        landmarks: list[float] | None = None,
    ) -> None:
        self.percentiles = tuple(float(p) for p in percentiles)
        if len(self.percentiles) < 2 or not all(
            0.0 <= a < b <= 100.0 for a, b in zip(self.percentiles, self.percentiles[1:], strict=False)
        ):
            raise ConfigError(
                f"landmark percentiles must increase within [0, 100], got {list(self.percentiles)}"
            )
        self.standard = None if standard is None else self._checked(standard, "standard")
        self.landmarks = None if landmarks is None else self._checked(landmarks, "landmarks")

    def _checked(self, values: list[float], name: str) -> np.ndarray:
        array = np.asarray(values, dtype=np.float64)
        if array.shape != (len(self.percentiles),) or np.any(np.diff(array) <= 0):
            raise ConfigError(
                f"{name} must be {len(self.percentiles)} increasing numbers (one per percentile), got {values}"
            )
        return array

    def fit(self, array: np.ndarray, mask: np.ndarray | None = None) -> HistogramNormalizer:
        self.landmarks = _strictly_increasing(
            np.percentile(_foreground_values(array, mask), self.percentiles)
        )
        return self

    def relative_landmarks(self) -> np.ndarray:
        """This volume's landmarks scaled to [-1, 1] between the outer two: what a standard is fitted on."""
        landmarks = self._fitted()[0]
        return (landmarks - landmarks[0]) * (2.0 / (landmarks[-1] - landmarks[0])) - 1.0

    def _fitted(self) -> tuple[np.ndarray, np.ndarray | None]:
        if self.landmarks is None:
            raise RuntimeError("HistogramNormalizer is not fitted; call fit() first")
        return self.landmarks, self.standard

    def _maps(self) -> tuple[np.ndarray, np.ndarray]:
        landmarks, standard = self._fitted()
        if standard is None:
            raise RuntimeError("HistogramNormalizer has no standard landmarks; the fingerprint fits them")
        return landmarks, standard

    def forward(self, array: np.ndarray) -> np.ndarray:
        landmarks, standard = self._maps()  # np.interp clips beyond the outer landmarks
        return np.interp(np.asarray(array, dtype=np.float64), landmarks, standard).astype(np.float32)

    def inverse(self, array: np.ndarray) -> np.ndarray:
        landmarks, standard = self._maps()
        return np.interp(np.asarray(array, dtype=np.float64), standard, landmarks).astype(np.float32)

    def params(self) -> dict[str, Any]:
        return {
            "percentiles": list(self.percentiles),
            "standard": None if self.standard is None else self.standard.tolist(),
            "landmarks": None if self.landmarks is None else self.landmarks.tolist(),
        }


def fit_standard(relative_landmarks: list[np.ndarray]) -> list[float]:
    """The cohort's standard landmarks: the median over subjects of each one's relative landmarks.

    Medians, as for every cohort-level number of the fingerprint, so one odd subject cannot move it;
    the median of increasing sequences increases, and the outer ones are exactly -1 and 1.
    """
    return _strictly_increasing(np.median(np.stack(relative_landmarks), axis=0)).tolist()


_SCHEMES: dict[str, type[Normalizer]] = {
    cls.scheme: cls for cls in (PercentileNormalizer, ZScoreNormalizer, WindowNormalizer, HistogramNormalizer)
}


def normalizer_from_dict(data: dict[str, Any]) -> Normalizer:
    """Rebuild a normaliser from ``Normalizer.to_dict()`` output; unknown schemes list the valid ones."""
    params = dict(data)
    scheme = params.pop("scheme", None)
    if scheme not in _SCHEMES:
        raise ConfigError(
            f"unknown normalisation scheme {scheme!r}; valid schemes: {', '.join(sorted(_SCHEMES))}"
        )
    if scheme == "window":
        params["window"] = tuple(params["window"])
    return _SCHEMES[scheme](**params)
