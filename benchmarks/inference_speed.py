"""Whole-volume inference time and peak memory for a 1 mm and a 2 mm head, on 2 CPU threads or a GPU.

For each recipe and voxel size, a fresh child process builds a :class:`~medsynth.model.synthesis.SynthesisModel`
(the recipe's generator with random weights, which cost the same as trained ones, or ``--checkpoint``),
reads the demo subject's T1w and times ``SynthesisModel.predict`` end to end: canonical orientation, foreground
mask, normalisation, slice-wise synthesis of the head's bounding box, inverse normalisation. It prints the
median time over ``--repeats`` runs (the machine may be shared; the load average is printed), the GFLOP spent
(``torch.utils.flop_counter``, one extra run), the fraction of the machine's own matrix-product peak
(measured at the start of the run, :mod:`machine`), peak resident memory, and how many voxels went through
the network compared with the volume's size.

    python benchmarks/inference_speed.py                      # demo_cpu and t1_to_t2_unet2d, 1 mm and 2 mm
    python benchmarks/inference_speed.py --checkpoint runs/demo/checkpoint_best.pt --spacing 1
    python benchmarks/inference_speed.py --device cuda --batch-size 64
    python benchmarks/inference_speed.py --precision fp32 bf16 auto  # bf16 lines: time and max |bf16 - fp32|

Precisions (``--precision``, default fp32 and bf16 side by side) are forced on the model; a bf16 line also
reports the largest difference from the fp32 synthesis of the same volume inside the head (normalised
units) and is put against the bf16 matrix-product peak.
"""

from __future__ import annotations

import argparse
import json
import math
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


def _parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--config", action="append", help="recipe name or YAML (repeatable; default: the two recipes)"
    )
    parser.add_argument("--checkpoint", type=Path, help="a trained checkpoint instead of recipes")
    parser.add_argument("--spacing", type=float, nargs="+", default=[1.0, 2.0], help="demo voxel sizes, mm")
    parser.add_argument("--batch-size", type=int, default=16, help="slices per forward pass")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs (median taken) after one warm-up")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--precision", nargs="+", choices=("fp32", "bf16", "auto"), default=["fp32", "bf16"])
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--workdir", type=Path, help="keep the demo subjects here (default: temporary)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # JSON job, run in a child process
    return parser.parse_args(argv)


def _random_checkpoint(recipe: str, subject: Path) -> dict[str, Any]:
    """What a trained checkpoint holds for inference, with the recipe's generator at its initial weights."""
    import torch

    from medsynth.config import load_config
    from medsynth.data.fingerprint import Fingerprint, NormalizationSpec
    from medsynth.data.layouts import load_subject, scan_dataset
    from medsynth.model.layout import InputLayout
    from medsynth.model.networks import build_model_generator
    from medsynth.model.plan import SynthesisPlan

    config = load_config(recipe)
    task = config.parsed_task()
    modalities = tuple(task.modalities if task.is_unified else task.sources)
    layout = InputLayout(modalities, config.data.context, task.is_unified)
    torch.manual_seed(0)
    generator, spec = build_model_generator(config.model, layout.channels)
    plan = SynthesisPlan(
        task=task, generator=spec, spatial_dims=config.model.spatial_dims, axis=config.data.axis,
        context=config.data.context, sliding_overlap=config.data.sliding_overlap,
    )  # fmt: skip
    required = list(task.required_modalities)
    record = scan_dataset(subject)[0]
    specs = {m: NormalizationSpec.for_modality(m) for m in required}
    fingerprint = Fingerprint.compute([(record.id, load_subject(record, required))], specs)
    return {
        "plan": plan.to_dict(),
        "generator_state": generator.state_dict(),
        "fingerprint": fingerprint.to_dict(),
    }


