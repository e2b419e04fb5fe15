"""One training per run folder: ``medsynth train`` holds a lock on its folder while it runs.

Two trainings writing one folder interleave their ``metrics.csv`` rows and overwrite each other's
checkpoints, so the second is refused with one line naming the first (process id, machine, start). The
lock is an advisory ``flock`` on ``<run>/.medsynth-train.lock``: the kernel releases it when its process
ends, however it ends (``kill -9`` included), so a lock left by a dead process is simply taken over. The
file names its holder for the message; a clean exit removes it. Under torchrun rank 0 alone holds it
(the other ranks never write the folder), and ``--resume`` takes it like a fresh start.

On a file system without ``flock`` (some network mounts) the file's contents decide: a live process on
this machine holds it, one on another machine holds it until the file is removed.

Example::

    with RunFolderLock(run_dir):
        claim_run_dir(run_dir, config)
        train(config, run_dir)
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import socket
import time
from pathlib import Path
from typing import Any

from ..errors import MedsynthError
from ..io.atomic import _pid_alive, disk_full_is_one_line

log = logging.getLogger("medsynth")

LOCK_NAME = ".medsynth-train.lock"
_NO_FLOCK = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: the file's contents decide
    fcntl = None  # type: ignore[assignment]


def _me() -> dict[str, Any]:
    return {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        "command": "medsynth train",
    }


def _read(fd: int) -> dict[str, Any]:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        data = json.loads(os.read(fd, 4096).decode("utf-8", "replace") or "{}")
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def describe_holder(holder: dict[str, Any]) -> str:
    """``pid 4121 on gpu-node-3, since 2025-01-31 09:12:40`` (what the lock file says)."""
    if not holder.get("pid"):
        return "a process that did not record itself"
    since = f", since {holder['started']}" if holder.get("started") else ""
    return f"pid {holder['pid']} on {holder.get('host', '?')}{since}"


def in_use_error(folder: Path, holder: dict[str, Any]) -> MedsynthError:
    return MedsynthError(
        f"this run folder is in use by another training ({describe_holder(holder)}); wait for it to end "
        "or stop it, or pick another --name",
        folder,
    )


class RunFolderLock:
    """The exclusive right to train into ``folder`` (created if missing), held until :meth:`release`."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self._fd: int | None = None

    def __enter__(self) -> RunFolderLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()

    def acquire(self) -> RunFolderLock:
        """Take the lock, or raise a one-line :class:`MedsynthError` naming the process that holds it."""
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise MedsynthError(f"cannot create the run folder ({exc.strerror})", self.folder) from exc
        with disk_full_is_one_line(self.path):
            while self._fd is None:
                try:
                    fd = os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
                except OSError as exc:
                    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                        raise
                    raise MedsynthError(f"cannot lock the run folder ({exc.strerror})", self.folder) from exc
                try:
                    if self._take(fd):
                        self._fd = fd
                except BaseException:
                    os.close(fd)
                    raise
                if self._fd is None:
                    os.close(fd)  # the file was replaced while we waited for it: try the new one
        return self

    def _take(self, fd: int) -> bool:
        """Lock ``fd``; False when it no longer is the file at :attr:`path` (removed by a releaser)."""
        locked = False
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                locked = True
            except BlockingIOError:
                raise in_use_error(self.folder, _read(fd)) from None
            except OSError as exc:
                if exc.errno not in _NO_FLOCK:
                    raise
        try:
            current = os.stat(self.path)
        except FileNotFoundError:
            return False
        here = os.fstat(fd)
        if (current.st_ino, current.st_dev) != (here.st_ino, here.st_dev):
            return False
        previous = _read(fd)
        if not locked and _held_elsewhere(previous):  # no flock here: the recorded holder decides
            raise in_use_error(self.folder, previous)
        if previous.get("pid") and previous.get("pid") != os.getpid():
            log.info(
                "run folder %s: taking over the lock of a training that is no longer running (%s)",
                self.folder, describe_holder(previous),
            )  # fmt: skip
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(_me()) + "\n").encode("utf-8"), 0)
        return True

    def release(self) -> None:
        """Remove the lock file and let go (idempotent); the next training takes the folder."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        with contextlib.suppress(OSError):
            self.path.unlink()  # while still locked: a waiter that opened it sees it is gone and retries
        os.close(fd)


def _held_elsewhere(holder: dict[str, Any]) -> bool:
    pid = holder.get("pid")
    if not isinstance(pid, int) or pid == os.getpid() and holder.get("host") == socket.gethostname():
        return False
    if holder.get("host") != socket.gethostname():
        return True
    return _pid_alive(pid)
