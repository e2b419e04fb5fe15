"""Atomic file output: write to a temporary sibling, fsync, then rename over the target.

A reader never sees a half-written file, and a crash leaves either the old file or the new one.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from ..errors import MedsynthError


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path in the target's folder; move it onto ``path`` if the block succeeds.

    The temporary name keeps the target's suffixes (``.nii.gz``, ``.pt``) so libraries that pick a
    format by extension behave. On any error the temporary file is removed and the target untouched.
    """
    path = Path(path)
    folder = path.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise MedsynthError(f"cannot create output folder ({exc.strerror})", folder) from exc
    suffix = "".join(path.suffixes) or ".tmp"
    try:
        handle, temp_name = tempfile.mkstemp(prefix=f".{path.name.split('.')[0]}-", suffix=suffix, dir=folder)
    except OSError as exc:
        raise MedsynthError(f"cannot write here ({exc.strerror})", folder) from exc
    os.close(handle)
    temp = Path(temp_name)
    # mkstemp creates 0600 files; give outputs the permissions of an ordinary new file (umask applies).
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(temp, 0o666 & ~umask)
    try:
        yield temp
        with open(temp, "rb") as stream:
            os.fsync(stream.fileno())
        os.replace(temp, path)
    except OSError as exc:
        temp.unlink(missing_ok=True)
        if exc.errno == 28:  # ENOSPC
            raise MedsynthError("no space left on the device; free some space and run again", path) from exc
        raise
    except BaseException:
        temp.unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write a small text file (JSON, CSV, YAML) atomically."""
    with atomic_path(path) as temp:
        temp.write_text(text, encoding="utf-8")
    return Path(path)
