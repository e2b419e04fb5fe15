"""Training throughput of the recipes: slices/s, ms/step, FLOPs, fraction of the measured peak, memory.

Each measurement builds the real :class:`~medsynth.engine.trainer.Trainer` (networks, optimisers, memory
format, slice dataset and loader from the prepared cache) on the demo cohort at 2 mm, then times
``Trainer.train_step`` (critic step + generator step) on the loader's own batches. FLOPs come from
``torch.utils.flop_counter`` over one step; GFLOP/s are put against the machine's own matrix-product peak,
measured at the start of the run (:mod:`machine`), which also names the machine. Every measurement runs in a fresh child process so that its
peak resident memory (``ru_maxrss``) is its own. The machine may be shared: step times are medians and the
load average is printed.

Precisions (``--precision``, default fp32 and bf16 side by side) are forced with ``train.precision``, so
each line is that precision whether or not ``auto`` would choose it; the header gives both matrix-product
peaks (fp32 and bf16) and the CPU's bf16 units, and bf16 lines are put against the bf16 peak.

It also measures what freezing the critic during the generator step saves (the Trainer calls
``critic.requires_grad_(False)``): the same step with critic weight gradients left on.

    python benchmarks/train_speed.py                          # demo_cpu and t1_to_t2_unet2d, fp32 and bf16
    python benchmarks/train_speed.py --precision auto         # what `medsynth train` would choose here
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
    parser.add_argument("--channels-last", choices=("on", "off", "both"), default="both")
    parser.add_argument("--precision", nargs="+", choices=("fp32", "bf16", "auto"), default=["fp32", "bf16"])
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
        "train.compile": job["compile"], "train.precision": job["precision"],
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
        for batch in batches[:3]:  # warm-up: oneDNN builds its bf16 kernels over the first steps
            trainer.train_step(batch)  # (and torch.compile compiles with --compile)
        result: dict[str, Any] = {
            "precision": trainer.precision.precision,
            "channels_last": trainer.precision.channels_last,
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


def _row(recipe: str, variant: str, r: dict[str, Any], peaks: dict[str, machine.Peak]) -> str:
    peak = peaks["bfloat16" if r["precision"] == "bf16" else "float32"]
    variant = f"{r['precision']}, {'channels_last' if r['channels_last'] else 'contiguous'}" + (
        ", compile" if "compile" in variant else ""
    )  # what the Trainer actually ran (auto may have chosen either)
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


def _print_speedups(results: list[tuple[str, str, dict[str, Any]]]) -> None:
    """Per recipe: the fastest bf16 line against the fastest fp32 line (median step times)."""
    lines = []
    for recipe in dict.fromkeys(name for name, _, _ in results):
        best: dict[str, float] = {}
        for name, _, r in results:
            if name == recipe and "compile" not in _:
                key = r["precision"]
                best[key] = min(best.get(key, float("inf")), statistics.median(r["seconds"]))
        if "fp32" in best and "bf16" in best:
            lines.append(
                f"| {recipe} | {best['fp32'] * 1e3:.0f} | {best['bf16'] * 1e3:.0f} | {best['fp32'] / best['bf16']:.2f}x |"
            )
    if lines:
        print("\nbf16 against fp32, fastest memory format of each (median ms/step):\n")
        print("| recipe | fp32 ms/step | bf16 ms/step | speed-up |\n|---|---|---|---|")
        print("\n".join(lines))


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
    peaks = {name: machine.measure_peak(args.device, dtype_name=name) for name in ("float32", "bfloat16")}
    for peak in peaks.values():
        print(peak, flush=True)
    recipes = args.config or list(DEFAULT_RECIPES)
    formats = {"on": [True], "off": [False], "both": [True, False]}[args.channels_last]
    variants = [
        (f"{precision}, channels_last={'on' if fmt else 'off'}", precision, fmt, False)
        for precision in args.precision
        for fmt in ([True] if precision == "auto" else formats)  # auto chooses the format itself
    ]
    if args.compile:
        variants.append(("fp32, channels_last=on, compile", "fp32", True, True))
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as scratch:
        data = args.data
        if data is None:
            data = Path(scratch) / "demo"
            make_demo_cohort(data, n_subjects=DEMO_SUBJECTS, spacing_mm=2.0, progress=False)
        results = []
        for recipe in recipes:
            for number, (variant, precision, channels_last, compile_) in enumerate(variants):
                job = {
                    "config": recipe, "data": str(data), "cache": str(Path(scratch) / "cache"),
                    "threads": args.threads, "channels_last": channels_last, "compile": compile_,
                    "precision": precision,
                    "device": args.device,
                    "size": args.size, "batch_size": args.batch_size, "steps": args.steps,
                    "freeze_compare": number == 0 and not args.no_freeze_compare,
                }  # fmt: skip
                results.append((Path(recipe).stem, variant, _run_child(job)))
    load_after = os.getloadavg()

    print(
        f"\n{args.device}, {args.threads} threads, data {args.data or '2 mm demo cohort'}, "
        f"median (and best) of {args.steps} steps after 3 warm-up steps; load average before {load_before[0]:.2f}, "
        f"after {load_after[0]:.2f} (1 min) on {os.cpu_count()} CPUs\n"
    )
    gpu = " peak GPU MiB |" if args.device == "cuda" else ""
    print(
        "| recipe | variant | crop | batch | slices/s | ms/step | ms/step (best) | GFLOP/slice | GFLOP/s "
        f"| of the measured peak | (best) | peak RSS MiB |{gpu}"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|" + ("---|" if gpu else ""))
    for recipe, variant, result in results:
        print(_row(recipe, variant, result, peaks))
    _print_speedups(results)
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
