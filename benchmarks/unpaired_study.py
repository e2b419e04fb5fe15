"""Paired GAN (pix2pix) vs CycleGAN at equal minutes, on aligned, misregistered and disjoint training data.

The question unpaired training answers: what if the training pairs are not aligned (MR and CT scanned
on different days, imperfect registration), or not pairs at all (MRs of some patients, CTs of others)?
Three training cohorts built from one demo cohort (same subjects, same seed):

* ``aligned``: the demo cohort as it is (voxel-aligned pairs);
* ``misregistered_<mm>mm``: every non-T1w image of every subject rigidly moved against its T1w
  (``medsynth data demo --misregister MM,DEG``: 0.5-1 x MM millimetres, 0.5-1 x DEG degrees, per subject);
* ``disjoint``: the training subjects split in two, one half keeping only the source, the other only the
  target, so no training subject has a pair (held-out subjects keep both).

Every run holds out the same subjects (one ``splits.json``: the demo recipes' 2 validation + 2 test) and
is scored on the **aligned** test subjects (``medsynth evaluate --run RUN --data ALIGNED``): what a
user wants is the right image of the patient in front of the model, not agreement with a misaligned
target. The paired GAN cannot train on the disjoint cohort (no training pair): its cell says so.

Besides intensity scores it measures whether anatomy was added or removed, the known failure of
unpaired methods, on every test subject: the Dice of the head outline of the synthetic image against the
real target's, and the correlation of their gradient magnitudes inside the head (edges where the real
image has none, or none where it has them, lower it); for a CT target also the bone Dice and range error
``medsynth evaluate`` reports.

With ``--methods`` it also answers misregistration the other two ways (issue 32): ``gan_registered``
trains the paired GAN on a copy of each misregistered cohort made by ``medsynth data register`` (rigid,
mutual information; built once per task, beside the cohort) with the task's **target as the reference**:
the source is moved onto the target and the target keeps its own voxels, because a resampled target
teaches the network the interpolation's blur (T1w -> T2w at 2-4 mm: 24.36 dB with the T2w moved onto the
T1w, 25.58 dB the other way round, 10 minutes each); ``reggan`` trains the registration-aware objective
on the cohort as it is (the task's RegGAN recipe, ``demo_reggan`` / ``demo_ct_reggan``: its paired
recipe plus ``train.objective: reggan``), and ``reggan_registered`` both together.
``cyclegan_template`` trains CycleGAN on a copy of the first misregistered cohort in which every image,
each on its own, was moved onto the MNI152 template (``medsynth data register --template mni152``): a
common pose for both domains without using a pair (issue 34).

Runs are resumable (finished ones skipped, interrupted ones resumed); ``--parallel 2`` trains two runs at
a time with one thread each (the next starts when one ends), so every run shares the machine alike.

    python benchmarks/unpaired_study.py --work /tmp/study --minutes 10 --parallel 2
    python benchmarks/unpaired_study.py --work /tmp/study --minutes 10 --misregister 2,2 --misregister 8,8
    python benchmarks/unpaired_study.py --work /tmp/study --minutes 10 --report-only --docs docs
    python benchmarks/unpaired_study.py --work /tmp/reg --minutes 8 --methods gan,gan_registered,reggan \
        --misregister 4,4 --misregister 12,12

It writes ``unpaired_study.md`` (tables, commands, machine) and ``unpaired_<task>.png`` (one test
subject: input, real target, every run's synthetic image and its error) into ``--work`` and, with
``--docs``, into that folder.
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import machine
import numpy as np
from compare_modes import medsynth, run_state  # the same run bookkeeping as the modes comparison

from medsynth.model.checkpoint import load_checkpoint

#: Huge epoch counts (constant half, decay half) so the time budget ends every run at the same minutes.
OPEN_EPOCHS = ["train.epochs=100000", "train.decay_epochs=100000"]
#: task -> (paired recipe, unpaired recipe); both share the context and the split sizes (the unpaired recipes
#: use the CycleGAN paper's ResNet generator: docs/cyclegan_experiments.md).
#: Per task: the paired GAN's, CycleGAN's and the registration-aware objective's recipes.
RECIPES = {
    "t1->t2": ("demo_cpu", "demo_cyclegan", "demo_reggan"),
    "t1->ct": ("demo_ct", "demo_ct_cyclegan", "demo_ct_reggan"),
}
NAMES = {"t1": "T1w", "t2": "T2w", "ct": "CT"}
METHODS = (
    "gan",
    "gan_registered",
    "reggan",
    "reggan_registered",
    "cyclegan",
    "cyclegan_template",
    "cyclegan_long",
)
METHOD_NAMES = {
    "gan": "paired GAN (pix2pix)",
    "gan_registered": "paired GAN after `data register`",
    "reggan": "registration-aware GAN (reggan)",
    "reggan_registered": "reggan after `data register`",
    "cyclegan": "CycleGAN (unpaired)",
    "cyclegan_template": "CycleGAN after `data register --template mni152`",
    "cyclegan_long": "CycleGAN, longer (`--long-factor`)",
}
#: What the study trains without ``--methods`` (the unpaired study as first measured).
DEFAULT_METHODS = ("gan", "cyclegan", "cyclegan_long")
#: Suffix of a cohort's registered copy (``medsynth data register``), and of the methods that train on it.
REGISTERED = "_registered"
#: The same for its copy in template space (``medsynth data register --template mni152``).
TEMPLATE = "_template"


@dataclass(frozen=True)
class Run:
    task: str
    cohort: str
    method: str

    @property
    def name(self) -> str:
        return f"{self.task.replace('->', '_to_')}_{self.cohort}_{self.method}"

    @property
    def source(self) -> str:
        return self.task.split("->")[0]

    @property
    def target(self) -> str:
        return self.task.split("->")[1]


# ----------------------------------------------------------------------------------------- cohorts
def misregistered_name(value: str) -> str:
    mm, deg = (float(v) for v in value.split(","))
    return f"misregistered_{mm:g}mm_{deg:g}deg"


def registered_name(cohort: str, task: str) -> str:
    """The name of ``cohort``'s copy registered for ``task``: its source moved onto its target."""
    return f"{cohort}{REGISTERED}_to_{task.split('->')[1]}"


