"""The training time budget: a run ends when its minutes are spent, complete, and can be extended."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
from conftest import tiny_config

from medsynth.cli import main
from medsynth.config import load_config
from medsynth.engine.run import claim_run_dir, train
from medsynth.errors import ConfigError
from medsynth.model.checkpoint import load_checkpoint

#: Many more epochs than the budget allows, so the budget is what stops the run.
LONG = ["train.epochs=200", "train.decay_epochs=200", "train.steps_per_epoch=2", "train.val_every=1000"]


def _rows(run: Path) -> list[dict[str, str]]:
    with open(run / "metrics.csv", newline="") as stream:
        return list(csv.DictReader(stream))


def test_budget_stops_the_run_complete_and_resume_extends_it(
    tiny_cohort: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "budget"
    config = tiny_config(tiny_cohort, extra=[*LONG, "train.max_minutes=0.04"])
    claim_run_dir(run, config)
    train(config, run, quiet=False)
    out = capsys.readouterr().out
    assert "stopped by the time budget" in out and f"--resume {run}" in out
    latest = load_checkpoint(run / "checkpoint_latest.pt")
    assert latest["finished"] is True and latest["elapsed_seconds"] >= 0.04 * 60
    epochs, partial = latest["epoch"], latest["step_in_epoch"] > 0  # whole epochs, and one begun
    assert 1 <= epochs < 400
    for name in ("checkpoint_best.pt", "metrics.csv", "curves.png", "splits.json", "fingerprint.json"):
        assert (run / name).is_file(), name
    rows = _rows(run)
    assert len(rows) == epochs + partial and rows[-1]["val_psnr"]  # the last epoch is always validated
    assert bool(rows[-1]["partial"]) == partial
    # The schedule is mapped onto the budget: the learning rate has decayed by the end.
    assert float(rows[-1]["lr"]) < float(rows[0]["lr"])

    code = main(["train", "--resume", str(run), "--set", "train.max_minutes=0.08", "--quiet"])
    assert code == 0
    resumed = load_checkpoint(run / "checkpoint_latest.pt")
    assert resumed["epoch"] > epochs and resumed["elapsed_seconds"] >= 0.08 * 60
    assert len(_rows(run)) == resumed["epoch"] + (resumed["step_in_epoch"] > 0)


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.max_minutes=0", "max_minutes"),
        ("train.max_minutes=-3", "max_minutes"),
        ("train.lr_generator=nan", "lr_generator"),
        ("train.lr_generator=-1", "lr_generator"),
        ("train.beta1=2", "beta1"),
        ("train.objective=diffusion", "objective"),
        ("train.val_every=0", "val_every"),
    ],
)
def test_bad_hyper_parameters_are_one_line_config_errors(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config("demo_cpu", [override])


def test_validation_cadence(tiny_cohort: Path, tmp_path: Path) -> None:
    """``val_every`` validates every n-th epoch and always the last; the others log training only."""
    run = tmp_path / "cadence"
    config = tiny_config(tiny_cohort, extra=["train.epochs=2", "train.decay_epochs=1", "train.val_every=2",
                                             "train.steps_per_epoch=2"])  # fmt: skip
    claim_run_dir(run, config)
    train(config, run, quiet=True)
    validated = [bool(r["val_psnr"]) for r in _rows(run)]
    assert validated == [False, True, True]
    assert sorted(p.name for p in (run / "samples").iterdir()) == ["epoch_002.png", "epoch_003.png"]
