"""``train.ema_decay``: checkpoints serve a moving average of the generators; training goes on from the live ones."""

from __future__ import annotations

import csv
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import tiny_config, train_until_sigterm

from medsynth.cli import main
from medsynth.config import load_config
from medsynth.engine.handlers.averaging import KEY, WeightAveraging, effective_decay, training_weights
from medsynth.engine.run import claim_run_dir, train
from medsynth.errors import ConfigError
from medsynth.model.checkpoint import load_checkpoint

CYCLE_EMA = ["train.objective=cyclegan", "data.pairing=unpaired", "train.ema_decay=0.9"]


def _fake_loop(generator: torch.nn.Module, reverse: torch.nn.Module) -> SimpleNamespace:
    objective = SimpleNamespace(directions=lambda: [(None, reverse)])
    return SimpleNamespace(generator=generator, objective=objective)


def test_the_average_follows_the_formula_and_starts_short() -> None:
    assert effective_decay(0.999, 0) == pytest.approx(0.1)
    assert effective_decay(0.999, 90) == pytest.approx(0.91)
    assert effective_decay(0.5, 10_000) == 0.5
    generator, reverse = torch.nn.Linear(1, 1, bias=False), torch.nn.Linear(1, 1, bias=False)
    loop = _fake_loop(generator, reverse)
    averaging = WeightAveraging(0.5)
    with torch.no_grad():
        generator.weight.fill_(0.0)
        reverse.weight.fill_(4.0)
    averaging.started(loop)
    expected, value = 0.0, 0.0
    for step, live in enumerate((10.0, 20.0, 30.0)):
        with torch.no_grad():
            generator.weight.fill_(live)
        averaging.step_done(loop)
        decay = min(0.5, (1 + step) / (10 + step))
        value = decay * value + (1 - decay) * live
        expected = value
    served, served_reverse = averaging.served_states()
    assert float(served["weight"]) == pytest.approx(expected)
    assert float(served_reverse["weight"]) == pytest.approx(4.0)  # an unchanged network averages to itself
    with averaging.averages_in_place():
        assert generator.weight.item() == pytest.approx(expected)
    assert generator.weight.item() == 30.0  # the live weights are back


def test_training_goes_on_from_the_live_weights() -> None:
    live, served = {"w": torch.ones(1)}, {"w": torch.zeros(1)}
    plain = {"generator_state": served, "directions": [{"generator_state": served}]}
    assert training_weights(plain) == [served, served]
    averaged = {**plain, KEY: {"updates": 3, "live": [live, live]}}
    assert training_weights(averaged) == [live, live]


@pytest.mark.parametrize("value", ["0", "1", "1.5", "-0.1", ".nan", "yes"])
def test_a_bad_decay_is_one_line(value: str) -> None:
    with pytest.raises(ConfigError, match=r"train\.ema_decay must be (a number in \(0, 1\)|float)"):
        load_config("demo_cpu", [f"train.ema_decay={value}"]).validate()


def test_checkpoints_serve_the_average_of_both_directions_and_resume_bit_for_bit(
    tiny_cohort: Path, tmp_path: Path
) -> None:
    extra = [*CYCLE_EMA, "train.batch_size=2", "train.checkpoint_every=2", "train.steps_per_epoch=4",
             "train.objective_args={pool_size: 3}"]  # fmt: skip
    reference = tmp_path / "reference"
    config = tiny_config(tiny_cohort, extra=extra)
    claim_run_dir(reference, config)
    train(config, reference, quiet=True)
    state = load_checkpoint(reference / "checkpoint_latest.pt")
    saved = state[KEY]
    assert saved["updates"] == state["global_step"] == 8
    served = [state["generator_state"], state["directions"][0]["generator_state"]]
    for average, live in zip(served, saved["live"], strict=True):
        assert average.keys() == live.keys()
        assert any(not torch.equal(average[k], live[k]) for k in average), (
            "the served weights are the live ones"
        )
    best = load_checkpoint(reference / "checkpoint_best.pt")
    assert KEY not in best  # an inference checkpoint holds the served weights only

    killed = tmp_path / "killed"
    train_until_sigterm(tiny_cohort, tmp_path, "killed", extra, at_step=2)
    assert main(["train", "--resume", str(killed), "--quiet"]) == 0
    resumed = load_checkpoint(killed / "checkpoint_latest.pt")
    for name, weights in resumed["generator_state"].items():
        assert torch.allclose(weights, state["generator_state"][name], atol=1e-6), name
    with open(killed / "metrics.csv", newline="") as a, open(reference / "metrics.csv", newline="") as b:
        keys = ("loss_critic", "loss_adv", "loss_cycle", "val_psnr")
        got = [float(row[k]) for row in csv.DictReader(a) for k in keys]
        want = [float(row[k]) for row in csv.DictReader(b) for k in keys]
    assert got == pytest.approx(want, rel=1e-5, abs=1e-6)
