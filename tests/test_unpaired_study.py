"""benchmarks/unpaired_study.py: its cohorts, which runs it plans, and its table and figure on a real run."""

from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
import sys
from pathlib import Path

import pytest

from medsynth.cli import main
from medsynth.config import load_config

_SPEC = importlib.util.spec_from_file_location(
    "benchmarks_unpaired_study", Path(__file__).parents[1] / "benchmarks" / "unpaired_study.py"
)
sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))  # the script imports ``machine``
study = importlib.util.module_from_spec(_SPEC)
sys.modules[_SPEC.name] = study
_SPEC.loader.exec_module(study)


def test_the_disjoint_cohort_leaves_no_training_pair_and_held_out_subjects_whole(tiny_cohort: Path,
                                                                                  tmp_path: Path) -> None:  # fmt: skip
    splits = {"train": ["sub-01", "sub-02", "sub-03"], "val": ["sub-04"], "test": ["sub-05"]}
    folder = study.disjoint_cohort(tiny_cohort, tmp_path / "disjoint", splits)
    has = {s: {p.name.split("_")[1].split(".")[0] for p in (folder / s / "anat").glob("*.nii.gz")} for s in
           ["sub-01", "sub-02", "sub-03", "sub-04", "sub-05"]}  # fmt: skip
    assert has["sub-01"] == {"T1w"} and "T1w" not in has["sub-02"] and has["sub-03"] == {"T1w"}
    assert has["sub-04"] == has["sub-05"] == {"T1w", "T2w", "PDw", "FLAIR", "CT"}
    assert all((folder / s / "anat").is_dir() for s in has)
    assert (folder / "sub-02" / "anat" / "sub-02_T2w.nii.gz").resolve().parent == (
        tiny_cohort / "sub-02" / "anat"
    )


def test_planned_runs_skip_what_cannot_or_need_not_train() -> None:
    args = argparse.Namespace(
        tasks=["t1->t2", "t1->ct"],
        misregister=["4,4", "12,12"],
        sweep_tasks=["t1->t2"],
        long_factor=0.0,
        methods=list(study.DEFAULT_METHODS),
        sweep_methods=list(study.DEFAULT_METHODS),
    )
    cohorts = {
        "aligned": Path(),
        "misregistered_4mm_4deg": Path(),
        "misregistered_12mm_12deg": Path(),
        "disjoint": Path(),
    }
    runs = {(r.task, r.cohort, r.method) for r in study.planned_runs(args, cohorts)}
    assert ("t1->t2", "disjoint", "gan") not in runs and ("t1->t2", "disjoint", "cyclegan") in runs
    assert ("t1->t2", "misregistered_12mm_12deg", "gan") in runs
    assert ("t1->t2", "misregistered_12mm_12deg", "cyclegan") not in runs  # unpaired draws ignore the move
    assert ("t1->ct", "misregistered_12mm_12deg", "gan") not in runs  # the sweep is for t1->t2 only
    assert ("t1->ct", "misregistered_4mm_4deg", "cyclegan") not in runs
    assert len(runs) == 6 + 4
    args.long_factor = 2.0
    longer = [r for r in study.planned_runs(args, cohorts) if r.method == "cyclegan_long"]
    assert [(r.task, r.cohort) for r in longer] == [("t1->t2", "aligned")]
    args.minutes, args.task_minutes = 15.0, {"t1->ct": 10.0}
    assert study.minutes(args, "t1->t2", "cyclegan_long") == 30.0 and study.minutes(args, "t1->ct") == 10.0


