"""One pix2pix training step per recipe and batch: fp32 vs bf16, eager vs CUDA graph (or torch.compile).

The networks and the step are medsynth's own (the recipe's generator and critic, the GAN objective's
critic + generator step, Adam), on random data of the given slice size, so the figures isolate the step
from the data pipeline. Printed per configuration: ms/step, slices/s, nominal TFLOP/s
(``torch.utils.flop_counter`` over one step) and the fraction of the bf16 matmul peak measured in the
same run (``benchmarks/machine.py``: fp32 on a CPU). ``--profile`` prints the top kernels of a few steps
(``torch.profiler``); ``--epoch`` also times one ``medsynth train`` epoch on a demo cohort and prints
its training seconds against its wall seconds (the issue-10 criterion: wall <= 1.15 x training).

    python benchmarks/gpu_step.py                                     # the GPU recipes, batch 64, 128²
    python benchmarks/gpu_step.py --recipe t1_to_t2_unet2d --batch 8 --batch 64 --size 256 256
    python benchmarks/gpu_step.py --recipe demo_gpu --size 112 112 --modes eager graphs --profile
    python benchmarks/gpu_step.py --epoch                             # + one `medsynth train` epoch
    python benchmarks/gpu_step.py --device cpu --recipe demo_cpu --batch 2 --size 32 32 --steps 2

Without a CUDA device ``--device cuda`` (the default) prints one line and exits 0.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import machine

DEFAULT_RECIPES = ("t1_to_t2_unet2d_gpu", "demo_gpu")
MODES = ("eager", "graphs", "compile")


def _parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--recipe", action="append", help="recipe name or YAML (repeatable)")
    parser.add_argument(
        "--batch", type=int, action="append", help="batch size (repeatable; default: the recipe's)"
    )
    parser.add_argument("--size", type=int, nargs=2, default=(128, 128), metavar=("H", "W"))
    parser.add_argument("--precision", nargs="+", default=["fp32", "bf16"], choices=("fp32", "bf16"))
    parser.add_argument("--modes", nargs="+", default=["eager", "graphs"], choices=MODES)
    parser.add_argument("--steps", type=int, default=20, help="timed steps after the warm-up")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    parser.add_argument("--profile", action="store_true", help="print the top kernels of each configuration")
    parser.add_argument("--epoch", action="store_true", help="also time one `medsynth train` epoch")
    return parser.parse_args(argv)


def _build(recipe: str, batch: int, precision: str, mode: str, device: Any) -> tuple[Any, Any, Any]:
    """The recipe's generator, critic and GAN step on ``device``; returns (step, inputs, generator)."""
    import torch

    from medsynth.config import load_config
    from medsynth.engine.graphs import graphed_step
    from medsynth.engine.objectives import build_objective
    from medsynth.model.layout import InputLayout
    from medsynth.model.networks import build_model_generator
    from medsynth.task import Task

    config = load_config(recipe, [f"train.batch_size={batch}", f"train.amp={precision == 'bf16'}",
                                  f"train.cuda_graphs={mode == 'graphs'}", f"train.compile={mode == 'compile'}"])  # fmt: skip
    train = config.train
    task = Task.parse(config.task, config.modalities)
    layout = InputLayout(tuple(task.sources), config.data.context, False)
    memory_format = torch.channels_last if train.channels_last else torch.contiguous_format
    torch.manual_seed(0)
    generator, _spec = build_model_generator(config.model, layout.channels)
    generator.to(device, memory_format=memory_format)
    graphs = mode == "graphs" and device.type == "cuda"
    optimizer = torch.optim.Adam(
        generator.parameters(), lr=train.lr_generator, betas=(train.beta1, train.beta2),
        fused=device.type == "cuda", capturable=graphs,
    )  # fmt: skip
    forward = torch.compile(generator) if mode == "compile" else generator
    objective = build_objective(
        "gan", config=config, generator=forward, in_channels=layout.channels, optimizer=optimizer,
        device=device, memory_format=memory_format, precision="bf16" if precision == "bf16" else "fp32",
    )  # fmt: skip
    step = graphed_step(objective.step, [optimizer, *objective.optimizers], device, enabled=graphs)
    height, width = _size
    source = torch.randn(batch, layout.channels, height, width, device=device).contiguous(
        memory_format=memory_format
    )
    target = torch.randn(batch, 1, height, width, device=device).contiguous(memory_format=memory_format)
    return step, (source, target, None), generator


def _flops(recipe: str, batch: int, device: Any) -> float:
    """Nominal FLOPs of one eager fp32 step (the count does not depend on precision or capture)."""
    from torch.utils.flop_counter import FlopCounterMode

    step, inputs, _ = _build(recipe, batch, "fp32", "eager", device)
    with FlopCounterMode(display=False) as counter:
        step(*inputs)
    return float(counter.get_total_flops())