def template_name(cohort: str, task: str) -> str:
    """The name of ``cohort``'s copy with the task's source and target moved onto the MNI152 template."""
    return f"{cohort}{TEMPLATE}_{task.replace('->', '_')}"


def training_cohort(run: Run) -> str:
    """The cohort, or the copy of it, that ``run`` trains on."""
    if run.method.endswith(REGISTERED):
        return registered_name(run.cohort, run.task)
    if run.method.endswith(TEMPLATE):
        return template_name(run.cohort, run.task)
    return run.cohort


def build_cohorts(
    work: Path,
    subjects: int,
    misregister: list[str],
    registered_tasks: Sequence[str] = (),
    template_tasks: Sequence[str] = (),
) -> dict[str, Path]:
    """The aligned cohort, one misregistered cohort per ``--misregister`` (and, per task of
    ``registered_tasks``, its copy registered by ``medsynth data register`` onto the task's target; per task
    of ``template_tasks``, its copy on the MNI152 template), and the disjoint cohort."""
    from medsynth.data.demo import make_demo_cohort
    from medsynth.data.splits import make_splits

    cohorts = {"aligned": work / "aligned"}
    if not (cohorts["aligned"] / "participants.tsv").is_file():
        make_demo_cohort(cohorts["aligned"], n_subjects=subjects, spacing_mm=2.0, seed=0)
    for value in misregister:
        folder = work / misregistered_name(value)
        mm, deg = (float(v) for v in value.split(","))
        if not (folder / "participants.tsv").is_file():
            make_demo_cohort(folder, n_subjects=subjects, spacing_mm=2.0, seed=0, misregister=(mm, deg))
        cohorts[misregistered_name(value)] = folder
        for task in registered_tasks:
            source, target = task.split("->")
            name = registered_name(misregistered_name(value), task)
            copy = work / name
            if not (copy / "participants.tsv").is_file():
                register = medsynth("data", "register", str(folder), "--out", str(copy), "--reference", target,
                                    "--modalities", f"{source},{target}", "--quiet")  # fmt: skip
                subprocess.run(register, check=True)
            cohorts[name] = copy
        for task in template_tasks:
            name = template_name(misregistered_name(value), task)
            copy = work / name
            if not (copy / "participants.tsv").is_file():
                register = medsynth("data", "register", str(folder), "--out", str(copy), "--template", "mni152",
                                    "--modalities", task.replace("->", ","), "--quiet")  # fmt: skip
                subprocess.run(register, check=True)
            cohorts[name] = copy
    ids = sorted(p.name for p in cohorts["aligned"].glob("sub-*"))
    splits_path = work / "splits.json"
    if not splits_path.is_file():
        splits_path.write_text(json.dumps(make_splits(ids, val=2, test=2, seed=0), indent=1) + "\n")
    splits = json.loads(splits_path.read_text())
    cohorts["disjoint"] = disjoint_cohort(cohorts["aligned"], work / "disjoint", splits)
    return cohorts


