"""How well two images of one subject line up, from their voxels alone: normalised mutual information.

Two modalities of one head share no intensity scale (CSF is bright in T2w, dark in T1w, and a CT speaks
Hounsfield units), but where one image has an edge the other has one too. Normalised mutual information
(Studholme's ``(H(A) + H(B)) / H(A, B)``, 1 for unrelated images, 2 for one image and itself) measures
that without any assumption on the scales, so it serves two places:

* ``medsynth data check`` asks whether a pair that claims to be aligned (one grid, one header) *looks*
  aligned: if the NMI rises clearly when one image slides by a voxel or two, the two are off
  (:func:`misalignment`); the fix is ``medsynth data register``.
* ``medsynth data register`` reports the NMI of each pair before and after registration in its QC table.

Both work on a strided sample of the voxels (about ``SAMPLE_VOXELS``), so a check costs milliseconds.
Intensities are binned by rank (equal-count bins), so a CT's long bone tail or an MR's bright vessels do
not leave most of the head in one bin.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

#: Bins per image of the joint histogram.
BINS = 32
#: About this many voxels are compared (a stride along every axis keeps the sample spatially uniform).
SAMPLE_VOXELS = 200_000
#: Shifts tried by :func:`misalignment`, in voxels of the images' own grid, along each axis.
SHIFTS = (-2, -1, 1, 2)
#: A pair is flagged when a shift raises its NMI above the identity's by more than this fraction of the
#: information the pair shares beyond chance. On the demo cohort at 2 mm every shift of an aligned pair
#: costs 10 % or more, and the best shift of a pair moved by 2-4 mm / 2-4 degrees gains 3.5 % or more.
GAIN_THRESHOLD = 0.02
#: Pairs sharing less information than this beyond chance (NMI units) are not judged: unrelated images
#: (noise, another subject's scan) show random gains. The demo's pairs share about 0.1.
MIN_SHARED = 0.01


def _edges(values: np.ndarray, bins: int = BINS) -> np.ndarray:
    """Inner edges of equal-count bins of ``values``; ties (a background) collapse into one bin."""
    return np.unique(np.quantile(values, np.linspace(0.0, 1.0, bins + 1)[1:-1]))


def _rank_bins(values: np.ndarray, edges: np.ndarray | None = None) -> np.ndarray:
    """Bin index (0 .. BINS - 1) of every value, by ``edges`` (default: the values' own)."""
    edges = _edges(values) if edges is None else edges
    return np.searchsorted(edges, values, side="right").astype(np.int64)


def _entropy(counts: np.ndarray) -> float:
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


def _nmi_of_bins(a: np.ndarray, b: np.ndarray, bins: int = BINS) -> float:
    joint = np.bincount((a * bins + b).ravel(), minlength=bins * bins).reshape(bins, bins)
    h_joint = _entropy(joint)
    return (_entropy(joint.sum(axis=1)) + _entropy(joint.sum(axis=0))) / h_joint if h_joint > 0 else 1.0


def _stride(shape: tuple[int, ...], voxels: int = SAMPLE_VOXELS) -> int:
    return max(1, math.ceil((math.prod(shape) / voxels) ** (1.0 / 3.0)))


def normalised_mutual_information(a: np.ndarray, b: np.ndarray) -> float:
    """Studholme's NMI of two arrays of one shape, on a strided sample of about ``SAMPLE_VOXELS``.

    >>> ramp = np.arange(4096.0).reshape(16, 16, 16)
    >>> round(normalised_mutual_information(ramp, -ramp), 3), normalised_mutual_information(ramp, 0 * ramp)
    (2.0, 1.0)
    """
    if np.shape(a) != np.shape(b):
        raise ValueError(f"arrays of shapes {np.shape(a)} and {np.shape(b)} cannot be compared")
    step = _stride(np.shape(a))
    index = (slice(None, None, step),) * np.ndim(a)
    return _nmi_of_bins(_rank_bins(np.asarray(a)[index]), _rank_bins(np.asarray(b)[index]))


@dataclass(frozen=True)
class ShiftGain:
    """The NMI of a pair as it is, under its best small shift (``axis``: 0, 1, 2; ``shift``: ``moving``
    sampled ``shift`` voxels further along the axis) and by chance (``moving``'s voxels shuffled)."""

    identity: float
    shifted: float
    axis: int
    shift: int
    chance: float

    @property
    def shared(self) -> float:
        """The information the pair shares as it is, beyond what two unrelated images of its size show."""
        return self.identity - self.chance

    @property
    def gain(self) -> float:
        """The best shift's NMI rise as a fraction of :attr:`shared`."""
        return (self.shifted - self.identity) / max(self.shared, 1e-6)


def shift_gain(reference: np.ndarray, moving: np.ndarray) -> ShiftGain:
    """Compare the pair as it is with ``moving`` slid by each of ``SHIFTS`` voxels along each axis.

    Every comparison uses the same voxels of ``reference`` (a core cropped by the largest shift), so the
    numbers differ only by where ``moving`` is sampled. Volumes thinner than ``2 * max(SHIFTS) + 2`` voxels
    along an axis are not slid along it. The chance level pairs the same voxels with ``moving``'s shuffled
    (a fixed seed: the same pair always gets the same answer).
    """
    if np.shape(reference) != np.shape(moving) or np.ndim(reference) != 3:
        raise ValueError(
            f"two 3D arrays of one shape are needed, got {np.shape(reference)}, {np.shape(moving)}"
        )
    margin = max(abs(s) for s in SHIFTS)
    shape = np.shape(reference)
    core = tuple(slice(margin, n - margin) if n > 2 * margin + 1 else slice(None) for n in shape)
    step = _stride(tuple(len(range(n)[c]) for n, c in zip(shape, core, strict=True)))
    strided = tuple(slice(c.start, c.stop, step) for c in core)
    fixed = _rank_bins(np.asarray(reference)[strided])
    edges = _edges(np.asarray(moving)[strided])  # one set of edges for every shifted sample
    sampled = _rank_bins(np.asarray(moving)[strided], edges)
    identity = _nmi_of_bins(fixed, sampled)
    chance = _nmi_of_bins(fixed, np.random.default_rng(0).permutation(sampled.ravel()).reshape(sampled.shape))
    best = ShiftGain(identity, identity, 0, 0, chance)
    for axis, n in enumerate(shape):
        if core[axis].start is None:
            continue
        for shift in SHIFTS:
            moved = list(strided)
            moved[axis] = slice(margin + shift, n - margin + shift, step)
            value = _nmi_of_bins(fixed, _rank_bins(np.asarray(moving)[tuple(moved)], edges))
            if value > best.shifted:
                best = ShiftGain(identity, value, axis, shift, chance)
    return best


def misalignment(reference: np.ndarray, moving: np.ndarray) -> ShiftGain | None:
    """The best small shift of a pair on one grid when it raises the NMI by more than ``GAIN_THRESHOLD``.

    None means the pair looks aligned, or cannot be judged (too thin, or sharing less than ``MIN_SHARED``
    beyond chance). A rotation without translation can escape this test; a registration's QC is the full
    answer (``medsynth data register``).
    """
    found = shift_gain(reference, moving)
    return found if found.shared >= MIN_SHARED and found.gain > GAIN_THRESHOLD else None
