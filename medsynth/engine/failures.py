"""Failures of a training session that are one line for the user: a full disk, a lost peer process."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

from ..io.atomic import disk_full_error, is_disk_full
from . import distributed


@contextlib.contextmanager
def one_line_failures(run_dir: Path, resume_hint: str) -> Iterator[None]:
    """A full disk at any write of the run (TensorBoard events, figures, logs) and a torchrun peer that
    died become one line that says how to continue; anything else passes unchanged."""
    try:
        yield
    except (OSError, RuntimeError) as exc:
        if is_disk_full(exc):
            raise disk_full_error(run_dir, resume_hint) from exc
        if isinstance(exc, RuntimeError) and distributed.is_peer_failure(exc):
            hint = f"torchrun ... -m medsynth train --resume {run_dir}"
            raise distributed.PeerFailure(distributed.peer_failure_message(exc, hint)) from exc
        raise
