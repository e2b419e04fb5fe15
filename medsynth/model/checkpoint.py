"""Self-describing, safely loadable checkpoints, and the one rule that turns a run folder into a file.

A checkpoint holds everything inference needs (the :class:`~medsynth.model.plan.SynthesisPlan`, the
generator's weights, the normalisation fingerprint) and, for ``checkpoint_latest.pt``, everything resume
needs (optimiser/scheduler/RNG state, epoch and step). It contains only tensors and plain Python
containers, so it is loaded with ``torch.load(weights_only=True)``: a tampered file cannot execute code.
"""

from __future__ import annotations

import errno
import hashlib
import pickle
from pathlib import Path
from typing import Any

import torch

from .. import __version__
from ..errors import CheckpointError, MedsynthError
from ..io.atomic import atomic_path

FORMAT = "medsynth-checkpoint"
#: 2: the inference contract is a typed ``plan`` (version 1 held an untyped ``slicing`` dict).
FORMAT_VERSION = 2
BEST = "checkpoint_best.pt"
LATEST = "checkpoint_latest.pt"


def resolve_checkpoint(path: str | Path, which: str = BEST) -> Path:
    """A checkpoint file as given, or ``which`` (``checkpoint_best.pt``) inside a run folder."""
    path = Path(path)
    return path / which if path.is_dir() else path


def save_checkpoint(payload: dict[str, Any], path: str | Path) -> Path:
    """Write ``payload`` atomically, stamped with the format and medsynth version.

    A failed write (disk full, quota, permissions) leaves the previous file of that name untouched and
    raises a one-line :class:`MedsynthError`, so a run can always be resumed from its last good save.
    """
    stamped = {"format": FORMAT, "format_version": FORMAT_VERSION, "medsynth_version": __version__, **payload}
    try:
        with atomic_path(path) as temp:
            torch.save(stamped, temp)
    except (OSError, RuntimeError) as exc:
        # torch reports a failed write as RuntimeError wrapping the OS error text.
        reason = "the disk is full" if _is_disk_full(exc) else f"cannot write it ({exc})"
        raise MedsynthError(
            f"checkpoint not saved: {reason}; the previous checkpoint is intact, free space and resume",
            path,
        ) from exc
    return Path(path)


def _is_disk_full(exc: BaseException) -> bool:
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(exc).lower()
    return "no space left" in text or "disk quota" in text or "file write failed" in text


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a medsynth checkpoint (a file, or a run folder's best) without unpickling arbitrary objects.

    Raises :class:`CheckpointError` for a missing file, a file that is not a torch checkpoint, one that
    holds anything but tensors and containers (a tampered pickle), or one that is not medsynth's.
    """
    path = resolve_checkpoint(path)
    if not path.is_file():
        raise CheckpointError("no such checkpoint; pass a .pt file or a run folder", path)
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            "refused to load: the file contains objects other than tensors and plain data "
            "(not a medsynth checkpoint, or tampered with)",
            path,
        ) from exc
    except (
        Exception
    ) as exc:  # torch raises many kinds for garbage input (KeyError, RuntimeError, EOFError...)
        raise CheckpointError(
            f"not a readable checkpoint ({exc.__class__.__name__}); is the file complete?", path
        ) from exc
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError("not a medsynth checkpoint (no medsynth format stamp)", path)
    if payload.get("format_version", 0) > FORMAT_VERSION:
        raise CheckpointError(
            f"written by a newer medsynth ({payload.get('medsynth_version')}); upgrade medsynth to read it",
            path,
        )
    return payload


def file_digest(path: str | Path) -> str:
    """SHA-256 of a file, recorded next to outputs so results trace back to the exact checkpoint."""
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