def disjoint_cohort(aligned: Path, folder: Path, splits: dict[str, list[str]]) -> Path:
    """Links to the aligned files: held-out subjects whole; training subjects alternately without their
    T1w or without every other image, so no training subject has a source and a target."""
    for number, subject in enumerate(sorted(splits["train"]) + splits["val"] + splits["test"]):
        anat = folder / subject / "anat"
        anat.mkdir(parents=True, exist_ok=True)
        for path in sorted((aligned / subject / "anat").iterdir()):
            held_out = subject not in splits["train"]
            is_t1 = "_T1w." in path.name
            keep = held_out or (is_t1 if number % 2 == 0 else not is_t1)
            link = anat / path.name
            if keep and not link.exists():
                link.symlink_to(path.resolve())
    for name in ("dataset_description.json", "participants.tsv"):
        if not (folder / name).exists():
            (folder / name).symlink_to((aligned / name).resolve())
    return folder


# ----------------------------------------------------------------------------------------- running
def train_and_evaluate(run: Run, cohorts: dict[str, Path], args: argparse.Namespace) -> None:
    run_dir = args.work / "runs" / run.name
    state = run_state(run_dir)
    if state != "finished":
        recipe, recipe_sets = method_recipe(run.task, run.method)
        data = cohorts[training_cohort(run)]
        if state == "partial" and (run_dir / "checkpoint_latest.pt").is_file():
            command = medsynth("train", "--resume", str(run_dir), "--quiet")
        else:
            command = medsynth("train", "--data", str(data), "--config", recipe, "--runs-dir",
                               str(args.work / "runs"), "--name", run.name, "--quiet")  # fmt: skip
            for item in [*OPEN_EPOCHS, *recipe_sets, f"train.max_minutes={minutes(args, run.task, run.method):g}", f"train.num_threads={args.threads}",
                         f"data.splits_file={args.work / 'splits.json'}"]:  # fmt: skip
                command += ["--set", item]
        print(f"{run.name}: training {minutes(args, run.task, run.method):g} min", flush=True)
        started = time.perf_counter()
        with open(args.work / f"{run.name}.log", "a", encoding="utf-8") as log:
            subprocess.run(command, check=True, stdout=log, stderr=subprocess.STDOUT)
        (run_dir / "study.json").write_text(json.dumps({"wall_minutes": (time.perf_counter() - started) / 60,
                                                        "threads": args.threads}))  # fmt: skip
    evaluate_run(run, cohorts, args)


def method_recipe(task: str, method: str) -> tuple[str, list[str]]:
    """The recipe a method trains with, and its overrides (none: each method has its task's recipe; the
    RegGAN recipes are their paired GAN's plus the objective, so the two compare at equal minutes)."""
    paired, unpaired, registration_aware = RECIPES[task]
    if method.startswith("cyclegan"):
        return unpaired, []
    return (registration_aware if method.startswith("reggan") else paired), []


def minutes(args: argparse.Namespace, task: str, method: str = "gan") -> float:
    """Training minutes of a run of ``task`` (``--minutes``, or its ``--task-minutes`` entry); the longer
    CycleGAN run trains ``--long-factor`` times as long."""
    base = float(args.task_minutes.get(task, args.minutes))
    return base * args.long_factor if method == "cyclegan_long" else base


def evaluate_run(run: Run, cohorts: dict[str, Path], args: argparse.Namespace) -> None:
    """``medsynth evaluate`` on the aligned test subjects, unless its table is newer than the best checkpoint."""
    run_dir = args.work / "runs" / run.name
    table, best = run_dir / "eval" / "metrics.csv", run_dir / "checkpoint_best.pt"
    if not best.is_file():
        return
    if not table.is_file() or table.stat().st_mtime < best.stat().st_mtime:
        command = medsynth("evaluate", "--run", str(run_dir), "--data", str(cohorts["aligned"]), "--quiet")
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL)


