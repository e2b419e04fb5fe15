"""Canonical modality names and the aliases users and file layouts use for them.

One vocabulary everywhere (configs, checkpoints, layouts, CLI): ``t1, t2, pd, flair, t1c, ct``.
"""

from __future__ import annotations

from .errors import MedsynthError

MODALITIES: tuple[str, ...] = ("t1", "t2", "pd", "flair", "t1c", "ct")

_ALIASES: dict[str, str] = {
    "t1": "t1", "t1w": "t1", "t1n": "t1", "mprage": "t1",
    "t2": "t2", "t2w": "t2",
    "pd": "pd", "pdw": "pd",
    "flair": "flair", "t2f": "flair", "t2flair": "flair", "t2-flair": "flair",
    "t1c": "t1c", "t1ce": "t1c", "t1gd": "t1c", "t1wce": "t1c",
    "ct": "ct",
}  # fmt: skip

#: Display names, as in BIDS suffixes.
DISPLAY_NAMES: dict[str, str] = {
    "t1": "T1w", "t2": "T2w", "pd": "PDw", "flair": "FLAIR", "t1c": "T1w+Gd", "ct": "CT",
}  # fmt: skip


def canonical_modality(name: str) -> str:
    """Return the canonical name of a modality, accepting aliases and any letter case.

    >>> canonical_modality("T2w")
    't2'
    """
    key = name.strip().lower()
    if key not in _ALIASES:
        valid = ", ".join(sorted(_ALIASES))
        raise MedsynthError(f"unknown modality {name!r}; known names: {valid}")
    return _ALIASES[key]


def is_modality(name: str) -> bool:
    """True when ``name`` is a modality name or alias."""
    return name.strip().lower() in _ALIASES
