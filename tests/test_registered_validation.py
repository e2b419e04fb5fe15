"""Validation of a method that trains through misalignment registers each held-out target onto its source
first, so a misaligned held-out pair does not choose checkpoint_best.pt."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import TINY_SPACING_MM, tiny_config

from medsynth.data.demo import make_demo_cohort
from medsynth.engine.run import claim_run_dir, train
from medsynth.engine.setup import prepare_run_data
from medsynth.engine.validation import Validation
from medsynth.model.checkpoint import load_checkpoint


@pytest.fixture(scope="module")
def cohorts(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The same three subjects aligned and with every target moved by 6-12 mm / 6-12 degrees."""
    root = tmp_path_factory.mktemp("registered_validation")
    aligned, moved = root / "aligned", root / "moved"
    make_demo_cohort(aligned, n_subjects=3, spacing_mm=TINY_SPACING_MM, seed=3, progress=False)
    make_demo_cohort(
        moved, n_subjects=3, spacing_mm=TINY_SPACING_MM, seed=3, progress=False, misregister=(12, 12)
    )
    return aligned, moved


def _cached_t2(data: Path, run_dir: Path) -> tuple[Validation, dict[str, np.ndarray]]:
    config = tiny_config(data, extra=["data.val=1", "data.test=1"])
    claim_run_dir(run_dir, config)
    task = config.parsed_task()
    prepared = prepare_run_data(config, task, run_dir, cache_dir=run_dir.parent / "cache", progress=False)
    validation = Validation(task, prepared.cohort, None, [], 4, quiet=True, register_targets=True)  # type: ignore[arg-type]
    subjects = prepared.splits["val"] + prepared.splits["test"]
    return validation, {s: np.asarray(prepared.cohort.subject(s).image("t2")) for s in subjects}


def test_a_moved_held_out_target_is_registered_back_onto_its_source(
    cohorts: tuple[Path, Path], tmp_path: Path
) -> None:
    aligned, moved = cohorts
    _, truth = _cached_t2(aligned, tmp_path / "aligned" / "run")
    validation, shifted = _cached_t2(moved, tmp_path / "moved" / "run")
    assert validation.kind == "registered target"
    for subject, real in truth.items():
        registered = validation.registered_target(subject)
        assert registered.shape == real.shape
        before = float(np.mean(np.abs(shifted[subject] - real)))
        after = float(np.mean(np.abs(registered - real)))
        assert after < 0.5 * before, (subject, before, after)
        assert validation.registered_target(subject) is registered  # once per session


def test_a_reggan_run_validates_on_registered_targets_and_says_so(
    cohorts: tuple[Path, Path], tmp_path: Path
) -> None:
    run = tmp_path / "reggan"
    config = tiny_config(cohorts[1], extra=["train.objective=reggan", "train.steps_per_epoch=2"])
    claim_run_dir(run, config)
    train(config, run, quiet=True)
    assert load_checkpoint(run / "checkpoint_best.pt")["best"]["validation"] == "registered target"