def planned_runs(args: argparse.Namespace, cohorts: dict[str, Path]) -> list[Run]:
    """Every (task, cohort, method) the study trains.

    The paired GAN has no pair to train on when disjoint. CycleGAN draws sources and targets
    independently, so it never pairs a subject's source with its target; but a target moved against its
    source is also a target in another pose, and the slices CycleGAN learns the target's look from cut the
    head at other angles (measured: 18.8 dB aligned, 14.0 dB at 6-12 mm / 6-12 degrees). It trains on the
    first misregistered cohort of the ``--sweep-tasks`` (default: the first task), and on no other; a sweep
    of misregistration sizes (``--misregister`` repeated) trains the paired GAN on each.
    """
    first = misregistered_name(args.misregister[0])

    def planned(task: str, cohort: str, method: str) -> bool:
        if method not in args.methods or REGISTERED in cohort or TEMPLATE in cohort:
            return False
        swept = task in args.sweep_tasks and method in args.sweep_methods
        if method.endswith(REGISTERED):  # a registered copy of a misregistered cohort
            return cohort.startswith("misregistered") and (cohort == first or swept)
        if method == "cyclegan_long":  # how far more minutes take it, on the first task's aligned data
            return bool(args.long_factor) and cohort == "aligned" and task == args.tasks[0]
        if cohort == "disjoint":
            return method == "cyclegan"
        if method == "cyclegan_template" and not cohort.startswith("misregistered"):
            return False
        if not cohort.startswith("misregistered"):
            return True
        if method in ("cyclegan", "cyclegan_template"):
            return cohort == first and task in args.sweep_tasks
        return cohort == first or swept

    return [
        Run(task, cohort, method)
        for task in args.tasks
        for cohort in cohorts
        for method in METHODS
        if planned(task, cohort, method)
    ]


def run_all(runs: list[Run], cohorts: dict[str, Path], args: argparse.Namespace) -> None:
    """``--parallel`` runs at a time, one thread each, longest first: a run that ends hands its core to the
    next, so the machine always trains two runs side by side and each shares it alike.

    Finished runs are left out; interrupted ones resume with their own clock."""
    todo = [r for r in runs if run_state(args.work / "runs" / r.name) != "finished"]
    todo.sort(key=lambda run: -minutes(args, run.task, run.method))
    with ThreadPoolExecutor(max_workers=args.parallel) as pool:
        list(pool.map(lambda run: train_and_evaluate(run, cohorts, args), todo))
    for run in runs:  # runs finished earlier whose evaluation is missing or older than their best checkpoint
        evaluate_run(run, cohorts, args)


# --------------------------------------------------------------------------------------- measuring
def subject_scores(run_dir: Path, target: str) -> dict[str, dict[str, float]]:
    """Per test subject, the model's row of ``medsynth evaluate`` (normalised space; HU columns for CT)."""
    with open(run_dir / "eval" / "metrics.csv", newline="", encoding="utf-8") as stream:
        rows = [r for r in csv.DictReader(stream) if r["method"] == "model" and r["target"] == target]
    return {r["subject"]: {k: float(v) for k, v in r.items() if _is_number(v)} for r in rows}


def _is_number(value: str) -> bool:
    try:
        float(value)
    except (TypeError, ValueError):
        return False
    return True


