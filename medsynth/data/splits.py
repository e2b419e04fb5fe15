"""Subject-level train/val/test splits: seeded, saved once, reused.

Splitting by subject (never by slice or patch) keeps a subject's anatomy out of the split that
evaluates it. The split is drawn from the *sorted* ids, so the order in which a layout happens to list
subjects does not change it, and it is written once to ``splits.json``: later runs, resumed runs and
evaluation read the same file. A user may supply their own ``splits.json``; it is validated, not
trusted.

>>> make_splits([f"sub-{i:02d}" for i in range(10)], val=2, test=2, seed=0)["val"]
['sub-04', 'sub-06']
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Collection, Iterable
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import MedsynthError
from ..io.atomic import atomic_write_text

log = logging.getLogger("medsynth")

SPLIT_NAMES: tuple[str, ...] = ("train", "val", "test")


def _count(share: float, total: int, name: str) -> int:
    """An int is a number of subjects; a float in [0, 1) a fraction of them (at least one)."""
    if isinstance(share, bool) or share < 0:
        raise MedsynthError(f"{name} must be a fraction in [0, 1) or a number of subjects, got {share!r}")
    if isinstance(share, int):
        return share
    if share >= 1:
        raise MedsynthError(f"{name}={share} is not a fraction; give a value below 1 or an integer count")
    return max(1, int(round(share * total)))


def make_splits(
    ids: Iterable[str],
    *,
    val: float = 0.15,
    test: float = 0.15,
    seed: int = 0,
    prefer_held_out: Collection[str] | None = None,
) -> dict[str, list[str]]:
    """Draw a seeded ``{"train", "val", "test"}`` split with at least one subject in each.

    ``prefer_held_out``: ids that val and test are drawn from first, while they last (unpaired training
    names the subjects that have both images, the only ones a synthetic image can be scored against:
    :func:`medsynth.data.pairing.complete_subjects`). Without it every subject is equally likely.
    """
    ordered = sorted(ids)
    duplicates = sorted(i for i, n in Counter(ordered).items() if n > 1)
    if duplicates:
        raise MedsynthError(f"subject ids are not unique: {', '.join(duplicates)}")
    n_val, n_test = _count(val, len(ordered), "val"), _count(test, len(ordered), "test")
    if n_val < 1 or n_test < 1 or len(ordered) - n_val - n_test < 1:
        needed = max(n_val, 1) + max(n_test, 1) + 1
        raise MedsynthError(
            f"{len(ordered)} subjects cannot fill train, val ({n_val}) and test ({n_test}) with at least one "
            f"subject each; at least {needed} subjects are needed (or lower val/test)"
        )
    order = np.random.default_rng(seed).permutation(len(ordered))
    shuffled = [ordered[i] for i in order]
    if prefer_held_out is not None:  # a stable sort keeps the seeded order within each group
        preferred = set(prefer_held_out)
        shuffled.sort(key=lambda subject: subject not in preferred)
    return {
        "train": sorted(shuffled[n_val + n_test :]),
        "val": sorted(shuffled[:n_val]),
        "test": sorted(shuffled[n_val : n_val + n_test]),
    }


def validate_splits(
    splits: dict[str, list[str]], ids: Iterable[str], path: str | Path | None = None
) -> list[str]:
    """Check a split against the dataset's ids; return the ids that are in no split.

    Raises :class:`MedsynthError` for a missing or malformed split, an id the dataset does not
    have, or a subject listed twice.
    """
    known = set(ids)
    if not isinstance(splits, dict) or any(not isinstance(splits.get(name), list) for name in SPLIT_NAMES):
        raise MedsynthError('a split file must hold lists "train", "val" and "test" of subject ids', path)
    for name in ("train", "val"):
        if not splits[name]:
            raise MedsynthError(f'the "{name}" split is empty; put at least one subject in it', path)
    seen: dict[str, str] = {}
    for name in SPLIT_NAMES:
        for subject in splits[name]:
            if subject in seen:
                where = name if seen[subject] == name else f"{seen[subject]} and {name}"
                raise MedsynthError(
                    f"subject {subject!r} is listed twice ({where}); keep it in one split", path
                )
            seen[subject] = name
    unknown = sorted(set(seen) - known)
    if unknown:
        raise MedsynthError(
            f"unknown subject ids {', '.join(unknown)}; remove them or fix the data path", path
        )
    return sorted(known - set(seen))


def load_or_create_splits(path: str | Path, ids: Iterable[str], **kwargs: Any) -> dict[str, list[str]]:
    """Reuse ``path`` if it exists (validated), otherwise draw a split and write it there atomically.

    ``kwargs`` go to :func:`make_splits` and only matter the first time. Subjects the file does not
    mention (added to the dataset later) stay out of training and are reported as a warning.
    """
    path = Path(path)
    ids = list(ids)
    if not path.exists():
        splits = make_splits(ids, **kwargs)
        atomic_write_text(path, json.dumps(splits, indent=1) + "\n")
        return splits
    try:
        splits = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise MedsynthError(f"cannot read the split file ({exc}); fix or delete it", path) from exc
    absent = validate_splits(splits, ids, path)
    if absent:
        log.warning("%s: %d subject(s) in no split, not used: %s", path, len(absent), ", ".join(absent))
    return {name: list(splits[name]) for name in SPLIT_NAMES}
