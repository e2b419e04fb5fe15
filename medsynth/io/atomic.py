"""Atomic file output: write to a temporary sibling, fsync, then rename over the target.

A reader never sees a half-written file, and a crash leaves either the old file or the new one. A
process killed mid-write (SIGKILL, out of memory, a node that lost power) cannot remove its temporary
file, so temporary names say who wrote them: ``.<stem>.<pid>-<host>.<token>.partial<suffixes>``, for
example ``.t2.4121-3fa91c.9e0b27d4.partial.nii.gz``. :func:`remove_stale_partials` removes the ones
whose writer is gone and never those of a process that is still running.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import re
import secrets
import shutil
import socket
import time
from collections.abc import Iterator
from pathlib import Path

from ..errors import MedsynthError

_PARTIAL = re.compile(
    r"^\.(?P<stem>.*)\.(?P<pid>[0-9]+)-(?P<host>[0-9a-f]{6})\.(?P<token>[0-9a-f]{8})\.partial(?:\.[^.]+)*$"
)

#: What a full disk says: no space, or the user's quota spent (the same for the user).
_DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)

#: A partial written on another machine (a shared output folder) is removed only when older than this.
FOREIGN_PARTIAL_AGE_S = 24 * 3600.0


def _host_tag() -> str:
    return hashlib.sha256(socket.gethostname().encode("utf-8")).hexdigest()[:6]


def partial_name(name: str, *, keep_suffixes: bool = True) -> str:
    """A hidden temporary name for ``name`` that records this process and machine.

    ``keep_suffixes`` keeps ``.nii.gz`` / ``.pt`` at the end so libraries that pick a format by
    extension behave; folders pass ``keep_suffixes=False``.

    >>> name = partial_name("t2.nii.gz")
    >>> name.startswith(".t2.") and name.endswith(".partial.nii.gz") and is_partial(name)
    True
    """
    stem, dot, suffixes = name.partition(".") if keep_suffixes else (name, "", "")
    return f".{stem}.{os.getpid()}-{_host_tag()}.{secrets.token_hex(4)}.partial{dot}{suffixes}"


def is_partial(name: str) -> bool:
    """True for a name made by :func:`partial_name`."""
    return _PARTIAL.match(name) is not None


def _pid_alive(pid: int) -> bool:
    """Can process ``pid`` still write? A zombie (ended, not yet reaped: a killed batch's workers in a
    container whose init does not reap) answers signals but writes nothing more."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # e.g. PermissionError: it exists, owned by someone else
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:  # no /proc (macOS, Windows): the signal's answer is all there is
        return True
    return stat[stat.rindex(")") + 2 :].split()[0] not in ("Z", "X")


def _is_stale(path: Path, now: float, foreign_age_s: float) -> bool:
    match = _PARTIAL.match(path.name)
    if match is None:
        return False
    if match["host"] == _host_tag():
        return not _pid_alive(int(match["pid"]))
    try:  # another machine's writer cannot be asked whether it still runs; only its age tells
        return now - path.lstat().st_mtime > foreign_age_s
    except OSError:
        return False


def remove_stale_partials(
    folder: str | Path, *, recursive: bool = False, foreign_age_s: float = FOREIGN_PARTIAL_AGE_S
) -> list[Path]:
    """Remove the temporary files and folders that killed writers left in ``folder``; return them.

    A partial is stale when it was written on this machine by a process that no longer exists, or
    on another machine (an output folder shared over NFS) more than ``foreign_age_s`` ago. Partials
    of live processes, this one included, are kept, and so is every name :func:`partial_name` did not
    make. A missing folder yields ``[]``.

    Example::

        removed = remove_stale_partials(run_dir)  # before writing checkpoints into run_dir again
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed: list[Path] = []
    now = time.time()
    try:
        entries = sorted(folder.iterdir())
    except OSError:
        return []
    for entry in entries:
        if _is_stale(entry, now, foreign_age_s):
            try:
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry)
                else:
                    entry.unlink()
            except FileNotFoundError:
                pass
            except OSError:
                continue
            removed.append(entry)
        elif recursive and entry.is_dir() and not entry.is_symlink():
            removed += remove_stale_partials(entry, recursive=True, foreign_age_s=foreign_age_s)
    return removed


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path in the target's folder; move it onto ``path`` if the block succeeds.

    The temporary name (:func:`partial_name`) keeps the target's suffixes (``.nii.gz``, ``.pt``) so
    libraries that pick a format by extension behave. On any error the temporary file is removed and
    the target untouched; if the process is killed, :func:`remove_stale_partials` removes it later.
    """
    path = Path(path)
    folder = path.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise MedsynthError(f"cannot create output folder ({exc.strerror})", folder) from exc
    name = path.name if "." in path.name else f"{path.name}.tmp"
    temp = folder / partial_name(name)
    # Created like an ordinary new file (umask applies), exclusively: the random token never collides.
    try:
        os.close(os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    except OSError as exc:
        if is_disk_full(exc):
            raise disk_full_error(path) from exc
        raise MedsynthError(f"cannot write here ({exc.strerror})", folder) from exc
    try:
        yield temp
        with open(temp, "rb") as stream:
            os.fsync(stream.fileno())
        os.replace(temp, path)
    except OSError as exc:
        temp.unlink(missing_ok=True)
        if is_disk_full(exc):
            raise disk_full_error(path) from exc
        raise
    except BaseException:
        temp.unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write a small text file (JSON, CSV, YAML) atomically."""
    with atomic_path(path) as temp:
        temp.write_text(text, encoding="utf-8")
    return Path(path)


# ------------------------------------------------------------------------------- full disk
def is_disk_full(exc: BaseException) -> bool:
    """True when ``exc`` says the disk (or the user's quota) is full.

    An :class:`OSError` carries ``ENOSPC`` / ``EDQUOT``; libraries that write through their own C++
    streams (``torch.save``, TensorBoard) raise a ``RuntimeError`` whose text says so instead.
    """
    if isinstance(exc, OSError) and exc.errno in _DISK_FULL_ERRNOS:
        return True
    if not isinstance(exc, (OSError, RuntimeError)):
        return False
    text = str(exc).lower()
    return "no space left" in text or "disk quota" in text or "file write failed" in text


def disk_full_error(path: str | Path, hint: str = "free some space and run again") -> MedsynthError:
    """The one line every write of medsynth says when the disk is full."""
    return MedsynthError(f"no space left on the device (the disk is full); {hint}", path)


@contextlib.contextmanager
def disk_full_is_one_line(path: str | Path, hint: str = "free some space and run again") -> Iterator[None]:
    """Turn a full disk inside the block into :func:`disk_full_error`; other errors pass unchanged.

    For writes that cannot go through :func:`atomic_path` (an appended log, a lock file, a library's
    own writer thread) and around whole commands, so a full disk is one line wherever it strikes.

    Example::

        with disk_full_is_one_line(run_dir / "metrics.csv"):
            append_row(run_dir / "metrics.csv", row)
    """
    try:
        yield
    except MedsynthError:
        raise
    except (OSError, RuntimeError) as exc:
        if is_disk_full(exc):
            raise disk_full_error(path, hint) from exc
        raise
