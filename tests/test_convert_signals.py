"""A killed ``medsynth convert --workers 2`` leaves no process behind (issue 16 #7).

The command runs for real, in a child process, on a small DICOM export with a tiny trained
checkpoint; it is killed once its workers convert, and every process it had started must be gone.
Processes are found through /proc (Linux only).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from medsynth.convert.runner import _series_folder, link_folders_root, sweep_link_folders
from medsynth.io.atomic import partial_name
from medsynth.io.dicom import write_dicom_series
from medsynth.io.readers import read_volume

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc"),
]

N_STUDIES = 24


def _writer_pid(path: Path) -> int:
    """The process that made a :func:`~medsynth.io.atomic.partial_name` (``.stem.PID-host.token.partial``)."""
    return int(path.name.split(".")[2].split("-")[0])


def _stat(pid: int) -> tuple[str, int, int] | None:
    """(state, parent pid, session id) of a process, or None when it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2 :].split()
    return fields[0], int(fields[1]), int(fields[3])


def _alive(pid: int) -> bool:
    stat = _stat(pid)
    return stat is not None and stat[0] not in ("Z", "X")  # a zombie has ended; only its entry remains


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            stat = _stat(int(entry.name))
            if stat is not None and stat[1] == pid and stat[0] not in ("Z", "X"):
                found.append(int(entry.name))
    return found


def _in_session(sid: int) -> list[int]:
    return [
        int(e.name)
        for e in Path("/proc").iterdir()
        if e.name.isdigit()
        and (s := _stat(int(e.name))) is not None
        and s[2] == sid
        and s[0] not in ("Z", "X")
    ]


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


@pytest.fixture(scope="module")
def export(tiny_cohort: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("signals") / "export"
    t1 = read_volume(tiny_cohort / "sub-05" / "anat" / "sub-05_T1w.nii.gz")
    for number in range(N_STUDIES):
        write_dicom_series(
            t1,
            root / f"s{number:02d}",
            series_description="T1 MPRAGE",
            patient_id=f"P{number}",
            study_uid=f"1.2.826.0.1.3680043.8.498.9{number:02d}",
        )
    return root


@pytest.mark.parametrize("how", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_killed_convert_leaves_no_process(how: int, export: Path, tiny_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    command = [sys.executable, "-m", "medsynth", "convert", str(export), "--checkpoint", str(tiny_run),
               "--out", str(out), "--workers", "2", "--device", "cpu"]  # fmt: skip
    stderr = tmp_path / "stderr.txt"
    with stderr.open("w") as err:
        batch = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=err, start_new_session=True)
    started: list[int] = []
    try:
        # Kill once a worker has converted a study: the workers are loaded and busy.
        deadline = time.monotonic() + 180
        while not list(out.rglob("t2.json")):
            assert batch.poll() is None, f"convert ended before it could be killed:\n{stderr.read_text()}"
            assert time.monotonic() < deadline, "no study converted in time"
            time.sleep(0.02)
        started = _children(batch.pid)
        workers = [pid for pid in started if "multiprocessing.spawn" in _cmdline(pid)]
        trackers = [pid for pid in started if "resource_tracker" in _cmdline(pid)]
        assert len(workers) == 2 and len(trackers) == 1, [_cmdline(pid) for pid in started]

        os.kill(batch.pid, how)
        code = batch.wait(timeout=30)
        deadline = time.monotonic() + 10
        while any(_alive(pid) for pid in started) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not [pid for pid in started if _alive(pid)], [_cmdline(pid) for pid in started if _alive(pid)]
        assert _in_session(batch.pid) == []
        # The killed workers could not remove their series link folders; the next batch's sweep does.
        sweep_link_folders()
        killed = {batch.pid, *started}
        assert not [p for p in link_folders_root().glob(".series.*") if _writer_pid(p) in killed]
        if how == signal.SIGTERM:
            assert code == 128 + signal.SIGTERM
            message = stderr.read_text()
            assert "convert stopped by SIGTERM" in message and "Traceback" not in message
            report = (out / "report.json").read_text()
            assert '"interrupted": true' in report
        else:
            assert code == -signal.SIGKILL
    finally:
        if batch.poll() is None:
            batch.kill()
            batch.wait()
        for pid in started:  # a failing run must not leak its workers into the rest of the session
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)


def test_series_link_folders_go_after_use_and_a_dead_batchs_are_swept(
    export: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # gettempdir() answers this
    files = sorted(p for p in (export / "s00").rglob("*") if p.is_file())
    with _series_folder(SimpleNamespace(files=files)) as folder:  # type: ignore[arg-type]
        assert folder.parent == link_folders_root() and len(list(folder.iterdir())) == len(files)
        assert read_volume(folder).shape == read_volume(export / "s00").shape
    assert not folder.exists()

    dead = subprocess.Popen([sys.executable, "-c", "pass"])  # noqa: S603
    dead.wait()
    live = link_folders_root() / partial_name("series", keep_suffixes=False)
    stale = live.with_name(live.name.replace(f".{os.getpid()}-", f".{dead.pid}-"))
    live.mkdir()
    stale.mkdir()
    assert sweep_link_folders() == [stale]
    assert live.exists() and not stale.exists()
