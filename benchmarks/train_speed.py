"""Training throughput of the recipes: slices/s, ms/step, FLOPs, fraction of the measured peak, memory.

Each measurement builds the real :class:`~medsynth.engine.trainer.Trainer` (networks, optimisers, memory
format, slice dataset and loader from the prepared cache) on the demo cohort at 2 mm, then times
``Trainer.train_step`` (critic step + generator step) on the loader's own batches. FLOPs come from
``torch.utils.flop_counter`` over one step; GFLOP/s are put against the machine's own matrix-product peak,
measured at the start of the run (:mod:`machine`), which also names the machine. Every measurement runs in a fresh child process so that its
peak resident memory (``ru_maxrss``) is its own. The machine may be shared: step times are medians and the
load average is printed.

It also measures what freezing the critic during the generator step saves (the Trainer calls
``critic.requires_grad_(False)``): the same step with critic weight gradients left on.

    python benchmarks/train_speed.py                          # demo_cpu and t1_to_t2_unet2d, 2 threads
    python benchmarks/train_speed.py --channels-last both --compile
    python benchmarks/train_speed.py --config demo_cpu --size 128 128 --steps 10
    python benchmarks/train_speed.py --device cuda --config t1_to_t2_unet2d --batch-size 32
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import machine

DEFAULT_RECIPES = ("demo_cpu", "t1_to_t2_unet2d")
DEMO_SUBJECTS = 3  # one train, one validation, one test subject: the cohort only feeds the loader


def _parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--config", action="append", help="recipe name or YAML (repeatable; default: the two recipes)"
    )
    parser.add_argument("--data", type=Path, help="dataset with T1w/T2w (default: a 2 mm demo cohort)")
    parser.add_argument("--size", type=int, nargs=2, metavar=("H", "W"), help="crop (default: the recipe's)")
    parser.add_argument("--batch-size", type=int, help="default: the recipe's")
    parser.add_argument("--steps", type=int, default=6, help="timed steps (median taken) after one warm-up")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--channels-last", choices=("on", "off", "both"), default="on")
    parser.add_argument("--compile", action="store_true", help="also measure with torch.compile")
    parser.add_argument("--no-freeze-compare", action="store_true", help="skip the frozen-critic comparison")
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # JSON job, run in a child process
    return parser.parse_args(argv)


def _step_seconds(trainer: Any, batches: list[dict], steps: int, device: str) -> list[float]:
    times = []
    for index in range(steps):
        machine.synchronize(device)
        started = time.perf_counter()
        trainer.train_step(batches[index % len(batches)])
        machine.synchronize(device)
        times.append(time.perf_counter() - started)
    return times


def _step_gflop(trainer: Any, batch: dict) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        trainer.train_step(batch)
    return counter.get_total_flops() / 1e9


def _worker(job: dict[str, Any]) -> dict[str, Any]:
    """One measurement in this (fresh) process: build the Trainer as `medsynth train` does and time it."""
    import torch

    from medsynth.config import load_config
    from medsynth.engine.setup import prepare_run_data
    from medsynth.engine.trainer import Trainer

    values: dict[str, Any] = {
        "data.root": job["data"], "data.val": 1, "data.test": 1, "train.device": job["device"],
        "train.num_threads": job["threads"], "train.channels_last": job["channels_last"],
        "train.compile": job["compile"],
    }  # fmt: skip
    if job["size"]:
        values["data.crop_size"] = job["size"]
    if job["batch_size"]:
        values["train.batch_size"] = job["batch_size"]
    config = load_config(job["config"], values=values)
    task = config.parsed_task()
    with tempfile.TemporaryDirectory() as run_dir:
        data = prepare_run_data(config, task, Path(run_dir), cache_dir=Path(job["cache"]), progress=False)
        trainer = Trainer(config, task, data, Path(run_dir), quiet=True)
        trainer.loader.set_epoch(0)
        batches = [batch for _, batch in zip(range(4), trainer.loader, strict=False)]
        trainer.train_step(batches[0])  # warm-up (and compilation with --compile)
        result: dict[str, Any] = {
            "crop": list(trainer.dataset.crop_size),
            "batch": config.train.batch_size,
            "gflop_step": _step_gflop(trainer, batches[0]),
            "seconds": _step_seconds(trainer, batches, job["steps"], job["device"]),
        }
        critic = getattr(trainer.objective, "critic", None)  # GAN objectives only
        if job["freeze_compare"] and critic is not None:
            # Counterfactual: the critic's weights stay trainable through the generator step.
            critic.requires_grad_(True)
            critic.requires_grad_ = lambda requires_grad=True: critic
            result["unfrozen_gflop_step"] = _step_gflop(trainer, batches[0])
            result["unfrozen_seconds"] = _step_seconds(trainer, batches, job["steps"], job["device"])
    result["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    result["threads"] = torch.get_num_threads()
    if job["device"] == "cuda":
        result["peak_gpu_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return result


def _run_child(job: dict[str, Any]) -> dict[str, Any]:
    command = [sys.executable, __file__, "--worker", json.dumps(job)]
    completed = subprocess.run(command, capture_output=True, text=True, check=False)
    if completed.returncode != 0:
        raise SystemExit(f"measurement failed for {job['config']}:\n{completed.stderr[-3000:]}")
    return json.loads(completed.stdout.strip().splitlines()[-1])


def _row(recipe: str, variant: str, r: dict[str, Any], peak: machine.Peak) -> str:
    median, best = statistics.median(r["seconds"]), min(r["seconds"])
    gflop_slice = r["gflop_step"] / r["batch"]
    achieved = r["gflop_step"] / median
    crop = "x".join(str(s) for s in r["crop"])
    gpu = f" {r['peak_gpu_mib']:.0f} |" if "peak_gpu_mib" in r else ""
    return (
        f"| {recipe} | {variant} | {crop} | {r['batch']} | {r['batch'] / median:.1f} | {median * 1e3:.0f} "
        f"| {best * 1e3:.0f} | {gflop_slice:.2f} | {achieved:.1f} | {machine.percent(achieved, peak)} "
        f"| {machine.percent(r['gflop_step'] / best, peak)} | {r['peak_rss_mib']:.0f} |{gpu}"
    )


def _freeze_row(recipe: str, r: dict[str, Any]) -> str:
    frozen, unfrozen = statistics.median(r["seconds"]), statistics.median(r["unfrozen_seconds"])
    saved = 1 - r["gflop_step"] / r["unfrozen_gflop_step"]
    return (
        f"| {recipe} | {r['gflop_step'] / r['batch']:.2f} | {r['unfrozen_gflop_step'] / r['batch']:.2f} "
        f"| {saved:.1%} | {frozen * 1e3:.0f} | {unfrozen * 1e3:.0f} | {1 - frozen / unfrozen:.1%} |"
    )


def main(argv: list[str] | None = None) -> None:
    args = _parse(argv)
    if args.worker:
        print(json.dumps(_worker(json.loads(args.worker))))
        return
    machine.cuda_or_exit(args.device)
    import torch

    from medsynth.data.demo import make_demo_cohort

    torch.set_num_threads(args.threads)
    print(machine.describe(args.device))
    peak = machine.measure_peak(args.device)
    print(peak, flush=True)
    recipes = args.config or list(DEFAULT_RECIPES)
    formats = {"on": [True], "off": [False], "both": [True, False]}[args.channels_last]
    variants = [(f"channels_last={'on' if fmt else 'off'}", fmt, False) for fmt in formats]
    if args.compile:
        variants.append(("channels_last=on, compile", True, True))
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as scratch:
        data = args.data
        if data is None:
            data = Path(scratch) / "demo"
            make_demo_cohort(data, n_subjects=DEMO_SUBJECTS, spacing_mm=2.0, progress=False)
        results = []
        for recipe in recipes:
            for number, (variant, channels_last, compile_) in enumerate(variants):
                job = {
                    "config": recipe, "data": str(data), "cache": str(Path(scratch) / "cache"),
                    "threads": args.threads, "channels_last": channels_last, "compile": compile_,
                    "device": args.device,
                    "size": args.size, "batch_size": args.batch_size, "steps": args.steps,
                    "freeze_compare": number == 0 and not args.no_freeze_compare,
                }  # fmt: skip
                results.append((Path(recipe).stem, variant, _run_child(job)))
    load_after = os.getloadavg()

    print(
        f"\n{args.device}, {args.threads} threads, data {args.data or '2 mm demo cohort'}, "
        f"median (and best) of {args.steps} steps after 1 warm-up; load average before {load_before[0]:.2f}, "
        f"after {load_after[0]:.2f} (1 min) on {os.cpu_count()} CPUs\n"
    )
    gpu = " peak GPU MiB |" if args.device == "cuda" else ""
    print(
        "| recipe | variant | crop | batch | slices/s | ms/step | ms/step (best) | GFLOP/slice | GFLOP/s "
        f"| of the measured peak | (best) | peak RSS MiB |{gpu}"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|" + ("---|" if gpu else ""))
    for recipe, variant, result in results:
        print(_row(recipe, variant, result, peak))
    compared = [(recipe, r) for recipe, _, r in results if "unfrozen_seconds" in r]
    if compared:
        print("\nFreezing the critic's weights in the generator step (FLOPs and time per step):\n")
        print(
            "| recipe | GFLOP/slice frozen | unfrozen | FLOPs saved | ms/step frozen | unfrozen | time saved |"
        )
        print("|---|---|---|---|---|---|---|")
        for recipe, result in compared:
            print(_freeze_row(recipe, result))


if __name__ == "__main__":
    main()
