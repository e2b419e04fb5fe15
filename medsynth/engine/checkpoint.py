"""Self-describing, safely loadable checkpoints.

A checkpoint holds everything inference needs (task, network constructor arguments, normalisation
fingerprint, slicing settings) and everything resume needs (optimiser/scheduler/RNG state, epoch and
step). It contains only tensors and plain Python containers, so it is loaded with
``torch.load(weights_only=True)``: a tampered file cannot execute code.
"""

from __future__ import annotations

import hashlib
import pickle
from pathlib import Path
from typing import Any

import torch

from .. import __version__
from ..errors import CheckpointError
from ..io.atomic import atomic_path

FORMAT = "medsynth-checkpoint"
FORMAT_VERSION = 1


def save_checkpoint(payload: dict[str, Any], path: str | Path) -> Path:
    """Write ``payload`` atomically, stamped with the format and medsynth version."""
    stamped = {"format": FORMAT, "format_version": FORMAT_VERSION, "medsynth_version": __version__, **payload}
    with atomic_path(path) as temp:
        torch.save(stamped, temp)
    return Path(path)


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a medsynth checkpoint without unpickling arbitrary objects.

    Raises :class:`CheckpointError` for a missing file, a file that is not a torch checkpoint, one that
    holds anything but tensors and containers (a tampered pickle), or one that is not medsynth's.
    """
    path = Path(path)
    if path.is_dir():
        path = path / "checkpoint_best.pt"
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
