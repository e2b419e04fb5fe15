"""Every generator and mode on the same held-out subjects, for the same minutes each: one markdown table.

Trains each recipe below with ``--set train.max_minutes=M`` (the learning-rate schedule mapped onto the
minutes; epochs set high so the budget, not the epoch count, ends every run), evaluates it on the run's
held-out test subjects (``medsynth evaluate --run RUN --baselines``; every run uses the recipe's seeded
split, so the test subjects are the same), and writes ``mode_comparison.md`` (into the runs folder, or
``--docs docs`` for the repository's copy): generator/mode, task,
recipe, parameters, FLOPs per slice (``torch.utils.flop_counter``, one forward pass over one training
slice/patch), training minutes, PSNR ± std, SSIM, MAE inside the head mask in the normalised space, and the
unified model's rows beside the dedicated models with the gap. Also the unified model's 28 directions and
two figures: ``docs/unified_targets.png`` (all four targets of one test subject) and
``docs/seam_3d.png`` (a 3D synthesis through a slice that crosses sliding-window faces).

ResViT trains in the paper's two stages, splitting its minutes: ``demo_resvit_stage1`` (CNN only), then
``demo_resvit`` started from it (``model.generator_weights``). Finished runs are skipped, interrupted
ones resumed, so the script can be stopped and started again.

    medsynth data demo --out demo/data --subjects 12 --spacing 2
    python benchmarks/compare_modes.py --data demo/data --minutes 8                 # all, one after another
    python benchmarks/compare_modes.py --data demo/data --minutes 8 --threads 1 --only demo_cpu,demo_l1 &
    python benchmarks/compare_modes.py --data demo/data --minutes 8 --threads 1 --only demo_unet3d &
    python benchmarks/compare_modes.py --data demo/data --minutes 8 --report-only --docs docs  # the docs' table

``--threads 1`` lets two runs share 2 cores side by side; their minutes are then not comparable with
runs that had both cores (the table names the threads).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import machine

#: Huge epoch counts (constant half, decay half) so the time budget ends every run at the same minutes.
OPEN_EPOCHS = ["train.epochs=100000", "train.decay_epochs=100000"]


@dataclass(frozen=True)
class Entry:
    """One row group of the comparison: a recipe (and, for ResViT, its stage-1 recipe)."""

    name: str
    recipe: str
    generator: str
    task: str
    stage1: str | None = None


ENTRIES = (
    Entry("demo_cpu", "demo_cpu", "U-Net 2.5D + PatchGAN (main job)", "T1w → T2w"),
    Entry("demo_l1", "demo_l1", "U-Net 2.5D, L1 only (ablation)", "T1w → T2w"),
    Entry("demo_resvit", "demo_resvit", "ResViT 2D, two stages", "T1w → T2w", stage1="demo_resvit_stage1"),
    Entry("demo_unet3d", "demo_unet3d", "U-Net 3D, 48³ patches, sliding window", "T1w → T2w"),
    Entry("demo_many_to_one", "demo_many_to_one", "U-Net 2.5D + PatchGAN", "T1w + T2w + PDw → FLAIR"),
    Entry("demo_unified", "demo_unified", "unified U-Net 2D", "any → any of T1w, T2w, PDw, FLAIR"),
)
#: The unified model's rows shown beside a dedicated model: (target, inputs, dedicated entry).
UNIFIED_VERSUS = (("t2", "t1", "demo_cpu"), ("flair", "t1+t2+pd", "demo_many_to_one"))
NAMES = {"t1": "T1w", "t2": "T2w", "pd": "PDw", "flair": "FLAIR"}


# ----------------------------------------------------------------------------------------- running
def medsynth(*arguments: str) -> list[str]:
    return [sys.executable, "-m", "medsynth", *arguments]


def run_state(run_dir: Path) -> str:
    """``missing``, ``partial`` (can be resumed) or ``finished`` (the trainer's own flag)."""
    latest = run_dir / "checkpoint_latest.pt"
    if not latest.is_file():
        return "missing" if not run_dir.exists() else "partial"
    import torch

    payload = torch.load(latest, map_location="cpu", weights_only=True)
    return "finished" if payload.get("finished") else "partial"


def train(name: str, recipe: str, args: argparse.Namespace, minutes: float, extra: list[str]) -> None:
    """Train (or resume) one run to its budget, recording the wall time it took beside it."""
    run_dir = args.runs / name
    state = run_state(run_dir)
    if state == "finished":
        print(f"{name}: finished, skipped")
        return
    overrides = [*OPEN_EPOCHS, f"train.max_minutes={minutes:g}", f"train.num_threads={args.threads}", *extra]
    if state == "partial" and (run_dir / "checkpoint_latest.pt").is_file():
        command = medsynth("train", "--resume", str(run_dir), "--quiet")
    else:
        if run_dir.exists() and not any(run_dir.glob("checkpoint_*.pt")):
            print(f"{name}: {run_dir} holds no checkpoint; remove it to train afresh", file=sys.stderr)
            raise SystemExit(2)
        command = medsynth("train", "--data", str(args.data), "--config", recipe, "--runs-dir", str(args.runs),
                           "--name", name, "--device", args.device, "--quiet")  # fmt: skip
        for item in overrides:
            command += ["--set", item]
    print(f"{name}: training {minutes:g} min ({' '.join(command[2:])})", flush=True)
    start = time.perf_counter()
    subprocess.run(command, check=True)
    record = run_dir / "compare.json"
    before = json.loads(record.read_text()) if record.is_file() else {"wall_minutes": 0.0}
    before["wall_minutes"] += (time.perf_counter() - start) / 60
    before["threads"], before["budget_minutes"] = args.threads, minutes
    record.write_text(json.dumps(before, indent=2))


def evaluate(run_dir: Path, device: str) -> None:
    """``medsynth evaluate --run RUN --baselines`` unless its table is newer than the best checkpoint."""
    table, best = run_dir / "eval" / "metrics.csv", run_dir / "checkpoint_best.pt"
    if table.is_file() and table.stat().st_mtime >= best.stat().st_mtime:
        return
    subprocess.run(medsynth("evaluate", "--run", str(run_dir), "--baselines", "--device", device, "--quiet"),
                   check=True, stdout=subprocess.DEVNULL)  # fmt: skip


def run_entry(entry: Entry, args: argparse.Namespace) -> None:
    if entry.stage1:
        half = args.minutes / 2
        train(entry.stage1, entry.stage1, args, half, [])
        weights = f"model.generator_weights={args.runs / entry.stage1}"
        train(entry.name, entry.recipe, args, half, [weights])
    else:
        train(entry.name, entry.recipe, args, args.minutes, [])
    evaluate(args.runs / entry.name, args.device)


# --------------------------------------------------------------------------------------- measuring
def model_cost(run_dir: Path) -> tuple[int, float]:
    """(generator parameters, forward FLOPs for one training slice or patch) from the checkpoint alone."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from medsynth.model.checkpoint import load_checkpoint
    from medsynth.model.plan import SynthesisPlan
    from medsynth.nets import build_generator

    plan = SynthesisPlan.from_checkpoint(load_checkpoint(run_dir))
    generator = build_generator(plan.generator.name, **plan.generator.init_args).eval()
    window = tuple(plan.window or (64,) * plan.spatial_dims)
    sample = torch.zeros(1, plan.generator.init_args["in_channels"], *window)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        generator(sample)
    return sum(p.numel() for p in generator.parameters()), float(counter.get_total_flops())


def training_minutes(run_dir: Path) -> float:
    """Minutes of training steps (validation excluded) from the run's metrics.csv."""
    path = run_dir / "metrics.csv"
    if not path.is_file():
        return math.nan
    with open(path, newline="", encoding="utf-8") as stream:
        return sum(float(row["seconds"] or 0) for row in csv.DictReader(stream)) / 60


def wall_minutes(run_dir: Path) -> float:
    record = run_dir / "compare.json"
    return json.loads(record.read_text())["wall_minutes"] if record.is_file() else math.nan


def scores(run_dir: Path) -> dict[tuple[str, str, str], dict[str, tuple[float, float]]]:
    """``(method, target, inputs) -> {psnr, ssim, mae: (mean, std)}`` over the test subjects, inside the mask."""
    path = run_dir / "eval" / "metrics.csv"
    groups: dict[tuple[str, str, str], list[dict[str, str]]] = {}
    with open(path, newline="", encoding="utf-8") as stream:
        for row in csv.DictReader(stream):
            groups.setdefault((row["method"], row["target"], row["inputs"]), []).append(row)
    result = {}
    for key, rows in groups.items():
        entry = {}
        for name, column in (("psnr", "psnr_masked"), ("ssim", "ssim3d_masked"), ("mae", "mae_masked")):
            values = [float(r[column]) for r in rows]
            mean = sum(values) / len(values)
            entry[name] = (mean, math.sqrt(sum((v - mean) ** 2 for v in values) / len(values)))
        entry["n"] = (len(rows), 0.0)
        result[key] = entry
    return result


def collect(entries: tuple[Entry, ...], runs: Path) -> list[dict[str, Any]]:
    """One record per evaluated run (runs not evaluated yet are left out)."""
    records = []
    for entry in entries:
        run_dir = runs / entry.name
        if not (run_dir / "eval" / "metrics.csv").is_file():
            continue
        parameters, flops = model_cost(run_dir)
        minutes = training_minutes(run_dir)
        wall = wall_minutes(run_dir)
        if entry.stage1:
            minutes += training_minutes(runs / entry.stage1)
            wall += wall_minutes(runs / entry.stage1)
        records.append({"entry": entry, "parameters": parameters, "flops": flops, "minutes": minutes,
                        "wall": wall, "scores": scores(run_dir)})  # fmt: skip
    return records


# ----------------------------------------------------------------------------------------- reporting
def _direction(target: str, inputs: str) -> str:
    return " + ".join(NAMES.get(m, m) for m in inputs.split("+")) + " → " + NAMES.get(target, target)


def _cells(score: dict[str, tuple[float, float]]) -> str:
    psnr, ssim, mae = score["psnr"], score["ssim"], score["mae"]
    return f"{psnr[0]:.2f} ± {psnr[1]:.2f} | {ssim[0]:.3f} | {mae[0]:.4f}"


def _model_row(scores: dict) -> tuple[str, str, dict]:
    (method, target, inputs), score = next((k, v) for k, v in scores.items() if k[0] == "model")
    return target, inputs, score


def build_table(records: list[dict[str, Any]]) -> str:
    """The markdown comparison: one row per dedicated model, the unified model's matched rows and gaps."""
    lines = [
        "| generator / mode | task | recipe (`configs/`) | parameters | GFLOPs per slice | train min "
        "| PSNR (dB) | SSIM (3D) | MAE |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    by_name = {r["entry"].name: r for r in records}
    for record in records:
        entry = record["entry"]
        cost = f"{record['parameters'] / 1e6:.2f} M | {record['flops'] / 1e9:.2f} | {record['minutes']:.1f}"
        recipe = f"`{entry.recipe}`" + (f" after `{entry.stage1}`" if entry.stage1 else "")
        if entry.name == "demo_unified":
            for target, inputs, _dedicated in UNIFIED_VERSUS:
                score = record["scores"].get(("model", target, inputs))
                if score:
                    lines.append(f"| {entry.generator} | {_direction(target, inputs)} | {recipe} | {cost} | "
                                 f"{_cells(score)} |")  # fmt: skip
            continue
        target, inputs, score = _model_row(record["scores"])
        lines.append(
            f"| {entry.generator} | {_direction(target, inputs)} | {recipe} | {cost} | {_cells(score)} |"
        )
    unified = by_name.get("demo_unified")
    gaps = []
    for target, inputs, dedicated in UNIFIED_VERSUS:
        if unified is None or dedicated not in by_name:
            continue
        mine = unified["scores"].get(("model", target, inputs))
        theirs = by_name[dedicated]["scores"].get(("model", target, inputs))
        if mine and theirs:
            gap = mine["psnr"][0] - theirs["psnr"][0]
            ssim = mine["ssim"][0] - theirs["ssim"][0]
            gaps.append(f"| {_direction(target, inputs)} | `{dedicated}` | {theirs['psnr'][0]:.2f} | "
                        f"{mine['psnr'][0]:.2f} | {gap:+.2f} | {ssim:+.3f} |")  # fmt: skip
    if gaps:
        lines += ["", "Unified model versus the dedicated one (same test subjects):", "",
                  "| direction | dedicated recipe | dedicated PSNR | unified PSNR | gap (dB) | SSIM gap |",
                  "|---|---|---|---|---|---|", *gaps]  # fmt: skip
    return "\n".join(lines)


def directions_table(record: dict[str, Any]) -> str:
    """The unified model's every (inputs → target) direction, by target then number of inputs."""
    rows = sorted(
        (
            (target, inputs, score)
            for (method, target, inputs), score in record["scores"].items()
            if method == "model"
        ),
        key=lambda item: (item[0], -len(item[1].split("+")), item[1]),
    )
    lines = ["| direction | PSNR (dB) | SSIM (3D) | MAE |", "|---|---|---|---|"]
    lines += [f"| {_direction(target, inputs)} | {_cells(score)} |" for target, inputs, score in rows]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------- figures
def _test_subject(run_dir: Path) -> tuple[Any, Any]:
    from medsynth.data.layouts import scan_dataset
    from medsynth.model.synthesis import SynthesisModel

    model = SynthesisModel.from_checkpoint(run_dir, device="cpu")
    test = set(model.checkpoint_splits.get("test", []))
    record = next(r for r in scan_dataset(model_data_root(run_dir)) if r.id in test)
    return model, record


def model_data_root(run_dir: Path) -> str:
    from medsynth.config import load_config

    return str(load_config(run_dir / "config.yaml").data.root)


def unified_figure(run_dir: Path, path: Path) -> Path:
    """All four targets of one test subject, each synthesised from the other three (axial, mid-head)."""
    import numpy as np

    from medsynth.data.layouts import load_subject
    from medsynth.evaluate import _canonical_array
    from medsynth.viz import comparison_grid

    model, record = _test_subject(run_dir)
    modalities = [m for m in model.task.modalities if m in record.paths]
    volumes = load_subject(record, modalities)
    rows, titles = [], []
    for target in modalities:
        inputs = [m for m in modalities if m != target]
        prediction = model.predict({m: volumes[m] for m in inputs}, target)
        truth = model.normalise({target: _canonical_array(volumes[target])})[target]
        k = int(np.mean(np.nonzero(prediction.mask.any(axis=(0, 1)))[0]))
        rows.append({"synthetic": prediction.normalised[:, :, k], "target": truth[:, :, k]})
        titles.append(f"{record.id}: {_direction(target, '+'.join(inputs))}")
    return comparison_grid(rows, path, titles=titles)


def seam_figure(run_dir: Path, path: Path) -> Path:
    """A 3D synthesis through an axial slice crossing sliding-window faces (dashed), with |error|."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from medsynth.data.layouts import load_subject
    from medsynth.data.masks import bounding_box
    from medsynth.evaluate import _canonical_array
    from medsynth.model.sliding import window_starts

    model, record = _test_subject(run_dir)
    plan = model.plan
    volumes = load_subject(record, [*model.sources, str(model.target)])
    prediction = model.predict({m: volumes[m] for m in model.sources}, str(model.target))
    truth = model.normalise({str(model.target): _canonical_array(volumes[str(model.target)])})[
        str(model.target)
    ]
    box = bounding_box(prediction.mask, margin=4)
    k = (box[2].start + box[2].stop) // 2
    panels = {"synthetic": prediction.normalised[:, :, k], "target": truth[:, :, k],
              "|error|": np.abs(prediction.normalised - truth)[:, :, k]}  # fmt: skip
    figure, axes = plt.subplots(1, 3, figsize=(12, 4.6))
    for axis, (title, image) in zip(axes, panels.items(), strict=True):
        error = title == "|error|"
        axis.imshow(np.flipud(image.T), cmap="magma" if error else "gray", vmin=0 if error else -1,
                    vmax=0.5 if error else 1)  # fmt: skip
        for dim, draw in ((0, axis.axvline), (1, axis.axhline)):
            size, patch = box[dim].stop - box[dim].start, plan.window[dim]
            for start in window_starts(size, patch, plan.sliding_overlap):
                for face in (start, start + patch):
                    position = box[dim].start + min(face, size)
                    draw(
                        position if dim == 0 else image.shape[1] - 1 - position, color="cyan", lw=0.6, ls="--"
                    )
        axis.set_title(title)
        axis.set_axis_off()
    figure.suptitle(f"{record.id}, axial slice {k}: {plan.window} windows, overlap {plan.sliding_overlap}, "
                    "Gaussian blending; dashed = window faces")  # fmt: skip
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(figure)
    return path


# ------------------------------------------------------------------------------------------------ main
def report(records: list[dict[str, Any]], args: argparse.Namespace, header: str) -> str:
    minutes = (
        f"{args.minutes:g} min budget per run (ResViT: half per stage), {args.threads} thread(s) per run"
    )
    parts = [
        "# Mode comparison (written by `benchmarks/compare_modes.py`)",
        "",
        "```",
        header,
        "```",
        "",
        f"Demo cohort `{args.data}`, held-out test subjects of each run's seeded split; {minutes}. Metrics inside "
        "the head mask, normalised space (data range 2), mean ± std over the test subjects. Parameters and "
        "FLOPs: the generator, one forward pass over one training slice (3D: one patch); train min = minutes "
        "of training steps (validation excluded).",
        "",
        build_table(records),
    ]
    unified = next((r for r in records if r["entry"].name == "demo_unified"), None)
    if unified:
        parts += ["", "## Unified model: every direction", "", directions_table(unified), "",
                  "![all four targets](unified_targets.png)"]  # fmt: skip
    if any(r["entry"].name == "demo_unet3d" for r in records):
        parts += ["", "## 3D sliding-window synthesis across window faces", "", "![seams](seam_3d.png)"]
    parts += [
        "",
        "Command:",
        "",
        "```bash",
        "python benchmarks/compare_modes.py " + " ".join(sys.argv[1:]),
        "```",
        "",
    ]
    return "\n".join(parts)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, required=True, help="demo cohort folder")
    parser.add_argument("--minutes", type=float, default=8.0, help="training minutes per run (default 8)")
    parser.add_argument("--runs", type=Path, default=Path("demo/compare"), help="runs folder")
    parser.add_argument(
        "--threads", type=int, default=2, help="torch threads per run (1: two runs side by side)"
    )
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument(
        "--only", help="comma list of entries (default all): " + ",".join(e.name for e in ENTRIES)
    )
    parser.add_argument(
        "--docs", type=Path, default=None,
        help="where the report and figures go (default: the runs folder; `--docs docs` updates the repository's)",
    )  # fmt: skip
    parser.add_argument("--report-only", action="store_true", help="no training: table from finished runs")
    args = parser.parse_args(argv)
    if args.minutes <= 0 or args.threads < 1:
        parser.error("--minutes must be > 0 and --threads >= 1")
    known = {e.name for e in ENTRIES}
    chosen = set(args.only.split(",")) if args.only else known
    if chosen - known:
        parser.error(f"unknown --only entries {sorted(chosen - known)}; valid: {', '.join(sorted(known))}")
    args.entries = tuple(e for e in ENTRIES if e.name in chosen)
    # Not the repository's docs by default: a partial `--only` run would overwrite the full report there.
    args.docs = args.docs if args.docs is not None else args.runs
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    header = machine.describe(args.device)
    print(header, flush=True)
    if not args.report_only:
        for entry in args.entries:
            run_entry(entry, args)
    records = collect(ENTRIES, args.runs)  # every evaluated run, also those of a side-by-side invocation
    if not records:
        print("no evaluated runs yet", file=sys.stderr)
        return 1
    names = {r["entry"].name for r in records}
    if "demo_unified" in names:
        unified_figure(args.runs / "demo_unified", args.docs / "unified_targets.png")
    if "demo_unet3d" in names:
        seam_figure(args.runs / "demo_unet3d", args.docs / "seam_3d.png")
    text = report(records, args, header)
    args.docs.mkdir(parents=True, exist_ok=True)
    (args.docs / "mode_comparison.md").write_text(text, encoding="utf-8")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