def _time(step: Any, inputs: tuple, steps: int, device: str) -> list[float]:
    for _ in range(5):  # warm-up; a graphed step captures after 3
        step(*inputs)
    machine.synchronize(device)
    times = []
    for _ in range(steps):
        started = time.perf_counter()
        step(*inputs)
        machine.synchronize(device)
        times.append(time.perf_counter() - started)
    return times


def _profile(step: Any, inputs: tuple, device: str) -> None:
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(3):
            step(*inputs)
        machine.synchronize(device)
    sort = "cuda_time_total" if device == "cuda" else "cpu_time_total"
    print(prof.key_averages().table(sort_by=sort, row_limit=15), flush=True)


def _epoch(device: str) -> None:
    """One `medsynth train` epoch of the GPU demo recipe on a fresh demo cohort: training vs wall seconds."""
    import csv

    from medsynth.config import load_config
    from medsynth.data.demo import make_demo_cohort
    from medsynth.engine.run import claim_run_dir, train

    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        cpu = device == "cpu"
        make_demo_cohort(
            root / "demo", n_subjects=5 if cpu else 12, spacing_mm=6.0 if cpu else 2.0, progress=False
        )
        overrides = ["train.epochs=1", "train.decay_epochs=0", f"train.device={device}", "train.val_every=1"]
        if cpu:
            overrides += ["train.batch_size=4", "data.val=1", "data.test=1",
                          "model.generator_args={base_channels: 8, depth: 3, norm: batch, dropout: 0.0}",
                          "model.critic_args={base_channels: 8, n_layers: 2, norm: batch}"]  # fmt: skip
        config = load_config("demo_gpu", overrides, {"data.root": str(root / "demo")})
        run_dir = root / "run"
        claim_run_dir(run_dir, config)
        train(config, run_dir, quiet=True)  # cohort cache, fingerprint, first epoch: not what we time
        config = load_config("demo_gpu", [*overrides[:1], "train.decay_epochs=1", *overrides[2:]],
                             {"data.root": str(root / "demo")})  # fmt: skip
        started = time.perf_counter()
        train(config, run_dir, resume=True, quiet=True)
        wall = time.perf_counter() - started
        with open(run_dir / "metrics.csv", newline="") as stream:
            row = list(csv.DictReader(stream))[-1]
        seconds = float(row["seconds"])
        print(
            f"medsynth train, demo_gpu, 1 epoch on {device}: training {seconds:.2f} s, validation "
            f"{float(row['val_seconds']):.2f} s, io {float(row['io_seconds']):.2f} s; wall {wall:.2f} s "
            f"(resume and start-up included) = {wall / max(seconds, 1e-9):.2f} x training",
            flush=True,
        )


_size: tuple[int, int] = (128, 128)


def main(argv: list[str] | None = None) -> int:
    global _size
    args = _parse(argv)
    machine.cuda_or_exit(args.device)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    _size = tuple(args.size)
    device = torch.device(args.device)
    print(machine.describe(args.device), flush=True)
    peak = machine.measure_peak(args.device)
    print(peak, flush=True)
    recipes = args.recipe or list(DEFAULT_RECIPES)
    header = "| recipe | batch | slice | precision | mode | ms/step | slices/s | GFLOP/s | of peak |"
    print(header + "\n" + "|---" * 9 + "|", flush=True)
    for recipe in recipes:
        from medsynth.config import load_config

        for batch in args.batch or [load_config(recipe).train.batch_size]:
            flops = _flops(recipe, batch, device)
            for precision in args.precision:
                if precision == "bf16" and device.type != "cuda":
                    print(
                        f"| {recipe} | {batch} | bf16 | - | no autocast on a CPU: bf16 = fp32 |", flush=True
                    )
                    continue
                for mode in args.modes:
                    if mode == "graphs" and device.type != "cuda":
                        print(
                            f"| {recipe} | {batch} | {precision} | graphs | CUDA only: skipped |", flush=True
                        )
                        continue
                    step, inputs, _ = _build(recipe, batch, precision, mode, device)
                    seconds = statistics.median(_time(step, inputs, args.steps, args.device))
                    gflops = flops / seconds / 1e9
                    print(
                        f"| {recipe} | {batch} | {_size[0]}x{_size[1]} | {precision} | {mode} | "
                        f"{1e3 * seconds:.2f} | {batch / seconds:,.0f} | {gflops:,.1f} | "
                        f"{machine.percent(gflops, peak)} |",
                        flush=True,
                    )
                    if args.profile:
                        _profile(step, inputs, args.device)
                    del step, inputs
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
    if args.epoch:
        _epoch(args.device)
    return 0


if __name__ == "__main__":
    sys.exit(main())
