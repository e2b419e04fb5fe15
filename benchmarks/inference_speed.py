"""Whole-volume inference time and peak memory for a 1 mm and a 2 mm head, on 2 CPU threads.

For each recipe and voxel size, a fresh child process builds a :class:`~medsynth.inference.predictor.Predictor`
(the recipe's generator with random weights, which cost the same as trained ones, or ``--checkpoint``),
reads the demo subject's T1w and times ``Predictor.predict`` end to end: canonical orientation, foreground
mask, normalisation, slice-wise synthesis of the head's bounding box, inverse normalisation. It prints the
median time over ``--repeats`` runs (the machine may be shared; the load average is printed), the GFLOP spent
(``torch.utils.flop_counter``, one extra run), the fraction of the CPU's fp32 peak, peak resident memory, and
how many voxels went through the network compared with the volume's size.

    python benchmarks/inference_speed.py                      # demo_cpu and t1_to_t2_unet2d, 1 mm and 2 mm
    python benchmarks/inference_speed.py --checkpoint runs/demo/checkpoint_best.pt --spacing 1
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

#: Sustained fp32 throughput of the 2 AVX2 cores these figures are quoted against (issue 4).
PEAK_GFLOPS = 150.0
DEFAULT_RECIPES = ("configs/demo_cpu.yaml", "configs/t1_to_t2_unet2d.yaml")


def _parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", action="append", help="recipe (repeatable; default: the two recipes)")
    parser.add_argument("--checkpoint", type=Path, help="a trained checkpoint instead of recipes")
    parser.add_argument("--spacing", type=float, nargs="+", default=[1.0, 2.0], help="demo voxel sizes, mm")
    parser.add_argument("--batch-size", type=int, default=16, help="slices per forward pass")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs (median taken) after one warm-up")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--workdir", type=Path, help="keep the demo subjects here (default: temporary)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # JSON job, run in a child process
    return parser.parse_args(argv)


def _random_checkpoint(recipe: str, subject: Path) -> dict[str, Any]:
    """What a trained checkpoint holds for inference, with the recipe's generator at its initial weights."""
    import torch

    from medsynth.config import load_config
    from medsynth.data.fingerprint import Fingerprint, NormalizationSpec
    from medsynth.data.layouts import load_subject, scan_dataset
    from medsynth.engine.trainer import network_channels
    from medsynth.nets import build_generator

    config = load_config(recipe)
    task = config.parsed_task()
    torch.manual_seed(0)
    generator = build_generator(
        config.model.generator,
        spatial_dims=config.model.spatial_dims,
        in_channels=network_channels(task, config.data.context),
        out_channels=1,
        **config.model.generator_args,
    )
    modalities = list(task.required_modalities)
    record = scan_dataset(subject)[0]
    specs = {m: NormalizationSpec.for_modality(m) for m in modalities}
    fingerprint = Fingerprint.compute([(record.id, load_subject(record, modalities))], specs)
    return {
        "task": task.to_dict(),
        "generator": {"name": config.model.generator, "init_args": generator.init_args},
        "generator_state": generator.state_dict(),
        "fingerprint": fingerprint.to_dict(),
        "slicing": {"spatial_dims": config.model.spatial_dims, "axis": config.data.axis,
                    "context": config.data.context, "crop_size": None},
    }  # fmt: skip


