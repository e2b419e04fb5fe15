"""The loop's handlers: the schedule (epochs or budget, first wins), a handler attached without editing the
loop, resumable state gathered from handlers, and the events in their order."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import pytest
from conftest import tiny_config

from medsynth.engine.events import EpochRecord, Handler, Handlers
from medsynth.engine.handlers import default_handlers
from medsynth.engine.handlers.budget import TimeBudget
from medsynth.engine.handlers.schedule import LinearDecay, budget_factor, epoch_factor
from medsynth.engine.run import claim_run_dir, train
from medsynth.engine.setup import prepare_run_data
from medsynth.engine.trainer import Trainer
from medsynth.model.checkpoint import LATEST, load_checkpoint


def _rows(run: Path) -> list[dict[str, str]]:
    with open(run / "metrics.csv", newline="") as stream:
        return list(csv.DictReader(stream))


def _trainer(cohort: Path, run_dir: Path, extra: list[str], handlers: list[Handler] | None = None) -> Trainer:
    config = tiny_config(cohort, extra=extra)
    claim_run_dir(run_dir, config)
    data = prepare_run_data(
        config, config.parsed_task(), run_dir, cache_dir=run_dir.parent / "cache", progress=False
    )
    return Trainer(config, config.parsed_task(), data, run_dir, quiet=True, handlers=handlers)


# ------------------------------------------------------------------------------------ schedule
@pytest.mark.parametrize("epoch, expected", [(0, 1.0), (2, 1.0), (3, 0.75), (4, 0.5), (5, 0.25)])
def test_epoch_factor_is_pix2pix_constant_then_linear(epoch: int, expected: float) -> None:
    assert epoch_factor(epoch, epochs=3, decay_epochs=3) == pytest.approx(expected)


def test_budget_factor_decays_over_the_second_half_of_the_minutes() -> None:
    assert budget_factor(10, 100, epochs=5, decay_epochs=5) == 1.0
    assert budget_factor(75, 100, epochs=5, decay_epochs=5) == pytest.approx(0.5)
    assert budget_factor(100, 100, epochs=5, decay_epochs=5) == pytest.approx(0.01)
    assert budget_factor(99, 100, epochs=5, decay_epochs=0) == 1.0  # no decay asked: constant


def test_with_a_budget_the_schedule_follows_whichever_runs_out_first() -> None:
    schedule = LinearDecay(epochs=2, decay_epochs=2, budget_seconds=600.0)
    # Epochs run out first (a fast machine): at the last epoch, seconds into the budget, it has decayed.
    assert schedule.factor(epoch=3, clock=30.0) == pytest.approx(epoch_factor(3, 2, 2))
    assert epoch_factor(3, 2, 2) < 0.5
    # The budget runs out first (a slow machine): the minutes decide.
    assert schedule.factor(epoch=0, clock=540.0) == pytest.approx(budget_factor(540.0, 600.0, 2, 2))
    assert budget_factor(540.0, 600.0, 2, 2) < 0.5


def test_a_budgeted_run_that_runs_out_of_epochs_first_ends_its_decay(
    tiny_cohort: Path, tmp_path: Path
) -> None:
    """The bug of the minutes-only schedule: every epoch of a fast run trained at the full rate."""
    run = tmp_path / "fast"
    extra = ["train.epochs=1", "train.decay_epochs=2", "train.steps_per_epoch=2", "train.max_minutes=60"]
    config = tiny_config(tiny_cohort, extra=extra)
    claim_run_dir(run, config)
    train(config, run, quiet=True)
    rates = [float(row["lr"]) for row in _rows(run)]
    first = config.train.lr_generator
    assert rates == pytest.approx([first, first * 2 / 3, first / 3])  # as without a budget


# ------------------------------------------------------------------------ attaching handlers
class _Recorder(Handler):
    """Records the events it sees, and ends the run once an epoch is validated above a PSNR."""

    def __init__(self, goal: float) -> None:
        self.goal, self.events, self.seen_steps = goal, [], 0

    def started(self, loop: Any) -> None:
        self.events.append("started")

    def epoch_started(self, loop: Any) -> None:
        self.events.append("epoch_started")

    def step_done(self, loop: Any) -> None:
        self.seen_steps += 1

    def epoch_trained(self, loop: Any) -> None:
        self.events.append("epoch_trained")

    def epoch_done(self, loop: Any, record: EpochRecord) -> None:
        self.events.append(f"epoch_done {record.epoch}")
        if record.metrics is not None and record.metrics["psnr"] >= self.goal:
            loop.end_requested = True

    def completed(self, loop: Any) -> None:
        self.events.append("completed")

    def closed(self, loop: Any) -> None:
        self.events.append("closed")

    def state_dict(self) -> dict[str, Any]:
        return {"recorder_steps": self.seen_steps}

    def load_state_dict(self, checkpoint: dict[str, Any]) -> None:
        self.seen_steps = checkpoint["recorder_steps"]


def test_a_handler_attached_from_outside_sees_the_events_ends_the_run_and_saves_its_state(
    tiny_cohort: Path, tmp_path: Path
) -> None:
    recorder = _Recorder(goal=-1e9)  # any validated epoch reaches it
    extra = ["train.epochs=3", "train.decay_epochs=0", "train.steps_per_epoch=2", "train.val_every=2"]
    trainer = _trainer(tiny_cohort, tmp_path / "early", extra, handlers=[recorder])
    trainer.fit()
    assert recorder.events == [
        "started",
        "epoch_started", "epoch_trained", "epoch_done 1",
        "epoch_started", "epoch_trained", "epoch_done 2",  # validated: the goal ends the run
        "completed", "closed",
    ]  # fmt: skip
    latest = load_checkpoint(tmp_path / "early" / LATEST)
    assert latest["recorder_steps"] == recorder.seen_steps == 4  # gathered without a word in the loop
    assert latest["finished"] is True and latest["epoch"] == 2

    again = _Recorder(goal=1e9)
    resumed = _trainer(tiny_cohort, tmp_path / "other", extra, handlers=[again])
    resumed.resume(tmp_path / "early" / LATEST)
    assert again.seen_steps == 4


def test_two_handlers_saving_one_key_is_refused() -> None:
    class Clock(Handler):
        def state_dict(self) -> dict[str, Any]:
            return {"elapsed": 1}

    with pytest.raises(RuntimeError, match="elapsed"):
        Handlers([Clock(), Clock()]).state_dict()


def test_every_handler_closes_even_when_one_fails() -> None:
    closed: list[str] = []

    class Failing(Handler):
        def closed(self, loop: Any) -> None:
            raise OSError("disk")

    class Closing(Handler):
        def closed(self, loop: Any) -> None:
            closed.append("yes")

    with pytest.raises(OSError, match="disk"):
        Handlers([Failing(), Closing()]).closed(None)  # type: ignore[arg-type]
    assert closed == ["yes"]


def test_handlers_follow_the_settings(tiny_cohort: Path, tmp_path: Path) -> None:
    plain = _trainer(tiny_cohort, tmp_path / "plain", ["train.max_minutes=null"])
    assert plain.handlers.find(TimeBudget) is None
    budgeted = _trainer(tiny_cohort, tmp_path / "budgeted", ["train.max_minutes=5"])
    assert isinstance(budgeted.handlers.find(TimeBudget), TimeBudget)
    assert budgeted.handlers.all.index(budgeted.handlers.find(TimeBudget)) == 0  # decides before the others
    names = [type(h).__name__ for h in default_handlers(plain)]
    assert "ReplicaCheck" not in names and "Progress" not in names  # one process, --quiet
    assert names.index("BestSelection") < names.index("Checkpoints") < names.index("MetricsCsv")
