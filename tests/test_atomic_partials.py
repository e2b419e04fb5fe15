"""Temporary names of atomic writes, and the removal of those a killed writer left behind."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from medsynth.io import atomic
from medsynth.io.atomic import atomic_path, is_partial, partial_name, remove_stale_partials


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def _partial(folder: Path, name: str, pid: int, host: str | None = None, *, directory: bool = False) -> Path:
    made = partial_name(name, keep_suffixes=not directory)
    stem, _, rest = made[1:].partition(f".{os.getpid()}-{atomic._host_tag()}.")
    path = folder / f".{stem}.{pid}-{host or atomic._host_tag()}.{rest}"
    if directory:
        path.mkdir()
        (path / "0001.dcm").write_bytes(b"half a series")
    else:
        path.write_bytes(b"")
    assert is_partial(path.name), path.name
    return path


@pytest.mark.parametrize(
    ("name", "ending"),
    [
        ("t2.nii.gz", ".partial.nii.gz"),
        ("checkpoint_latest.pt", ".partial.pt"),
        ("report.csv", ".partial.csv"),
    ],
)
def test_partial_names_keep_suffixes_and_record_the_writer(name: str, ending: str) -> None:
    made = partial_name(name)
    assert made.startswith("." + name.split(".")[0] + f".{os.getpid()}-") and made.endswith(ending)
    assert is_partial(made) and partial_name(name) != made
    assert not is_partial(name) and not is_partial(".t2-abc123.nii.gz") and not is_partial(".hidden")


def test_atomic_path_writes_under_a_partial_name(tmp_path: Path) -> None:
    target = tmp_path / "volume.nii.gz"
    with atomic_path(target) as temp:
        assert is_partial(temp.name) and temp.name.endswith(".nii.gz") and temp.exists()
        temp.write_bytes(b"data")
    assert target.read_bytes() == b"data" and sorted(p.name for p in tmp_path.iterdir()) == ["volume.nii.gz"]


def test_stale_partials_are_removed_and_live_ones_kept(tmp_path: Path) -> None:
    dead = _dead_pid()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        stale_file = _partial(tmp_path, "t2.nii.gz", dead)
        stale_folder = _partial(tmp_path, "dicom_t2", dead, directory=True)
        mine = _partial(tmp_path, "t2.json", os.getpid())
        other_live = _partial(tmp_path, "checkpoint_latest.pt", sleeper.pid)
        recent_foreign = _partial(tmp_path, "t1.nii.gz", dead, host="abcdef")
        old_foreign = _partial(tmp_path, "pd.nii.gz", dead, host="abcdef")
        old = time.time() - atomic.FOREIGN_PARTIAL_AGE_S - 60
        os.utime(old_foreign, (old, old))
        ordinary = tmp_path / ".t2-legacy.nii.gz"
        ordinary.write_bytes(b"")
        nested = tmp_path / "study"
        nested.mkdir()
        stale_nested = _partial(nested, "t2.nii.gz", dead)

        removed = remove_stale_partials(tmp_path)
        assert sorted(removed) == sorted([stale_file, stale_folder, old_foreign])
        assert not stale_file.exists() and not stale_folder.exists() and not old_foreign.exists()
        for kept in (mine, other_live, recent_foreign, ordinary, stale_nested):
            assert kept.exists(), kept.name
        assert remove_stale_partials(tmp_path, recursive=True) == [stale_nested]
        assert remove_stale_partials(tmp_path / "missing") == []
    finally:
        sleeper.kill()
        sleeper.wait()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_a_zombie_writers_partials_are_stale(tmp_path: Path) -> None:
    """An ended process nobody reaped yet (a killed batch's worker under an init that does not reap)
    still answers signals, but it writes nothing more: its partials go."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])  # not waited for: a zombie once it ends
    try:
        deadline = time.monotonic() + 30
        while Path(f"/proc/{child.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
            assert time.monotonic() < deadline, "the child did not end"
            time.sleep(0.02)
        left = _partial(tmp_path, "t2.nii.gz", child.pid)
        assert remove_stale_partials(tmp_path) == [left]
    finally:
        child.wait()