def _worker(job: dict[str, Any]) -> dict[str, Any]:
    """One measurement in this (fresh) process, so that its peak memory is its own."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from medsynth.data.layouts import scan_dataset
    from medsynth.inference.predictor import Predictor
    from medsynth.io.readers import read_volume

    torch.set_num_threads(job["threads"])
    subject = Path(job["subject"])
    if job["checkpoint"]:
        predictor = Predictor.from_checkpoint(job["checkpoint"])
    else:
        predictor = Predictor(_random_checkpoint(job["recipe"], subject))
    paths = scan_dataset(subject)[0].paths
    inputs = {m: read_volume(paths[m]) for m in predictor.sources}

    fed = {"voxels": 0, "padded": 0}
    multiple = 2 ** getattr(predictor.generator, "depth", 0)

    def count(_module: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        batch, *size = args[0].shape[:1] + args[0].shape[2:]
        fed["voxels"] += batch * math.prod(size)
        fed["padded"] += batch * math.prod(-(-side // multiple) * multiple for side in size)

    hook = predictor.generator.register_forward_pre_hook(count)
    prediction = predictor.predict(inputs, batch_size=job["batch_size"])  # warm-up; counts the voxels
    hook.remove()
    with FlopCounterMode(display=False) as counter:
        predictor.predict(inputs, batch_size=job["batch_size"])
    seconds = []
    for _ in range(job["repeats"]):
        started = time.perf_counter()
        predictor.predict(inputs, batch_size=job["batch_size"])
        seconds.append(time.perf_counter() - started)
    return {
        "shape": list(prediction.volume.shape),
        "head_voxels": int(prediction.mask.sum()),
        "fed_voxels": fed["voxels"],
        "padded_voxels": fed["padded"],
        "gflop": counter.get_total_flops() / 1e9,
        "seconds": seconds,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def _run_child(job: dict[str, Any]) -> dict[str, Any]:
    command = [sys.executable, __file__, "--worker", json.dumps(job)]
    completed = subprocess.run(command, capture_output=True, text=True, check=False)
    if completed.returncode != 0:
        raise SystemExit(
            f"measurement failed for {job['recipe'] or job['checkpoint']}:\n{completed.stderr[-3000:]}"
        )
    return json.loads(completed.stdout.strip().splitlines()[-1])


def _row(name: str, spacing: float, r: dict[str, Any]) -> str:
    median, best = statistics.median(r["seconds"]), min(r["seconds"])
    total = math.prod(r["shape"])
    shape = "x".join(str(s) for s in r["shape"])
    return (
        f"| {name} | {spacing:g} mm | {shape} | {median:.2f} | {best:.2f} | {r['gflop']:.0f} "
        f"| {r['gflop'] / median / PEAK_GFLOPS:.0%} | {r['gflop'] / best / PEAK_GFLOPS:.0%} "
        f"| {r['fed_voxels'] / total:.0%} | {r['padded_voxels'] / total:.0%} | {r['peak_rss_mib']:.0f} |"
    )


def main(argv: list[str] | None = None) -> None:
    args = _parse(argv)
    if args.worker:
        print(json.dumps(_worker(json.loads(args.worker))))
        return
    from medsynth.data.demo import make_demo_cohort

    models = [None] if args.checkpoint else (args.config or list(DEFAULT_RECIPES))
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as scratch:
        workdir = args.workdir or Path(scratch)
        rows = []
        for spacing in args.spacing:
            subject = workdir / f"demo_{spacing:g}mm"
            if not subject.is_dir():
                make_demo_cohort(subject, n_subjects=1, spacing_mm=spacing, progress=False)
            for recipe in models:
                job = {
                    "recipe": recipe, "checkpoint": str(args.checkpoint) if args.checkpoint else None,
                    "subject": str(subject), "threads": args.threads, "batch_size": args.batch_size,
                    "repeats": args.repeats,
                }  # fmt: skip
                name = args.checkpoint.name if args.checkpoint else Path(recipe).stem
                rows.append(_row(name, spacing, _run_child(job)))
    load_after = os.getloadavg()

    import torch

    print(
        f"torch {torch.__version__}, {args.threads} threads, batch {args.batch_size} slices, demo subject "
        f"T1w -> T2w, median and best of {args.repeats} runs after 1 warm-up; load average before "
        f"{load_before[0]:.2f}, after {load_after[0]:.2f} (1 min) on {os.cpu_count()} CPUs\n"
    )
    print(
        "| model | voxels | shape | s (median) | s (best) | GFLOP | of 150 GFLOP/s (median) | (best) "
        "| voxels computed / volume | incl. U-Net padding | peak RSS MiB |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