def test_the_registration_methods_train_on_registered_copies_of_misregistered_cohorts() -> None:
    args = argparse.Namespace(
        tasks=["t1->t2", "t1->ct"],
        misregister=["4,4", "12,12"],
        sweep_tasks=["t1->t2"],
        long_factor=0.0,
        methods=["gan", "gan_registered", "reggan"],
        sweep_methods=["gan_registered"],
    )
    copies = [study.registered_name(c, t) for c in ("misregistered_4mm_4deg", "misregistered_12mm_12deg")
              for t in args.tasks]  # fmt: skip
    assert copies[:2] == [
        "misregistered_4mm_4deg_registered_to_t2",
        "misregistered_4mm_4deg_registered_to_ct",
    ]
    cohorts = {name: Path() for name in ("aligned", "misregistered_4mm_4deg", "misregistered_12mm_12deg",
                                         *copies, "disjoint")}  # fmt: skip
    runs = {(r.task, r.cohort, r.method) for r in study.planned_runs(args, cohorts)}
    assert ("t1->t2", "aligned", "reggan") in runs and ("t1->t2", "aligned", "gan_registered") not in runs
    assert ("t1->ct", "misregistered_4mm_4deg", "gan_registered") in runs
    assert ("t1->t2", "misregistered_12mm_12deg", "gan_registered") in runs  # the sweep's one method
    assert ("t1->t2", "misregistered_12mm_12deg", "reggan") not in runs
    assert not [r for r in runs if "_registered" in r[1] or r[2].startswith("cyclegan")]
    assert len(runs) == 6 + 5
    assert study.method_recipe("t1->ct", "reggan") == ("demo_ct_reggan", [])
    paired, reggan = load_config("demo_ct").to_dict(), load_config("demo_ct_reggan").to_dict()
    assert reggan["train"].pop("objective") == "reggan" and reggan["train"].pop("objective_args")
    for key in ("objective", "objective_args"):
        paired["train"].pop(key, None)
    assert reggan == paired  # the paired recipe plus the objective: equal minutes, equal everything else
    assert study.method_recipe("t1->t2", "gan_registered") == ("demo_cpu", [])


def test_cyclegan_template_trains_on_the_template_copy_of_the_first_misregistered_cohort() -> None:
    args = argparse.Namespace(
        tasks=["t1->t2", "t1->ct"],
        misregister=["12,12", "4,4"],
        sweep_tasks=["t1->t2"],
        long_factor=0.0,
        methods=["gan", "cyclegan_template"],
        sweep_methods=["gan"],
    )
    copy = study.template_name("misregistered_12mm_12deg", "t1->t2")
    assert copy == "misregistered_12mm_12deg_template_t1_t2"
    cohorts = {name: Path() for name in ("aligned", "misregistered_12mm_12deg", "misregistered_4mm_4deg",
                                         copy, "disjoint")}  # fmt: skip
    runs = [r for r in study.planned_runs(args, cohorts) if r.method == "cyclegan_template"]
    assert [(r.task, r.cohort) for r in runs] == [("t1->t2", "misregistered_12mm_12deg")]
    assert study.training_cohort(runs[0]) == copy
    assert study.method_recipe("t1->t2", "cyclegan_template") == ("demo_cyclegan", [])


def test_table_and_figure_of_a_real_run(tiny_run: Path, tiny_cohort: Path, tmp_path: Path) -> None:
    work = tmp_path / "work"
    run = study.Run("t1->t2", "aligned", "gan")
    shutil.copytree(tiny_run, work / "runs" / run.name, ignore=shutil.ignore_patterns("eval"))
    assert (
        main(["evaluate", "--run", str(work / "runs" / run.name), "--data", str(tiny_cohort), "--quiet"]) == 0
    )
    results = study.collect(
        [run, study.Run("t1->t2", "disjoint", "cyclegan")], {"aligned": tiny_cohort}, work
    )
    assert list(results) == [run]  # a run that was never trained is left out
    scores = results[run]["scores"]
    ((subject, measures),) = scores.items()
    assert subject in json.loads((tiny_run / "splits.json").read_text())["test"]
    assert 0.0 < measures["outline_dice"] <= 1.0 and -1.0 <= measures["edge_correlation"] <= 1.0
    table = study.task_table("t1->t2", results, ["aligned", "disjoint"])
    lines = table.splitlines()
    assert lines[0].startswith("| training data | method | epochs | scored epoch | PSNR dB")
    assert (
        lines[2].startswith("| aligned | paired GAN (pix2pix) | 2 | ")
        and f"{measures['psnr_masked']:.2f}" in lines[2]
    )
    assert "cannot train: no training subject has a pair" in lines[3]
    figure = study.figure("t1->t2", results, ["aligned", "disjoint"], tmp_path / "figure.png")
    assert figure is not None and figure.stat().st_size > 5000


@pytest.mark.parametrize(
    "value, name", [("4,4", "misregistered_4mm_4deg"), ("2.5,3", "misregistered_2.5mm_3deg")]
)
def test_cohort_names(value: str, name: str) -> None:
    assert study.misregistered_name(value) == name
