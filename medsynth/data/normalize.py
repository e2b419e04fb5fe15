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


_SCHEMES: dict[str, type[Normalizer]] = {
    cls.scheme: cls for cls in (PercentileNormalizer, ZScoreNormalizer, WindowNormalizer)
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
