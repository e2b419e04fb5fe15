"""User-facing errors.

A :class:`MedsynthError` is a mistake the user can fix (bad path, corrupt file, unknown modality).
The CLI prints it as one line and exits non-zero; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

from pathlib import Path


class MedsynthError(Exception):
    """A problem with the user's input or request, explained in one line."""

    def __init__(self, message: str, path: str | Path | None = None) -> None:
        self.path = Path(path) if path is not None else None
        super().__init__(f"{path}: {message}" if path is not None else message)


class DataError(MedsynthError):
    """An input file or folder cannot be used (unreadable, corrupt, wrong shape, NaN, ...)."""


class GeometryError(MedsynthError):
    """Volumes that should share a grid do not (and cannot be resampled safely)."""


class ConfigError(MedsynthError):
    """A configuration key or value is invalid."""


class CheckpointError(MedsynthError):
    """A checkpoint is missing, corrupt, not a medsynth checkpoint or incompatible."""
