"""Training: determinism, resume after a real kill, run-folder rules and bad input."""

from __future__ import annotations

import csv
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import TINY_OVERRIDES, tiny_config, train_until_sigterm

from medsynth.cli import main
from medsynth.engine.run import claim_run_dir, train
from medsynth.io.atomic import partial_name
from medsynth.model.checkpoint import load_checkpoint


def _losses(run_dir: Path) -> list[float]:
    with open(run_dir / "metrics.csv", newline="") as stream:
        rows = list(csv.DictReader(stream))
    return [float(r[key]) for r in rows for key in ("loss_critic", "loss_adv", "loss_l1", "val_psnr")]


def test_run_folder_holds_every_artefact(tiny_run: Path) -> None:
    for name in ("config.yaml", "splits.json", "fingerprint.json", "metrics.csv", "curves.png", "checkpoint_latest.pt",
                 "checkpoint_best.pt"):  # fmt: skip
        assert (tiny_run / name).is_file(), name
    assert sorted(p.name for p in (tiny_run / "samples").iterdir()) == ["epoch_001.png", "epoch_002.png"]
    assert any((tiny_run / "tensorboard").iterdir())
    with open(tiny_run / "metrics.csv", newline="") as stream:
        rows = list(csv.DictReader(stream))
    assert [r["epoch"] for r in rows] == ["1", "2"]
    assert float(rows[1]["lr"]) < float(rows[0]["lr"])  # linear decay after the constant phase
    splits = yaml.safe_load((tiny_run / "splits.json").read_text())
    assert not set(splits["train"]) & (set(splits["val"]) | set(splits["test"]))


def test_same_seed_same_losses(tiny_cohort: Path, tmp_path: Path) -> None:
    results = []
    for name in ("a", "b"):
        config = tiny_config(tiny_cohort, extra=["train.steps_per_epoch=3", "train.decay_epochs=0"])
        claim_run_dir(tmp_path / name, config)
        train(config, tmp_path / name, quiet=True)
        results.append(_losses(tmp_path / name))
    assert results[0] == results[1]


def test_resume_after_sigterm_matches_uninterrupted_run(tiny_cohort: Path, tmp_path: Path) -> None:
    extra = ["train.batch_size=1", "train.checkpoint_every=2"]
    reference = tmp_path / "reference"
    config = tiny_config(tiny_cohort, extra=extra)
    claim_run_dir(reference, config)
    train(config, reference, quiet=True)

    killed = tmp_path / "killed"
    said = train_until_sigterm(tiny_cohort, tmp_path, "killed", extra)
    assert "stopped by SIGTERM" in said and f"continue with: medsynth train --resume {killed}" in said, said
    state = load_checkpoint(killed / "checkpoint_latest.pt")
    assert state["step_in_epoch"] > 0 and state["epoch"] < 2  # stopped mid-epoch

    assert main(["train", "--resume", str(killed), "--quiet"]) == 0
    assert _losses(killed) == pytest.approx(_losses(reference), rel=1e-5, abs=1e-6)


def test_existing_run_folder_is_never_overwritten(tiny_run: Path, tiny_cohort: Path, capsys) -> None:
    code = main(["train", "t1->t2", "--data", str(tiny_cohort), "--runs-dir", str(tiny_run.parent),
                 "--name", tiny_run.name, "--config", "demo_cpu"])  # fmt: skip
    assert code == 2
    assert "--resume" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["t1-"], "Quote the task"),
        (["t1->t9"], "unknown modality 't9'"),
        (["t1->t1c"], "no subject has T1w+Gd"),  # the demo cohort has every other modality, CT included
        (["t1->t2", "--set", "train.epoch=3"], "unknown key train.epoch"),
        (["t1->t2", "--set", "data.val=4"], "subjects"),
    ],
)
def test_bad_input_is_one_line(
    arguments: list[str], message: str, tiny_cohort: Path, tmp_path: Path, capsys
) -> None:
    code = main(
        ["train", *arguments, "--data", str(tiny_cohort), "--runs-dir", str(tmp_path), "--config", "demo_cpu"]
    )
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.startswith("error:") and "\n" not in err and message in err, err
    assert "Traceback" not in err