def structure_agreement(
    run_dir: Path, aligned: Path, run: Run
) -> Iterator[tuple[str, dict[str, float], Any]]:
    """Per test subject: head-outline Dice and gradient-magnitude correlation of synthetic vs real target.

    Both read the images only where an anatomy change would show: the outline (a head grown, shrunk or
    cut) and the edges inside it (structures added or removed move the gradient magnitude away from the
    real image's). Also yields the mid-slice images for the figure.
    """
    from medsynth.data.layouts import load_subject, scan_dataset
    from medsynth.data.masks import foreground_mask
    from medsynth.io.volume import to_canonical
    from medsynth.model.synthesis import SynthesisModel

    model = SynthesisModel.from_checkpoint(run_dir, precision="fp32")
    records = {r.id: r for r in scan_dataset(aligned)}
    for subject in model.checkpoint_splits["test"]:
        volumes = load_subject(records[subject], [run.source, run.target])
        prediction = model.predict({run.source: volumes[run.source]}, run.target)
        truth = to_canonical(volumes[run.target])[0].array
        source = to_canonical(volumes[run.source])[0].array
        synthetic = model.fingerprint.output_normalizer(run.target).inverse(prediction.normalised)
        real_normalised = model.normalise({run.target: truth})[run.target]
        outline = (lambda a: a > -500.0) if run.target == "ct" else (lambda a: foreground_mask([a]))
        head_real, head_synthetic = outline(truth), outline(synthetic)
        dice = 2.0 * np.sum(head_real & head_synthetic) / max(np.sum(head_real) + np.sum(head_synthetic), 1)
        inside = head_real | head_synthetic
        edges = [
            np.linalg.norm(np.gradient(a), axis=0)[inside] for a in (prediction.normalised, real_normalised)
        ]
        correlation = float(np.corrcoef(edges[0], edges[1])[0, 1])
        middle = truth.shape[2] // 2
        images = {"input": source[:, :, middle], "target": real_normalised[:, :, middle],
                  "synthetic": prediction.normalised[:, :, middle]}  # fmt: skip
        yield subject, {"outline_dice": float(dice), "edge_correlation": correlation}, images


def collect(runs: list[Run], cohorts: dict[str, Path], work: Path) -> dict[Run, dict[str, Any]]:
    """Per evaluated run: per-subject scores merged with the structure measures, and the figure slices."""
    results = {}
    for run in runs:
        run_dir = work / "runs" / run.name
        if not (run_dir / "eval" / "metrics.csv").is_file():
            continue
        scores = subject_scores(run_dir, run.target)
        images = {}
        for subject, measures, slices in structure_agreement(run_dir, cohorts["aligned"], run):
            scores.setdefault(subject, {}).update(measures)
            images[subject] = slices
        with open(run_dir / "metrics.csv", newline="", encoding="utf-8") as stream:
            rows = list(csv.DictReader(stream))
        record = (
            json.loads((run_dir / "study.json").read_text()) if (run_dir / "study.json").is_file() else {}
        )
        results[run] = {
            "scores": scores,
            "images": images,
            "epochs": _epochs(rows),
            "best_epoch": load_checkpoint(run_dir / "checkpoint_best.pt").get("epoch"),
            "threads": record.get("threads"),
        }
    return results


def _epochs(rows: list[dict[str, str]]) -> str:
    whole = sum(1 for r in rows if not r.get("partial"))
    return f"{whole}" + (" + partial" if rows and rows[-1].get("partial") else "")


# ---------------------------------------------------------------------------------------- reporting
#: (column of the per-subject scores, header, format) of each task's table.
COLUMNS = {
    "t1->t2": (("psnr_masked", "PSNR dB", "{:.2f}"), ("ssim3d_masked", "SSIM", "{:.3f}"),
               ("mae_masked", "MAE", "{:.4f}"), ("outline_dice", "outline Dice", "{:.3f}"),
               ("edge_correlation", "edge r", "{:.3f}")),
    "t1->ct": (("mae_hu", "MAE HU", "{:.1f}"), ("me_hu", "ME HU", "{:+.1f}"), ("bone_dice", "bone Dice", "{:.3f}"),
               ("range_error_mean_mm", "range err mm", "{:.2f}"), ("outline_dice", "outline Dice", "{:.3f}"),
               ("edge_correlation", "edge r", "{:.3f}")),
}  # fmt: skip


def _cell(values: list[float], fmt: str) -> str:
    if not values:
        return "-"
    mean, std = float(np.mean(values)), float(np.std(values))
    return f"{fmt.format(mean)} ± {fmt.format(std).lstrip('+')}"


def task_table(task: str, results: dict[Run, dict[str, Any]], cohorts: list[str]) -> str:
    """One row per (cohort, method): the test subjects' mean ± std of each column, and the epochs trained."""
    columns = COLUMNS[task]
    lines = [
        "| training data | method | epochs | scored epoch | " + " | ".join(c[1] for c in columns) + " |",
        "|---|---|---|---|" + "---|" * len(columns),
    ]
    for cohort in cohorts:
        for method in METHODS:
            run = Run(task, cohort, method)
            label = cohort.replace("_", " ")
            if method == "gan" and cohort == "disjoint":
                lines.append(f"| {label} | {METHOD_NAMES[method]} | - | - | cannot train: no training subject has a pair |"
                             + " |" * (len(columns) - 1))  # fmt: skip
                continue
            if run not in results:
                continue
            scores = results[run]["scores"].values()
            cells = [_cell([s[c] for s in scores if c in s], fmt) for c, _, fmt in columns]
            lines.append(
                f"| {label} | {METHOD_NAMES[method]} | {results[run]['epochs']} | {results[run]['best_epoch']} | "
                + " | ".join(cells)
                + " |"
            )
    return "\n".join(lines)


