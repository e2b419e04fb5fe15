"""``medsynth demo`` (``make demo``): the first thing a new user runs.

Builds the 2 mm demo cohort, trains the fast CPU recipe for ``t1->t2``, evaluates the held-out subjects
against the two trivial baselines and prints the table. Every stage is skipped when its output is
already complete, and an interrupted training resumes, so running it twice costs nothing.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from .config import load_config
from .data.demo import make_demo_cohort
from .engine.lock import RunFolderLock
from .engine.run import claim_run_dir, default_run_name, train
from .evaluate import evaluate, render_table, space_label
from .io.atomic import atomic_write_text
from .model.checkpoint import BEST, LATEST, load_checkpoint
from .model.synthesis import SynthesisModel

DEMO_SPACING_MM = 2.0


def run_demo_job(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    workdir: Path = args.workdir
    data_dir = workdir / "data"
    if not (data_dir / "dataset_description.json").is_file():
        print(
            f"[1/3] building the demo cohort: {args.subjects} subjects at {DEMO_SPACING_MM:g} mm -> {data_dir}"
        )
        make_demo_cohort(data_dir, n_subjects=args.subjects, spacing_mm=DEMO_SPACING_MM, seed=0)
    else:
        print(f"[1/3] demo cohort already in {data_dir}")

    values: dict[str, object] = {"data.root": str(data_dir)}
    if args.minutes is not None:
        values["train.max_minutes"] = args.minutes
    config = load_config(args.config, args.overrides, values)
    run_dir = workdir / "runs" / (config.name or default_run_name(config))
    latest = run_dir / LATEST
    with RunFolderLock(run_dir):  # one training per run folder (engine/lock.py)
        if latest.is_file():
            state = load_checkpoint(latest)
            finished = bool(state.get("finished"))
            print(f"[2/3] run {run_dir} " + ("already trained" if finished else "interrupted; resuming"))
            if not finished:
                train(load_config(run_dir / "config.yaml"), run_dir, resume=True, quiet=args.quiet)
        else:
            print(f"[2/3] training {config.parsed_task().describe()} with recipe {args.config} -> {run_dir}")
            claim_run_dir(run_dir, config)
            train(config, run_dir, quiet=args.quiet)

    print("[3/3] evaluating the held-out test subjects against the trivial baselines")
    predictor = SynthesisModel.from_checkpoint(run_dir / BEST)
    cases = evaluate(predictor, data_dir, run_dir / "eval", baselines=True, progress=not args.quiet)
    table = render_table(cases, space_label("normalised"))
    atomic_write_text(run_dir / "eval" / "table.txt", table + "\n")
    print(table)
    print(f"finished in {(time.perf_counter() - started) / 60:.1f} min; run folder: {run_dir} "
          f"(samples/, eval/*.png, metrics.csv, checkpoint_best.pt)")  # fmt: skip
    return 0
