"""Did the training subjects ever show the model this input voxel? The uncertainty map's floor for inputs
outside the training data.

Both uncertainty estimators (:mod:`medsynth.model.uncertainty`) learn or sample the error *of inputs like
the training data*: the scale head predicts the small error of the tissue an unseen lesion resembles voxel
by voxel, and says "certain" where the model paints healthy tissue over it (docs/trust.md measures this).
A model knows nothing about an input it never had, so the honest error estimate there is that of a guess
made without the input: the target's mean absolute deviation from its median over the training subjects
(:attr:`TrainingSupport.uninformed_error`).

"Never had" is decided voxel by voxel from where each intensity occurred in the training heads: the
fingerprint stores, per training subject and modality, the counts of (normalised intensity, depth below
the head's surface) pairs (``appearance["depth_histogram"]``, :mod:`medsynth.data.appearance`). Depth is
the anatomical coordinate that needs no registration: fat and bone are bright or dark at the surface,
never 5 cm inside; a fat-bright or bone-dark blob deep in the brain (a haemorrhage, a lipoma, a
calcification, air) is a pair no training voxel had. An input voxel whose pair makes up less than
:data:`SUPPORT_FLOOR` of the training voxels, in any input modality, is *unseen*; there the map is raised
to at least the uninformed error. On healthy held-out subjects almost no voxel is unseen, so the map
elsewhere is the estimator's own.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np

from ..data.appearance import HIST_BINS, depth_below_surface, intensity_depth_bins
from ..data.fingerprint import Fingerprint

#: An (intensity, depth) pair rarer than this fraction of the training voxels is unseen (1 in 100 000;
#: the false alarms it gives on healthy subjects are measured in docs/trust.md).
SUPPORT_FLOOR = 1e-5


def _counts(fingerprint: Fingerprint, modality: str, skip: str | None = None) -> np.ndarray | None:
    """Pooled ``depth_histogram`` counts of ``modality`` over the training subjects (except ``skip``)."""
    tables = [
        np.asarray(entry[modality]["appearance"]["depth_histogram"], dtype=np.float64)
        for subject, entry in fingerprint.subjects.items()
        if subject != skip and "depth_histogram" in entry.get(modality, {}).get("appearance", {})
    ]
    return np.sum(tables, axis=0) if tables else None


def uninformed_error(histogram: np.ndarray) -> float:
    """Mean |y - median(y)| of intensities with this ``HIST_BINS`` histogram on [-1, 1] (bin centres):
    the expected error of predicting the median everywhere, which no input is needed for.

    >>> uninformed_error(np.eye(HIST_BINS)[0])  # every voxel in one bin: no spread
    0.0
    """
    fractions = np.asarray(histogram, dtype=np.float64)
    fractions = fractions / fractions.sum()
    centres = -1.0 + (np.arange(HIST_BINS) + 0.5) * (2.0 / HIST_BINS)
    median = centres[int(np.searchsorted(np.cumsum(fractions), 0.5))]
    return float(np.sum(fractions * np.abs(centres - median)))


@dataclass(frozen=True)
class TrainingSupport:
    """Where the training subjects had each input modality's intensities, and the target's spread."""

    #: modality -> (HIST_BINS, DEPTH_BINS) fractions of the training voxels.
    fractions: dict[str, np.ndarray]
    #: The target's mean absolute deviation from its median (normalised units): the map's floor.
    uninformed_error: float

    @classmethod
    def from_fingerprint(
        cls, fingerprint: Fingerprint, inputs: Iterable[str], target: str
    ) -> TrainingSupport | None:
        """The support of these inputs, or None for a checkpoint whose fingerprint predates the counts."""
        fractions = {}
        for modality in inputs:
            counts = _counts(fingerprint, modality)
            if counts is None or counts.sum() == 0:
                return None
            fractions[modality] = counts / counts.sum()
        histograms = [
            entry[target]["appearance"]["histogram"]
            for entry in fingerprint.subjects.values()
            if "appearance" in entry.get(target, {})
        ]
        if not histograms:
            return None
        return cls(fractions, uninformed_error(np.mean(histograms, axis=0)))

    def unseen(
        self, normalised: Mapping[str, np.ndarray], mask: np.ndarray, spacing: tuple[float, ...]
    ) -> np.ndarray:
        """Voxels inside ``mask`` whose (intensity, depth) pair is below :data:`SUPPORT_FLOOR` in any input
        (canonical normalised arrays, ``spacing`` their voxel size in mm)."""
        depth = depth_below_surface(mask, spacing)
        unseen = np.zeros(mask.shape, dtype=bool)
        for modality, table in self.fractions.items():
            intensity, layer = intensity_depth_bins(normalised[modality], depth)
            unseen |= table[intensity, layer] < SUPPORT_FLOOR
        return unseen & mask


def leave_one_out_unseen(fingerprint: Fingerprint, modality: str) -> dict[str, float]:
    """Per training subject: the fraction of its voxels that the *other* subjects' counts call unseen.

    How often healthy anatomy trips the floor (the false-alarm rate that :data:`SUPPORT_FLOOR` buys).
    """
    rates = {}
    for subject, entry in fingerprint.subjects.items():
        own = entry.get(modality, {}).get("appearance", {}).get("depth_histogram")
        others = _counts(fingerprint, modality, skip=subject)
        if own is None or others is None:
            continue
        own = np.asarray(own, dtype=np.float64)
        rare = others / others.sum() < SUPPORT_FLOOR
        rates[subject] = float(own[rare].sum() / max(own.sum(), 1.0))
    return rates