def figure(task: str, results: dict[Run, dict[str, Any]], cohorts: list[str], path: Path) -> Path | None:
    """One test subject's mid axial slice: input, real target, then each run's synthetic image over its error."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [r for c in cohorts for r in (Run(task, c, m) for m in METHODS) if r in results]
    if not runs:
        return None
    subject = sorted(results[runs[0]]["images"])[0]
    first = results[runs[0]]["images"][subject]
    columns = 2 + len(runs)
    fig, axes = plt.subplots(2, columns, figsize=(2.1 * columns, 4.6))

    def show(ax: Any, image: np.ndarray, cmap: str = "gray", **window: float) -> None:
        ax.imshow(np.rot90(image), cmap=cmap, **window)
        ax.axis("off")

    source = first["input"]
    show(axes[0, 0], source, vmin=np.percentile(source, 1), vmax=np.percentile(source, 99.5))
    axes[0, 0].set_title(f"{NAMES[task.split('->')[0]]} input", fontsize=8)
    show(axes[0, 1], first["target"], vmin=-1, vmax=1)
    axes[0, 1].set_title(f"real {NAMES[task.split('->')[1]]}", fontsize=8)
    for ax in axes[1, :2]:
        ax.axis("off")
    for column, run in enumerate(runs, start=2):
        images = results[run]["images"][subject]
        show(axes[0, column], images["synthetic"], vmin=-1, vmax=1)
        label = run.cohort.replace("misregistered_", "misreg. ").replace("_", " ")
        axes[0, column].set_title(f"{label}\n{run.method}", fontsize=8)
        show(axes[1, column], np.abs(images["synthetic"] - images["target"]), vmin=0, vmax=0.5, cmap="magma")
    axes[1, 2].set_title("|synthetic - real| (0-0.5)", fontsize=7, loc="left")
    fig.suptitle(f"{task}: test subject {subject}, equal minutes per run", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


#: Per task, the validation column drawn against minutes (the one its recipes select the best checkpoint on).
CURVE_COLUMNS = {
    "t1->t2": ("val_psnr", "validation PSNR dB"),
    "t1->ct": ("val_mae", "validation MAE (normalised)"),
}


def curve(task: str, work: Path, runs: list[Run], path: Path) -> Path | None:
    """Quality against training minutes: each run's validation score at every epoch it validated."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    column, label = CURVE_COLUMNS[task]
    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    drawn = 0
    for run in (r for r in runs if r.task == task):
        table = work / "runs" / run.name / "metrics.csv"
        if not table.is_file():
            continue
        with open(table, newline="", encoding="utf-8") as stream:
            rows = list(csv.DictReader(stream))
        minutes_done = np.cumsum([float(r["seconds"] or 0) for r in rows]) / 60
        points = [
            (m, float(r[column])) for m, r in zip(minutes_done, rows, strict=True) if _is_number(r[column])
        ]
        if points:
            xs, ys = np.array(points).T
            ax.plot(xs, ys, marker=".", label=f"{run.cohort.replace('_', ' ')}: {run.method}")
            drawn += 1
    if not drawn:
        plt.close(fig)
        return None
    ax.set_xlabel("training minutes")
    ax.set_ylabel(label)
    ax.set_title(f"{task}: validation during training", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def report(args: argparse.Namespace, cohorts: dict[str, Path], results: dict[Run, dict[str, Any]]) -> str:
    names = list(cohorts)
    parts = [
        "# Paired GAN, registration and CycleGAN on aligned, misregistered and disjoint training data",
        "",
        f"{machine.describe('cpu')}.",
        "Every run of a task trains for the same minutes (`train.max_minutes`: "
        + ", ".join(f"{t} {minutes(args, t):g} min" for t in args.tasks)
        + f"), {args.threads} thread(s) each, "
        f"{args.parallel} run(s) at a time; scored on the aligned test subjects.",
        "",
        "Command: `python benchmarks/unpaired_study.py --work "
        + str(args.work)
        + f" --minutes {args.minutes:g} "
        + (
            f"--task-minutes {','.join(f'{k}={v:g}' for k, v in args.task_minutes.items())} "
            if args.task_minutes
            else ""
        )
        + f"--parallel {args.parallel} "
        + " ".join(f"--misregister {m}" for m in args.misregister)
        + (f" --long-factor {args.long_factor:g}" if args.long_factor else "")
        + (f" --methods {','.join(args.methods)}" if args.methods != list(DEFAULT_METHODS) else "")
        + (f" --sweep-methods {','.join(args.sweep_methods)}" if args.sweep_methods != args.methods else "")
        + "`",
    ]
    for task in args.tasks:
        parts += ["", f"## {NAMES[task.split('->')[0]]} -> {NAMES[task.split('->')[1]]}", "",
                  task_table(task, results, names)]  # fmt: skip
    return "\n".join(parts) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", type=Path, required=True, help="cohorts, runs, logs and the report")
    parser.add_argument("--tasks", default="t1->t2,t1->ct", help="comma list of t1->t2, t1->ct")
    parser.add_argument("--minutes", type=float, default=10.0, help="training minutes of every run")
    parser.add_argument("--task-minutes", default="", metavar="TASK=MIN,...",
                        help="other minutes for a task's runs, e.g. t1->ct=10 (equal within each task)")  # fmt: skip
    parser.add_argument("--misregister", action="append", default=None, metavar="MM,DEG",
                        help="a misregistered cohort (repeat for a sweep); default 4,4")  # fmt: skip
    parser.add_argument(
        "--sweep-tasks", default=None, help="tasks whose paired GAN trains on every misregistered cohort"
    )
    parser.add_argument("--sweep-methods", default=None,
                        help="methods trained on the misregistered cohorts after the first (default: all)")  # fmt: skip
    parser.add_argument("--long-factor", type=float, default=0.0,
                        help="also train CycleGAN on the first task's aligned data for this many times the minutes")  # fmt: skip
    parser.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                        help=f"comma list of {', '.join(METHODS)}")  # fmt: skip
    parser.add_argument("--subjects", type=int, default=12)
    parser.add_argument("--parallel", type=int, default=2, choices=(1, 2))
    parser.add_argument("--report-only", action="store_true")
    parser.add_argument("--docs", type=Path, help="also write the report and figures here")
    args = parser.parse_args()
    args.tasks = [t.strip() for t in args.tasks.split(",")]
    args.task_minutes = {
        k.strip(): float(v) for k, _, v in (i.partition("=") for i in args.task_minutes.split(",") if i)
    }
    args.misregister = args.misregister or ["4,4"]
    args.methods = [m.strip() for m in args.methods.split(",")]
    args.sweep_methods = args.sweep_methods.split(",") if args.sweep_methods else args.methods
    unknown = sorted(set(args.methods) - set(METHODS))
    if unknown:
        parser.error(f"unknown --methods {', '.join(unknown)}; choose from {', '.join(METHODS)}")
    args.sweep_tasks = args.sweep_tasks.split(",") if args.sweep_tasks else args.tasks[:1]
    args.threads = 1 if args.parallel > 1 else 2
    args.work.mkdir(parents=True, exist_ok=True)
    print(machine.describe("cpu"), flush=True)
    registered = args.tasks if any(m.endswith(REGISTERED) for m in args.methods) else []
    template = args.sweep_tasks if "cyclegan_template" in args.methods else []  # where it is planned
    cohorts = build_cohorts(
        args.work, args.subjects, args.misregister, registered_tasks=registered, template_tasks=template
    )
    runs = planned_runs(args, cohorts)
    if not args.report_only:
        run_all(runs, cohorts, args)
    results = collect(runs, cohorts, args.work)
    text = report(args, cohorts, results)
    targets = [args.work] + ([args.docs] if args.docs else [])
    for folder in targets:
        (folder / "unpaired_study.md").write_text(text, encoding="utf-8")
        for task in args.tasks:
            figure(task, results, list(cohorts), folder / f"unpaired_{task.replace('->', '_to_')}.png")
            curve(task, args.work, runs, folder / f"unpaired_{task.replace('->', '_to_')}_curve.png")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
