"""Counter-based random draws: a sample's random numbers are a pure function of (seed, epoch, index, stream).

Shuffling aside, every random choice of the data layer (unified-mode modality subsets, 3D patch centres,
unpaired target draws, ``data.augment``) comes from here rather than from a stateful generator, so a
sample's draw does not depend on which batch or worker fetched it, and a resumed run sees the same
batches.
"""

from __future__ import annotations

import numpy as np


def _mix(x: np.ndarray) -> np.ndarray:
    """SplitMix64 finaliser: a fast, well-spread hash of uint64 values."""
    x = x + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def uniform_draws(seed: int, epoch: int, index: np.ndarray, stream: np.ndarray | int = 0) -> np.ndarray:
    """Uniform floats in [0, 1), one per broadcast ``(index, stream)`` pair, fixed by seed and epoch.

    Counter-based rather than a stateful generator, so a sample's draw does not depend on which batch
    or worker fetched it.
    """
    with np.errstate(over="ignore"):
        h = _mix(np.atleast_1d(np.asarray(seed, dtype=np.uint64)))
        h = _mix(h + np.uint64(epoch))
        h = _mix(h + np.asarray(index, dtype=np.uint64))
        h = _mix(h + np.asarray(stream, dtype=np.uint64))
    return (h >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))
