"""Data-parallel scaling of ``medsynth train``: the same number of steps with 1 and N processes.

Each configuration is a real training run through the command line (``python -m medsynth train`` for one
process, ``python -m torch.distributed.run --nproc-per-node N -m medsynth train`` for N), on the same
recipe, cohort and per-process batch, for ``--epochs`` epochs of ``--steps`` steps. Validation runs only
after the last epoch and is not timed: the figure is the last epoch's ``slices_per_s`` from the run's own
``metrics.csv`` (slices of all processes per second of training; the first epoch is the warm-up).

Efficiency = throughput with N processes / (N x throughput with 1 process). The processes share
``--threads`` CPU threads (the trainer gives each ``threads // N``), so on a CPU the comparison is
"the same cores, split into N processes" and the efficiency shows DDP's cost there (gradient all-reduce
over gloo, smaller per-process thread pools). On a machine with CUDA, one process on one GPU is also
measured (NCCL needs one GPU per process; a second process needs a second GPU).

    python benchmarks/scaling.py                                  # demo_cpu, 2 mm demo cohort, 1 and 2 processes
    python benchmarks/scaling.py --processes 1 2 4 --threads 4 --steps 20
    python benchmarks/scaling.py --data /data/brats --config t1_to_t2_unet2d
"""

from __future__ import annotations

import argparse
import csv
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import machine


def _parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="demo_cpu", help="recipe name or YAML")
    parser.add_argument("--data", type=Path, help="dataset with T1w/T2w (default: a 2 mm demo cohort)")
    parser.add_argument("--subjects", type=int, default=6, help="subjects of the generated demo cohort")
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2], help="world sizes to run")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads shared by the processes")
    parser.add_argument("--steps", type=int, default=10, help="steps per epoch (per process)")
    parser.add_argument("--epochs", type=int, default=2, help="epochs; the last one is reported")
    parser.add_argument("--batch-size", type=int, help="per-process batch (default: the recipe's)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    return parser.parse_args(argv)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_training(args: argparse.Namespace, data: Path, runs: Path, processes: int, device: str) -> dict:
    """One real training run; returns the last epoch's metrics row and the wall time."""
    name = f"{device}-{processes}p"
    train = ["-m", "medsynth", "train", "t1->t2", "--data", str(data), "--config", args.config,
             "--device", device, "--runs-dir", str(runs), "--name", name, "--quiet"]  # fmt: skip
    settings = [f"train.steps_per_epoch={args.steps}", f"train.epochs={args.epochs}", "train.decay_epochs=0",
                f"train.val_every={args.epochs + 1}", f"train.num_threads={args.threads}", "train.val_subjects=1",
                *([f"train.batch_size={args.batch_size}"] if args.batch_size else []), *args.overrides]  # fmt: skip
    for item in settings:
        train += ["--set", item]
    if processes == 1:
        command = [sys.executable, *train]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(processes),
                   "--master-port", str(_free_port()), *train]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, args.threads // processes))}
    started = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - started
    if result.returncode != 0:
        raise SystemExit(f"{name} failed:\n{result.stderr[-3000:]}")
    with open(runs / name / "metrics.csv", newline="") as stream:
        row = list(csv.DictReader(stream))[-1]
    return {"row": row, "wall": wall}


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    print(machine.describe("cpu"))
    with tempfile.TemporaryDirectory(prefix="medsynth-scaling-") as temp:
        data = args.data
        if data is None:
            from medsynth.data.demo import make_demo_cohort

            data = Path(temp) / "demo"
            make_demo_cohort(data, n_subjects=args.subjects, spacing_mm=2.0, seed=0, progress=False)
        runs = Path(temp) / "runs"
        print(
            f"recipe {args.config}, {args.epochs} epochs x {args.steps} steps per process (last epoch timed), "
            f"{args.threads} CPU threads shared by the processes"
        )
        print(
            f"{'device':>6} {'procs':>5} {'batch/step':>10} {'slices/s':>9} {'ms/step':>8} {'efficiency':>10}"
        )
        base = None
        for processes in args.processes:
            result = run_training(args, data, runs, processes, "cpu")
            row = result["row"]
            throughput = float(row["slices_per_s"])
            steps = args.steps
            ms_per_step = 1000 * float(row["seconds"]) / steps
            batch = round(throughput * float(row["seconds"]) / steps)
            base = throughput if processes == 1 else base
            efficiency = f"{throughput / (processes * base):.0%}" if base else "n/a"
            print(
                f"{'cpu':>6} {processes:>5} {batch:>10} {throughput:>9.1f} {ms_per_step:>8.1f} {efficiency:>10}"
            )
        import torch

        if torch.cuda.is_available():
            print(machine.describe("cuda"))
            result = run_training(args, data, runs, 1, "cuda")
            row = result["row"]
            print(
                f"{'cuda':>6} {1:>5} {'':>10} {float(row['slices_per_s']):>9.1f} "
                f"{1000 * float(row['seconds']) / args.steps:>8.1f} {'(1 GPU)':>10}"
            )
        else:
            print(f"{machine.NO_CUDA} (NCCL with 1 process on a GPU not measured)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