def _worker(job: dict[str, Any]) -> dict[str, Any]:
    """One measurement in this (fresh) process, so that its peak memory is its own."""
    import numpy as np
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from medsynth.data.layouts import scan_dataset
    from medsynth.io.readers import read_volume
    from medsynth.model.synthesis import SynthesisModel

    torch.set_num_threads(job["threads"])
    subject = Path(job["subject"])
    device = job["device"]
    payload = None if job["checkpoint"] else _random_checkpoint(job["recipe"], subject)

    def load(precision: str) -> SynthesisModel:
        if payload is None:
            return SynthesisModel.from_checkpoint(job["checkpoint"], device=device, precision=precision)
        return SynthesisModel.from_payload(payload, device=device, precision=precision)

    model = load(job["precision"])
    paths = scan_dataset(subject)[0].paths
    inputs = {m: read_volume(paths[m]) for m in model.sources}

    fed = {"voxels": 0, "padded": 0}
    multiple = 2 ** getattr(model.generator, "depth", 0)

    def count(_module: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        batch, *size = args[0].shape[:1] + args[0].shape[2:]
        fed["voxels"] += batch * math.prod(size)
        fed["padded"] += batch * math.prod(-(-side // multiple) * multiple for side in size)

    hook = model.generator.register_forward_pre_hook(count)
    prediction = model.predict(inputs, batch_size=job["batch_size"])  # warm-up; counts the voxels
    hook.remove()
    with FlopCounterMode(display=False) as counter:
        model.predict(inputs, batch_size=job["batch_size"])
    seconds = []
    for _ in range(job["repeats"]):
        started = time.perf_counter()
        model.predict(inputs, batch_size=job["batch_size"])  # returns a host array: synchronised
        seconds.append(time.perf_counter() - started)
    result = {
        "precision": model.precision.precision,
        "channels_last": model.precision.channels_last,
        "shape": list(prediction.volume.shape),
        "head_voxels": int(prediction.mask.sum()),
        "fed_voxels": fed["voxels"],
        "padded_voxels": fed["padded"],
        "gflop": counter.get_total_flops() / 1e9,
        "seconds": seconds,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    if device == "cuda":
        result["peak_gpu_mib"] = torch.cuda.max_memory_allocated() / 2**20
    if model.precision.precision != "fp32":  # after the memory reading: the reference is not part of it
        reference = load("fp32").predict(inputs, batch_size=job["batch_size"])
        inside = reference.mask
        difference = abs(prediction.normalised - reference.normalised)[inside]
        result["max_abs_diff"] = float(difference.max())
        result["p999_abs_diff"] = float(np.percentile(difference, 99.9))
        result["mean_abs_diff"] = float(difference.mean())
    return result


def _run_child(job: dict[str, Any]) -> dict[str, Any]:
    command = [sys.executable, __file__, "--worker", json.dumps(job)]
    completed = subprocess.run(command, capture_output=True, text=True, check=False)
    if completed.returncode != 0:
        raise SystemExit(
            f"measurement failed for {job['recipe'] or job['checkpoint']}:\n{completed.stderr[-3000:]}"
        )
    return json.loads(completed.stdout.strip().splitlines()[-1])


def _row(name: str, spacing: float, r: dict[str, Any], peaks: dict[str, machine.Peak]) -> str:
    peak = peaks["bfloat16" if r["precision"] == "bf16" else "float32"]
    median, best = statistics.median(r["seconds"]), min(r["seconds"])
    layout = "channels_last" if r["channels_last"] else "contiguous"
    difference = (
        f"{r['max_abs_diff']:.4f} / {r['p999_abs_diff']:.4f} / {r['mean_abs_diff']:.5f}"
        if "max_abs_diff" in r
        else "-"
    )
    total = math.prod(r["shape"])
    shape = "x".join(str(s) for s in r["shape"])
    gpu = f" {r['peak_gpu_mib']:.0f} |" if "peak_gpu_mib" in r else ""
    return (
        f"| {name} | {r['precision']}, {layout} | {spacing:g} mm | {shape} | {median:.2f} | {best:.2f} | {r['gflop']:.0f} "
        f"| {machine.percent(r['gflop'] / median, peak)} | {machine.percent(r['gflop'] / best, peak)} "
        f"| {r['fed_voxels'] / total:.0%} | {r['padded_voxels'] / total:.0%} | {r['peak_rss_mib']:.0f} | {difference} |{gpu}"
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
    peaks = {name: machine.measure_peak(args.device, dtype_name=name) for name in ("float32", "bfloat16")}
    for peak in peaks.values():
        print(peak, flush=True)
    models = [None] if args.checkpoint else (args.config or list(DEFAULT_RECIPES))
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as scratch:
        workdir = args.workdir or Path(scratch)
        rows = []
        for spacing in args.spacing:
            subject = workdir / f"demo_{spacing:g}mm"
            if not subject.is_dir():
                make_demo_cohort(subject, n_subjects=1, spacing_mm=spacing, progress=False)
            for recipe, precision in ((r, p) for r in models for p in args.precision):
                job = {
                    "precision": precision,
                    "recipe": recipe, "checkpoint": str(args.checkpoint) if args.checkpoint else None,
                    "subject": str(subject), "threads": args.threads, "batch_size": args.batch_size,
                    "repeats": args.repeats, "device": args.device,
                }  # fmt: skip
                name = args.checkpoint.name if args.checkpoint else Path(recipe).stem
                rows.append(_row(name, spacing, _run_child(job), peaks))
    load_after = os.getloadavg()

    print(
        f"\n{args.device}, {args.threads} threads, batch {args.batch_size} slices, demo subject "
        f"T1w -> T2w, median and best of {args.repeats} runs after 1 warm-up; load average before "
        f"{load_before[0]:.2f}, after {load_after[0]:.2f} (1 min) on {os.cpu_count()} CPUs\n"
    )
    gpu = " peak GPU MiB |" if args.device == "cuda" else ""
    print(
        "| model | precision | voxels | shape | s (median) | s (best) | GFLOP | of the measured peak (median) | (best) "
        f"| voxels computed / volume | incl. U-Net padding | peak RSS MiB | abs diff from fp32 in the head: max / 99.9th pct / mean |{gpu}"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|" + ("---|" if gpu else ""))
    print("\n".join(rows))


if __name__ == "__main__":
    main()