def test_a_failed_start_can_be_retried_with_other_settings(tiny_cohort: Path, tmp_path: Path, capsys) -> None:
    """A run that stopped before its first checkpoint holds nothing to resume: --resume says so, and the
    same command with a corrected --set takes the folder again instead of calling it "a different run"."""
    common = ["train", "t1->t2", "--data", str(tiny_cohort), "--runs-dir", str(tmp_path), "--name", "retry",
              "--config", "demo_cpu", "--quiet", *[a for item in TINY_OVERRIDES for a in ("--set", item)]]  # fmt: skip
    assert (
        main([*common, "--set", "data.val=4"]) == 2
    )  # too few subjects left: fails after claiming the folder
    assert (tmp_path / "retry" / "config.yaml").is_file()
    capsys.readouterr()
    assert main(["train", "--resume", str(tmp_path / "retry")]) == 2
    assert "stopped before its first checkpoint" in capsys.readouterr().err
    assert main([*common, "--set", "train.steps_per_epoch=2"]) == 0
    assert load_checkpoint(tmp_path / "retry" / "checkpoint_latest.pt")["epoch"] == 2


def _copy_run(run: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "runs" / run.name
    shutil.copytree(run, copy)
    return copy


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_resume_removes_stale_partials(tiny_run: Path, tmp_path: Path) -> None:
    """A checkpoint write killed mid-way leaves ``.checkpoint_latest.<pid>-...partial.pt``; resume removes it."""
    run = _copy_run(tiny_run, tmp_path)
    host = partial_name("x").split(".")[2].split("-")[1]
    stale = run / f".checkpoint_latest.{_dead_pid()}-{host}.0123abcd.partial.pt"
    stale.write_bytes(b"half a checkpoint")
    alive = run / partial_name("checkpoint_best.pt")  # this process's own: never removed
    alive.write_bytes(b"being written")
    assert main(["train", "--resume", str(run), "--quiet"]) == 0
    assert not stale.exists() and alive.exists()


def test_disk_full_during_a_checkpoint_save_keeps_the_last_one(
    tiny_cohort: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    """torch.save fails like a full disk from the third save on (the first checkpoint before training,
    epoch 1's latest, then its best): one error line, exit 2, resumable."""
    real_save, calls = torch.save, []

    def full_disk(obj, f, *args, **kwargs):
        calls.append(f)
        if len(calls) >= 3:
            raise RuntimeError(
                "[enforce fail at inline_container.cc] . PytorchStreamWriter failed writing file data/0: "
                "file write failed"
            )
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", full_disk)
    command = ["train", "t1->t2", "--data", str(tiny_cohort), "--config", "demo_cpu", "--runs-dir",
               str(tmp_path), "--name", "full", "--quiet"]  # fmt: skip
    for item in TINY_OVERRIDES:
        command += ["--set", item]
    assert main(command) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "disk is full" in errors[0], errors
    run = tmp_path / "full"
    state = load_checkpoint(run / "checkpoint_latest.pt")  # the save before the failures, intact
    assert state["epoch"] == 1 and not state["finished"]
    assert not [p for p in run.iterdir() if ".partial" in p.name]

    monkeypatch.setattr(torch, "save", real_save)
    assert main(["train", "--resume", str(run), "--quiet"]) == 0
    assert load_checkpoint(run / "checkpoint_latest.pt")["finished"]


def test_resampling_warning_is_printed_once_per_file(tiny_cohort: Path, tmp_path: Path) -> None:
    """Training loads each training subject twice (fingerprint, then cache); the user reads about it once."""
    import logging

    import nibabel as nib
    import numpy as np

    from medsynth.engine.setup import prepare_run_data

    cohort = tmp_path / "shifted"
    shutil.copytree(tiny_cohort, cohort)
    shifted = sorted(cohort.glob("sub-*/anat/*_T2w.nii.gz"))
    for path in shifted:
        image = nib.load(path)
        affine = image.affine.copy()
        affine[0, 3] += 6.0  # one voxel: a different grid, almost the same field of view
        nib.save(nib.Nifti1Image(np.asarray(image.dataobj), affine), path)
    messages: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: messages.append(record.getMessage())  # type: ignore[method-assign]
    logger = logging.getLogger("medsynth")
    logger.addHandler(handler)
    try:
        config = tiny_config(cohort)
        claim_run_dir(tmp_path / "run", config)
        prepare_run_data(
            config, config.parsed_task(), tmp_path / "run", cache_dir=tmp_path / "cache", progress=False
        )
    finally:
        logger.removeHandler(handler)
    for path in shifted:
        assert sum(m.startswith(f"{path}: not on the grid") for m in messages) == 1, (path, messages)
