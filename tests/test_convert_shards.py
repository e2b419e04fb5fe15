"""``convert --shard K/N`` partitions an export, ``--merge-reports`` joins the shards' reports, and the
batch fails early, spreads workers over GPUs and cleans up after killed runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from test_convert import FakePredictor, _series

from medsynth.cli import main
from medsynth.convert import Shard, run_convert
from medsynth.convert import runner as convert_runner
from medsynth.convert.naming import study_folder
from medsynth.convert.runner import merge_shard_reports, worker_devices
from medsynth.errors import MedsynthError
from medsynth.io import atomic
from medsynth.io.atomic import partial_name
from medsynth.io.readers import read_volume

N_SHARDS = 3


def _uids(count: int) -> list[str]:
    """Study UIDs such that every one of the N_SHARDS shards owns at least one."""
    uids = [f"1.2.826.0.1.3680043.8.498.7{n}" for n in range(count)]
    assert {Shard.owner(uid, N_SHARDS).index for uid in uids} == set(range(1, N_SHARDS + 1))
    return uids


STUDIES = _uids(6)


@pytest.fixture(scope="module")
def export(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Six studies of three patients: five with a T1, the last with a FLAIR only (skipped)."""
    root = tmp_path_factory.mktemp("shards") / "export"
    for number, uid in enumerate(STUDIES):
        description = "AX FLAIR" if number == len(STUDIES) - 1 else "T1 MPRAGE"
        _series(root, f"P{number % 3}/S{number}", uid, f"MRN-{number % 3}", description, seed=number)
    return root


def _outputs(out: Path) -> dict[str, Path]:
    return {
        str(p.relative_to(out)): p for p in out.rglob("*") if p.is_file() and not p.name.startswith("report")
    }


def _json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def test_shards_partition_the_unsharded_run(export: Path, tmp_path: Path) -> None:
    whole = run_convert(export, FakePredictor(), tmp_path / "whole")
    sharded = tmp_path / "sharded"
    per_shard = [
        run_convert(export, FakePredictor(), sharded, shard=f"{k}/{N_SHARDS}", workers=2 if k == 2 else 1)
        for k in range(1, N_SHARDS + 1)
    ]

    # No study handled twice; together the shards handled exactly the export's studies, as the whole run did.
    handled = [r.study_uid for report in per_shard for r in report.studies]
    assert sorted(handled) == sorted(set(handled)) == STUDIES
    assert {r.study_uid: r.status for rep in per_shard for r in rep.studies} == {
        r.study_uid: r.status for r in whole.studies
    }
    assert sorted(p.name for p in sharded.glob("report*")) == [
        f"report-shard-{k}-of-{N_SHARDS}.{ext}" for k in range(1, N_SHARDS + 1) for ext in ("csv", "json")
    ]

    # Same files, same voxels, same sidecars.
    mine, theirs = _outputs(sharded), _outputs(tmp_path / "whole")
    assert sorted(mine) == sorted(theirs) and len([n for n in mine if n.endswith("t2.nii.gz")]) == 5
    for name, path in mine.items():
        if name.endswith(".nii.gz"):
            a, b = read_volume(path), read_volume(theirs[name])
            np.testing.assert_array_equal(a.array, b.array)
            np.testing.assert_array_equal(a.affine, b.affine)
        else:
            assert _json(path) == _json(theirs[name])

    merged = merge_shard_reports(export, sharded)
    rows = (sharded / "report.csv").read_text().splitlines()[1:]
    assert [line.split(",")[0] for line in rows] == STUDIES  # one row per study, sorted by UID
    assert [(r.study_uid, r.status, r.outputs) for r in merged.studies] == [
        (r.study_uid, r.status, r.outputs) for r in whole.studies
    ]
    payload = _json(sharded / "report.json")
    assert payload["unreported"] == [] and payload["summary"]["converted"] == 5
    assert payload["settings"]["shards_reported"] == ["1/3", "2/3", "3/3"]


