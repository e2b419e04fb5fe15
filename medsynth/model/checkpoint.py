"""Self-describing, safely loadable checkpoints, and the one rule that turns a run folder into a file.

A checkpoint holds everything inference needs (the :class:`~medsynth.model.plan.SynthesisPlan`, the
generator's weights, the normalisation fingerprint) and, for ``checkpoint_latest.pt``, everything resume
needs (optimiser/scheduler/RNG state, epoch and step). It contains only tensors and plain Python
containers, so it is loaded with ``torch.load(weights_only=True)``: a tampered file cannot execute code.
"""

from __future__ import annotations

import hashlib
import io
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

from .. import __version__
from ..errors import CheckpointError, MedsynthError
from ..io.atomic import atomic_path, is_disk_full

FORMAT = "medsynth-checkpoint"
#: 2: the inference contract is a typed ``plan`` (version 1 held an untyped ``slicing`` dict).
FORMAT_VERSION = 2
BEST = "checkpoint_best.pt"
LATEST = "checkpoint_latest.pt"
#: What :func:`model_file_kind` calls a file, and how messages name each kind.
KIND_NAMES = {
    "checkpoint": "a torch checkpoint",
    "torchscript": "a TorchScript export",
    "pt2": "a pt2 (torch.export) export",
    "onnx": "an ONNX export",
}


def resolve_checkpoint(path: str | Path, which: str = BEST) -> Path:
    """A checkpoint file as given, or ``which`` (``checkpoint_best.pt``) inside a run folder."""
    path = Path(path)
    return path / which if path.is_dir() else path


def is_run_folder(folder: str | Path) -> bool:
    """A folder ``medsynth train`` made: its ``config.yaml`` beside a checkpoint, splits or fingerprint."""
    folder = Path(folder)
    if not (folder / "config.yaml").is_file():
        return False
    return any((folder / name).is_file() for name in (LATEST, BEST, "splits.json", "fingerprint.json"))


def model_file_kind(path: str | Path) -> str:
    """What a model file holds, told by its content, never by its ending.

    ``"checkpoint"`` (a ``torch.save`` archive or pickle), ``"torchscript"`` (a zip with ``code/``),
    ``"pt2"`` (a ``torch.export.save`` archive: a zip with ``archive_format``), ``"onnx"`` (a protobuf
    ``ModelProto``), or ``"unknown"`` (not a file, or none of these).

    >>> model_file_kind("no/such/file.pt")
    'unknown'
    """
    path = Path(path)
    try:
        with open(path, "rb") as stream:
            head = stream.read(64)
    except OSError:
        return "unknown"
    if head.startswith(b"PK\x03\x04"):
        try:
            with zipfile.ZipFile(path) as archive:
                names = archive.namelist()
        except (zipfile.BadZipFile, OSError, ValueError):
            return "unknown"
        if any("/code/" in name for name in names):
            return "torchscript"
        if any(name == "archive_format" or name.endswith("/archive_format") for name in names):
            return "pt2"
        return "checkpoint" if any(name.endswith("data.pkl") for name in names) else "unknown"
    if head[:1] == b"\x80":  # a pickle: the legacy torch.save format
        return "checkpoint"
    return "onnx" if _looks_like_onnx(head) else "unknown"


def _looks_like_onnx(head: bytes) -> bool:
    """An ONNX ``ModelProto`` begins with ``ir_version`` (field 1, a small varint) and then another field."""
    if head[:1] != b"\x08":
        return False
    value, shift, index = 0, 0, 1
    while index < len(head) and index <= 10:
        byte = head[index]
        value |= (byte & 0x7F) << shift
        shift, index = shift + 7, index + 1
        if not byte & 0x80:
            break
    else:
        return False
    if not 1 <= value <= 64 or index >= len(head):
        return False
    tag = head[index]
    return 2 <= tag >> 3 <= 30 and tag & 0x07 in (0, 2)


def save_checkpoint(payload: dict[str, Any], path: str | Path) -> Path:
    """Write ``payload`` atomically, stamped with the format and medsynth version.

    A failed write (disk full, quota, permissions) leaves the previous file of that name untouched and
    raises a one-line :class:`MedsynthError`, so a run can always be resumed from its last good save.
    """
    stamped = {"format": FORMAT, "format_version": FORMAT_VERSION, "medsynth_version": __version__, **payload}
    had_one = Path(path).is_file()
    # Serialised in memory first, then written by Python: a full disk is then an OSError carrying ENOSPC
    # (torch's own file writer reports it as "[enforce fail at inline_container.cc] unexpected pos"), and
    # the archive's inner folder is "archive", not the temporary file's name, so equal payloads give
    # equal bytes.
    buffer = io.BytesIO()
    try:
        with atomic_path(path) as temp, open(temp, "wb") as stream:
            torch.save(stamped, buffer)
            stream.write(buffer.getbuffer())
    except (OSError, RuntimeError, MedsynthError) as exc:
        # torch reports a failed write as RuntimeError wrapping the OS error text; atomic_path reports
        # a full disk it saw itself as a MedsynthError.
        full = is_disk_full(exc.__cause__ if isinstance(exc, MedsynthError) and exc.__cause__ else exc)
        if isinstance(exc, MedsynthError) and not full:
            raise
        reason = "the disk is full" if full else f"cannot write it ({exc})"
        kept = (
            "the previous checkpoint is intact, free space and resume"
            if had_one
            else "no earlier checkpoint of this name exists; free space and run again"
        )
        raise MedsynthError(f"checkpoint not saved: {reason}; {kept}", path) from exc
    return Path(path)


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a medsynth checkpoint (a file, or a run folder's best) without unpickling arbitrary objects.

    Raises :class:`CheckpointError` for a missing file, a file that is not a torch checkpoint, one that
    holds anything but tensors and containers (a tampered pickle), or one that is not medsynth's.
    """
    path = resolve_checkpoint(path)
    if not path.is_file():
        raise CheckpointError("no such checkpoint; pass a .pt file or a run folder", path)
    kind = model_file_kind(path)
    if kind in ("onnx", "torchscript", "pt2"):
        raise CheckpointError(
            f"this is {KIND_NAMES[kind]} of a model (medsynth export), not a medsynth checkpoint: "
            "`medsynth infer` runs it; to export or resume, pass the run folder or its checkpoint_best.pt",
            path,
        )
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