def test_merge_names_unreported_studies_and_resolves_conflicts(export: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    for k in (1, 3):  # shard 2 has not run yet
        run_convert(export, FakePredictor(), out, shard=f"{k}/{N_SHARDS}")
    missing = [uid for uid in STUDIES if Shard.owner(uid, N_SHARDS).index == 2]

    assert main(["convert", str(export), "--out", str(out), "--merge-reports"]) == 1
    printed = capsys.readouterr().err
    assert f"{len(missing)} studies of the export are in no shard report yet (shards 2/3)" in printed
    assert all(uid in printed for uid in missing)
    payload = _json(out / "report.json")
    assert payload["unreported"] == missing
    assert [row["study_uid"] for row in payload["studies"]] == STUDIES
    assert {row["status"] for row in payload["studies"] if row["study_uid"] in missing} == {"unreported"}

    # A later report that failed a study shard 1 converted: the done row wins, and a note says so.
    first = _json(out / "report-shard-1-of-3.json")
    converted = next(row for row in first["studies"] if row["status"] == "converted")
    later = dict(first, settings={**first["settings"], "finished": "2999-01-01T00:00:00+00:00"})
    later["studies"] = [{**converted, "status": "failed", "reason": "out of memory", "outputs": []}]
    (out / "report-shard-1-of-2.json").write_text(json.dumps(later))
    merged = merge_shard_reports(export, out)
    row = next(r for r in merged.studies if r.study_uid == converted["study_uid"])
    assert row.status == "converted" and row.outputs == converted["outputs"]
    note = next(n for n in merged.notes if converted["study_uid"] in n)
    assert "2 shard reports" in note and "kept the converted row of report-shard-1-of-3.json" in note
    assert sum(n.startswith("skipped") or "not usable" in n for n in merged.notes) == sum(
        n.startswith("skipped") or "not usable" in n for n in first["notes"]
    )  # discovery notes of several shards appear once

    # Of two rows that are not done, the later one wins.
    later["studies"] = [{**row, "status": "failed", "reason": "later"} for row in first["studies"]
                        if row["status"] == "skipped"]  # fmt: skip
    (out / "report-shard-1-of-2.json").write_text(json.dumps(later))
    flair = next(r for r in merge_shard_reports(export, out).studies if r.study_uid == STUDIES[-1])
    assert (flair.status, flair.reason) == ("failed", "later")


def test_merge_without_shard_reports_is_one_error(export: Path, tmp_path: Path, capsys) -> None:
    (tmp_path / "out").mkdir()
    assert main(["convert", str(export), "--out", str(tmp_path / "out"), "--merge-reports"]) == 2
    assert "no readable shard reports" in capsys.readouterr().err
    with pytest.raises(MedsynthError, match="--checkpoint is required"):
        from medsynth.cli import build_parser
        from medsynth.convert import convert_command

        convert_command(build_parser().parse_args(["convert", str(export), "--out", str(tmp_path / "o")]))


@pytest.mark.parametrize(
    ("workers", "device", "n_gpus", "expected"),
    [
        (4, "auto", 2, ["cuda:0", "cuda:1", "cuda:0", "cuda:1"]),
        (3, "cuda", 4, ["cuda:0", "cuda:1", "cuda:2"]),
        (1, "auto", 8, ["cuda:0"]),
        (2, "auto", 0, ["cpu", "cpu"]),
        (3, "cpu", 2, ["cpu", "cpu", "cpu"]),
        (2, "cuda:1", 4, ["cuda:1", "cuda:1"]),
    ],
)
def test_worker_i_uses_gpu_i_mod_n(workers: int, device: str, n_gpus: int, expected: list[str]) -> None:
    assert worker_devices(workers, device, n_gpus) == expected


def test_worker_devices_refuses_bad_requests() -> None:
    with pytest.raises(MedsynthError, match="no CUDA device"):
        worker_devices(2, "cuda", n_gpus=0)
    with pytest.raises(MedsynthError, match="at least 1"):
        worker_devices(0, "cpu")


def test_the_batch_records_its_devices(export: Path, tmp_path: Path, monkeypatch) -> None:
    loaded: list[tuple[str, str]] = []

    def load(
        checkpoint: object, device: str = "cpu", target: str | None = None, precision: str = "fp32"
    ) -> FakePredictor:
        loaded.append((device, precision))
        return FakePredictor()

    monkeypatch.setattr(convert_runner, "_load_predictor", load)
    monkeypatch.setattr(convert_runner, "_checkpoint_id", lambda _: "fake")
    report = run_convert(export, tmp_path / "model.pt", tmp_path / "out", device="cpu", dry_run=True)
    assert report.settings["devices"] == ["cpu"] and loaded == [("cpu", "fp32")]  # fp32 unless asked
    assert report.settings["precision"] == "fp32"


class _NeverCalled(FakePredictor):
    def predict(self, inputs: dict, target: str | None = None) -> None:
        raise AssertionError("synthesised although the command should have failed first")


def test_out_pointing_at_a_file_fails_before_synthesis(
    export: Path, tmp_path: Path, monkeypatch, capsys
) -> None:
    target = tmp_path / "synth.txt"
    target.write_text("not a folder")
    with pytest.raises(MedsynthError, match="existing file, not a folder"):
        run_convert(export, _NeverCalled(), target)
    monkeypatch.setattr(convert_runner, "_load_predictor", lambda *_: _NeverCalled())
    code = main(["convert", str(export), "--checkpoint", str(target), "--out", str(target)])
    error = capsys.readouterr().err
    assert code == 2 and error.count("\n") == 1 and "existing file" in error
    assert target.read_text() == "not a folder"


@pytest.mark.parametrize("content", ["empty", "not dicom"])
def test_input_without_dicom_is_one_line_and_status_1(
    content: str, tmp_path: Path, monkeypatch, capsys
) -> None:
    folder = tmp_path / "export"
    folder.mkdir()
    if content == "not dicom":
        (folder / "notes.txt").write_text("hello")
        (folder / "sub").mkdir()
        (folder / "sub" / "image.png").write_bytes(b"\x89PNG....")
    monkeypatch.setattr(convert_runner, "_load_predictor", lambda *_: _NeverCalled())
    code = main(["convert", str(folder), "--checkpoint", "model.pt", "--out", str(tmp_path / "out")])
    error = capsys.readouterr().err
    assert code == 1 and error.count("\n") == 1
    assert str(folder) in error and "no DICOM study found" in error


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def _as_pid(name: str, pid: int) -> str:
    """``partial_name(name)`` as if process ``pid`` of this machine had made it."""
    return name.replace(f".{os.getpid()}-{atomic._host_tag()}.", f".{pid}-{atomic._host_tag()}.")


def test_next_run_removes_what_a_killed_run_left(export: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    run_convert(export, FakePredictor(), out)
    folder = study_folder(out, "MRN-0", STUDIES[0])
    dead = _dead_pid()
    stale_nifti = folder / _as_pid(partial_name("t2.nii.gz"), dead)
    stale_nifti.write_bytes(b"")
    stale_series = folder / _as_pid(partial_name("dicom_t2", keep_suffixes=False), dead)
    (stale_series / ".dicom_t2-x1y2").mkdir(parents=True)
    stale_report = out / _as_pid(partial_name("report.json"), dead)
    stale_report.write_text("{")
    live = folder / partial_name("t2.json")  # this process is alive: never touched
    live.write_text("{")

    again = run_convert(export, FakePredictor(), out)
    assert again.count("skipped") == len(STUDIES)  # everything was done; only the leftovers went
    assert not stale_nifti.exists() and not stale_series.exists() and not stale_report.exists()
    assert live.exists()
    live.unlink()
    assert not [p for p in out.rglob(".*")]
