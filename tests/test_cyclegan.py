"""Unpaired training: the CycleGAN objective, unpaired batches, both directions through every command.

The cohort of most tests is the tiny demo cohort with its subjects split the way unpaired data comes:
two subjects with T1w and T2w (the held-out ones), two with T1w only, one with T2w only.
"""

from __future__ import annotations

import csv
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_OVERRIDES, tiny_config, torchrun_two_processes, train_until_sigterm

from medsynth.cli import main
from medsynth.config import load_config
from medsynth.convert import run_convert
from medsynth.data.cache import prepare_cohort
from medsynth.data.fingerprint import Fingerprint, NormalizationSpec
from medsynth.data.layouts import load_subject, scan_dataset
from medsynth.data.pairing import UnpairedSamples, unpaired_slices
from medsynth.engine.objectives import build_objective
from medsynth.engine.objectives.cyclegan import CriticView
from medsynth.engine.run import claim_run_dir, train
from medsynth.errors import ConfigError, MedsynthError
from medsynth.io.dicom import write_dicom_series
from medsynth.io.readers import read_volume
from medsynth.model.checkpoint import load_checkpoint
from medsynth.model.plan import NetworkSpec, SynthesisPlan
from medsynth.model.synthesis import SynthesisModel
from medsynth.nets.registry import build_generator
from medsynth.task import Task

CYCLE = ["train.objective=cyclegan", "data.pairing=unpaired"]
#: Which images each subject of the tiny cohort keeps (its splits.json puts the complete ones aside).
KEEP = {
    "sub-01": ("T1w", "T2w"),
    "sub-02": ("T1w", "T2w"),
    "sub-03": ("T1w",),
    "sub-04": ("T1w",),
    "sub-05": ("T2w",),
}
SPLITS = {"train": ["sub-03", "sub-04", "sub-05"], "val": ["sub-01"], "test": ["sub-02"]}


def _one_sided(tiny_cohort: Path, root: Path, keep: dict[str, tuple[str, ...]] = KEEP) -> Path:
    for subject, suffixes in keep.items():
        anat = root / subject / "anat"
        anat.mkdir(parents=True)
        for suffix in suffixes:
            for ending in (".nii.gz", ".json"):
                name = f"{subject}_{suffix}{ending}"
                shutil.copy(tiny_cohort / subject / "anat" / name, anat / name)
    return root


@pytest.fixture(scope="session")
def unpaired_cohort(tiny_cohort: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _one_sided(tiny_cohort, tmp_path_factory.mktemp("unpaired") / "data")


@pytest.fixture(scope="session")
def cyclegan_run(unpaired_cohort: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("cycleruns") / "cyc"
    config = tiny_config(unpaired_cohort, extra=[*CYCLE, "train.steps_per_epoch=3", "train.masked_l1=true"])
    claim_run_dir(run, config)
    train(config, run, quiet=True)
    return run


def _rows(run: Path) -> list[dict[str, str]]:
    with open(run / "metrics.csv", newline="") as stream:
        return list(csv.DictReader(stream))


# ------------------------------------------------------------------------------------- data
def test_held_out_subjects_are_the_complete_ones_and_one_sided_subjects_train(cyclegan_run: Path) -> None:
    splits = json.loads((cyclegan_run / "splits.json").read_text())
    assert set(splits["val"] + splits["test"]) == {"sub-01", "sub-02"}
    assert set(splits["train"]) == {"sub-03", "sub-04", "sub-05"}
    rows = _rows(cyclegan_run)
    assert {"loss_critic", "loss_adv", "loss_cycle", "loss_identity"} <= set(rows[0])
    assert all(np.isfinite(float(r["loss_cycle"])) and float(r["val_psnr"]) > 0 for r in rows)


def _samples(cohort: Path, cache: Path, context: int = 1) -> UnpairedSamples:
    records = scan_dataset(cohort)
    specs = {m: NormalizationSpec() for m in ("t1", "t2")}
    fingerprint = Fingerprint.compute(
        ((r.id, load_subject(r, [m for m in ("t1", "t2") if m in r.paths])) for r in records),
        specs,
        partial=True,
    )
    prepared = prepare_cohort(records, ("t1", "t2"), fingerprint, cache, progress=False, partial=True)
    return unpaired_slices(prepared, [r.id for r in records], "t1", "t2", context=context, seed=5)


def test_unpaired_batches_draw_targets_independently_and_reproducibly(
    unpaired_cohort: Path, tmp_path: Path
) -> None:
    samples = _samples(unpaired_cohort, tmp_path / "cache", context=3)
    # Every subject with the source gives source slices, every subject with the target target slices.
    assert set(samples.sources.subject_ids) == {"sub-01", "sub-02", "sub-03", "sub-04"}
    assert set(samples.targets.subject_ids) == {"sub-01", "sub-02", "sub-05"}
    samples.set_epoch(2)
    whole = samples.__getitems__(list(range(12)))
    halves = [samples.__getitems__(list(range(6))), samples.__getitems__(list(range(6, 12)))]
    for key in ("source", "target", "target_stack", "target_mask"):  # a sample's draw ignores its batch
        assert torch.equal(whole[key], torch.cat([h[key] for h in halves])), key
    assert whole["source"].shape[1] == 3 and whole["target_stack"].shape[1] == 3
    assert torch.equal(whole["target"], whole["target_stack"][:, 1:2])  # the centre of the stack
    pairs = set(zip(whole["subject"], whole["target_subject"], strict=True))
    assert any(a != b for a, b in pairs)  # source and target of a sample come from other subjects
    samples.set_epoch(3)
    assert not torch.equal(samples.__getitems__(list(range(12)))["target"], whole["target"])
    # Batches gathered where the slices are resident (a GPU run; "cpu" takes the same torch path) are equal.
    samples.set_epoch(2)
    samples.to_device("cpu")
    resident = samples.__getitems__(list(range(12)))
    for key in ("source", "mask", "target", "target_stack", "target_mask"):
        assert torch.equal(resident[key], whole[key]), key


# --------------------------------------------------------------------------------- objective
def _context(config, channels: int, plan: SynthesisPlan) -> dict:
    generator = build_generator("unet", spatial_dims=2, in_channels=channels, out_channels=1,
                                **config.model.generator_args)  # fmt: skip
    optimizer = torch.optim.Adam(generator.parameters(), lr=1e-3)
    return {"config": config, "generator": generator, "in_channels": channels, "optimizer": optimizer,
            "device": torch.device("cpu"), "memory_format": torch.contiguous_format, "precision": "fp32",
            "plan": plan}  # fmt: skip


@pytest.mark.parametrize("context", [1, 3])
def test_a_step_trains_both_generators_and_both_critics(tiny_cohort: Path, context: int) -> None:
    config = tiny_config(
        tiny_cohort,
        extra=[*CYCLE, f"data.context={context}", "train.objective_args={pool_size: 2, critic_blur: 1.0}"],
    )
    plan = SynthesisPlan(
        task=Task(("t1",), "t2"), generator=NetworkSpec("unet", {}), context=context, window=(32, 32)
    )
    ctx = _context(config, context, plan)
    objective = build_objective("cyclegan", **ctx)
    networks = [ctx["generator"], *objective.modules]
    before = [[p.detach().clone() for p in n.parameters()] for n in networks]
    generator = torch.Generator().manual_seed(0)
    for _ in range(3):
        source = torch.rand((4, context, 32, 32), generator=generator) * 2 - 1
        stack = torch.rand((4, context, 32, 32), generator=generator) * 2 - 1
        losses = objective.step(source, stack[:, context // 2 : context // 2 + 1], None, stack, None)
    assert set(losses) == set(objective.loss_names) and all(torch.isfinite(v) for v in losses.values())
    assert (float(losses["loss_identity"]) > 0) == (context == 1)  # identity only where channels allow
    for network, old in zip(networks, before, strict=True):
        assert any(not torch.equal(a, b) for a, b in zip(old, network.parameters(), strict=True))
    assert len(objective.pool_target.images) == len(objective.pool_source.images) == 2  # pools hold 2
    ((reverse_plan, reverse),) = objective.directions()
    assert str(reverse_plan.task) == "t2->t1" and reverse_plan.context == 1 and reverse is objective.reverse


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_the_critics_view_keeps_the_background_and_takes_the_noise(spatial_dims: int) -> None:
    """critic_blur low-passes what a critic sees: a noisy field loses most of its noise, a background of
    -1 stays -1 to the border (no rim from the zero padding), gradients pass, and 0 shows images as they are."""
    shape = (2, 1, *([24] * spatial_dims))
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(0), requires_grad=True)
    blurred = CriticView(spatial_dims, 1.0)(noise)
    assert blurred.shape == noise.shape and float(blurred.detach().std()) < 0.45 * float(noise.detach().std())
    blurred.sum().backward()
    assert noise.grad is not None and float(noise.grad.abs().sum()) > 0
    background = -torch.ones(shape)
    torch.testing.assert_close(CriticView(spatial_dims, 1.0)(background), background)
    assert CriticView(spatial_dims, 0.0)(noise) is noise


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["train.objective_args={cycle_wieght: 5}"], "unknown train.objective_args key 'cycle_wieght'"),
        (["train.objective_args={pool_size: -1}"], "pool_size must be an integer >= 0"),
        (["train.objective_args={critic_blur: -1}"], "critic_blur must be a number >= 0"),
        (["model.predict_scale=true"], "predict_scale is not available"),
    ],
)
def test_bad_settings_are_one_line(
    tiny_cohort: Path, tmp_path: Path, extra: list[str], message: str, capsys
) -> None:
    args = [
        "train",
        "t1->t2",
        "--data",
        str(tiny_cohort),
        "--runs-dir",
        str(tmp_path),
        "--config",
        "demo_cpu",
    ]
    for item in [*TINY_OVERRIDES, *CYCLE, *extra]:
        args += ["--set", item]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err and "Traceback" not in err, err


def test_many_to_one_and_3d_unpaired_are_refused_in_one_line(
    tiny_cohort: Path, tmp_path: Path, capsys
) -> None:
    base = ["--data", str(tiny_cohort), "--runs-dir", str(tmp_path), "--config", "demo_cpu"]
    sets = [a for item in [*TINY_OVERRIDES, *CYCLE] for a in ("--set", item)]
    assert main(["train", "t1,pd->t2", *base, "--name", "m", *sets]) == 2
    assert "translates between two modalities" in capsys.readouterr().err
    assert main(["train", "t1->t2", *base, "--name", "d", *sets, "--set", "model.spatial_dims=3"]) == 2
    assert "data.pairing=unpaired draws 2D/2.5D slices" in capsys.readouterr().err


# -------------------------------------------------------------------------- both directions
def test_checkpoint_holds_both_directions_and_infer_picks_with_target(
    cyclegan_run: Path, unpaired_cohort: Path, tmp_path: Path
) -> None:
    state = load_checkpoint(cyclegan_run / "checkpoint_best.pt")
    assert state["objective"]["name"] == "cyclegan" and state["data"]["pairing"] == "unpaired"
    assert [d["plan"]["task"] for d in state["directions"]] == [
        {"sources": ["t2"], "target": "t1", "modalities": []}
    ]
    t2 = unpaired_cohort / "sub-02" / "anat" / "sub-02_T2w.nii.gz"
    t1 = unpaired_cohort / "sub-02" / "anat" / "sub-02_T1w.nii.gz"
    assert main(["infer", "--checkpoint", str(cyclegan_run), "--volume", str(t2), "--target", "t1",
                 "--out", str(tmp_path / "t1.nii.gz"), "--quiet"]) == 0  # fmt: skip
    assert main(["infer", "--checkpoint", str(cyclegan_run), "--volume", str(t1),
                 "--out", str(tmp_path / "t2.nii.gz"), "--quiet"]) == 0  # fmt: skip
    for name, given in (("t1", t2), ("t2", t1)):
        written, reference = read_volume(tmp_path / f"{name}.nii.gz"), read_volume(given)
        assert written.shape == reference.shape and np.allclose(written.affine, reference.affine)
        sidecar = json.loads((tmp_path / f"{name}.json").read_text())
        assert sidecar["checkpoint"]["directions"] == ["t1->t2", "t2->t1"]
        assert sidecar["checkpoint"]["trained_on"] == "unpaired data"
    assert json.loads((tmp_path / "t1.json").read_text())["checkpoint"]["task"] == "t2->t1"
    reverse = SynthesisModel.from_checkpoint(cyclegan_run, target="t1")
    assert str(reverse.task) == "t2->t1" and reverse.directions == ["t1->t2", "t2->t1"]


def test_asking_for_a_direction_the_checkpoint_lacks_is_one_line(cyclegan_run: Path, unpaired_cohort: Path,
                                                                  tmp_path: Path, capsys) -> None:  # fmt: skip
    t2 = unpaired_cohort / "sub-02" / "anat" / "sub-02_T2w.nii.gz"
    code = main(["infer", "--checkpoint", str(cyclegan_run), "--volume", str(t2), "--target", "flair",
                 "--out", str(tmp_path / "x.nii.gz")])  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert code == 2 and "synthesises t1->t2, t2->t1; none of them makes 'flair'" in err and "\n" not in err


def test_evaluate_scores_each_direction_into_its_own_folder(
    cyclegan_run: Path, tmp_path: Path, capsys
) -> None:
    run = tmp_path / "run"
    shutil.copytree(cyclegan_run, run)
    assert main(["evaluate", "--run", str(run), "--quiet"]) == 0
    assert main(["evaluate", "--run", str(run), "--target", "t1", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"model\s+t1 -> t2\s+1 ", out) and re.search(r"model\s+t2 -> t1\s+1 ", out)
    forward = json.loads((run / "eval" / "summary.json").read_text())
    reverse = json.loads((run / "eval_t2_to_t1" / "summary.json").read_text())
    assert forward != reverse
    card = (run / "model_card.md").read_text()
    assert "**Directions**: `t1->t2`, `t2->t1`" in card and "Trained on unpaired data" in card


def test_reverse_direction_exports_and_runs_like_the_checkpoint(cyclegan_run: Path, unpaired_cohort: Path,
                                                                 tmp_path: Path) -> None:  # fmt: skip
    onnx = tmp_path / "reverse.onnx"
    assert main(["export", "--checkpoint", str(cyclegan_run), "--target", "t1", "--format", "onnx",
                 "--out", str(onnx)]) == 0  # fmt: skip
    t2 = unpaired_cohort / "sub-02" / "anat" / "sub-02_T2w.nii.gz"
    for checkpoint, name in ((str(cyclegan_run), "ckpt"), (str(onnx), "onnx")):
        extra = ["--target", "t1"] if name == "ckpt" else []
        assert main(["infer", "--checkpoint", checkpoint, "--volume", str(t2), *extra, "--precision", "fp32",
                     "--out", str(tmp_path / f"{name}.nii.gz"), "--quiet"]) == 0  # fmt: skip
    exported, direct = read_volume(tmp_path / "onnx.nii.gz"), read_volume(tmp_path / "ckpt.nii.gz")
    scale = float(np.abs(direct.array).max())
    np.testing.assert_allclose(exported.array, direct.array, atol=1e-4 * scale)
    sidecar = json.loads((tmp_path / "onnx.json").read_text())["checkpoint"]
    assert sidecar["task"] == "t2->t1" and sidecar["trained_on"] == "unpaired data"


def test_a_bundle_of_the_reverse_direction_serves_that_direction(cyclegan_run: Path, unpaired_cohort: Path,
                                                                   tmp_path: Path) -> None:  # fmt: skip
    bundle = tmp_path / "bundle"
    assert main(["export", "--checkpoint", str(cyclegan_run), "--target", "t1", "--format", "monai-bundle",
                 "--out", str(bundle)]) == 0  # fmt: skip
    metadata = json.loads((bundle / "configs" / "metadata.json").read_text())
    assert metadata["medsynth"]["task"] == "t2->t1"
    t2 = unpaired_cohort / "sub-02" / "anat" / "sub-02_T2w.nii.gz"
    for checkpoint, name, extra in (
        (str(bundle), "bundle", []),
        (str(cyclegan_run), "ckpt", ["--target", "t1"]),
    ):
        assert main(["infer", "--checkpoint", checkpoint, "--volume", str(t2), *extra, "--precision", "fp32",
                     "--out", str(tmp_path / f"{name}.nii.gz"), "--quiet"]) == 0  # fmt: skip
    np.testing.assert_array_equal(
        read_volume(tmp_path / "bundle.nii.gz").array, read_volume(tmp_path / "ckpt.nii.gz").array
    )


def test_convert_synthesises_either_direction_of_a_dicom_export(cyclegan_run: Path, unpaired_cohort: Path,
                                                                tmp_path: Path) -> None:  # fmt: skip
    export = tmp_path / "export"
    subject = unpaired_cohort / "sub-02" / "anat"
    for suffix, description in (("T1w", "t1_mprage_tra"), ("T2w", "t2_tse_tra")):
        write_dicom_series(read_volume(subject / f"sub-02_{suffix}.nii.gz"), export / "P1" / suffix,
                           series_description=description, study_uid="1.2.826.0.1.3680043.8.498.77",
                           patient_id="P1")  # fmt: skip
    backward = run_convert(export, cyclegan_run / "checkpoint_best.pt", tmp_path / "to_t1", target="t1")
    forward = run_convert(export, cyclegan_run / "checkpoint_best.pt", tmp_path / "to_t2")
    for report, name in ((backward, "t1"), (forward, "t2")):
        assert [r.status for r in report.studies] == ["converted"], report.studies
        written = next((tmp_path / f"to_{name}").rglob(f"{name}.nii.gz"))
        assert read_volume(written).shape == read_volume(export / "P1" / "T1w").shape


# ------------------------------------------------------------------------- validation modes
def test_without_a_complete_validation_subject_the_run_scores_the_round_trip(
    unpaired_cohort: Path, tmp_path: Path, capsys
) -> None:
    splits = tmp_path / "splits.json"
    splits.write_text(
        json.dumps({"train": ["sub-01", "sub-04", "sub-05"], "val": ["sub-03"], "test": ["sub-02"]})
    )
    run = tmp_path / "run"
    config = tiny_config(
        unpaired_cohort, extra=[*CYCLE, "train.steps_per_epoch=2", f"data.splits_file={splits}"]
    )
    claim_run_dir(run, config)
    train(config, run, quiet=False)
    out = capsys.readouterr().out
    assert "no validation subject has both t1 and t2: validation scores the round trip t1 -> t2 -> t1" in out
    assert "round trip)" in out
    best = load_checkpoint(run / "checkpoint_best.pt")["best"]
    assert best["validation"] == "round trip" and np.isfinite(best["val_psnr"])
    # Chosen on what a copy cannot win: the synthetic targets' distance from the training targets.
    assert best["metric"] == "divergence" and best["value"] == best["val_divergence"] >= 0
    header = (run / "metrics.csv").read_text().splitlines()[0].split(",")
    assert header[-1] == "val_divergence"
    # The score is named as a round trip where it is shown: the run's last line and its model card.
    (done,) = [line for line in out.splitlines() if line.startswith("done in")]
    assert "round trip source -> target -> source" in done
    assert "neither compares with a real target" in (run / "model_card.md").read_text()


def test_a_copy_of_the_input_cannot_win_the_round_trip_selection(unpaired_cohort: Path) -> None:
    """The target divergence of a real held-out T2w is far below that of its T1w passed off as one."""
    from medsynth.data.fingerprint import Fingerprint, NormalizationSpec
    from medsynth.data.masks import foreground_mask
    from medsynth.engine.validation import target_divergence

    def volumes(subject: str) -> dict:
        anat = unpaired_cohort / subject / "anat"
        return {m: read_volume(anat / f"{subject}_{s}.nii.gz") for m, s in (("t1", "T1w"), ("t2", "T2w"))
                if (anat / f"{subject}_{s}.nii.gz").exists()}  # fmt: skip

    specs = {m: NormalizationSpec.for_modality(m) for m in ("t1", "t2")}
    fingerprint = Fingerprint.compute(((s, volumes(s)) for s in ("sub-01", "sub-04", "sub-05")), specs,
                                      partial=True)  # fmt: skip
    held_out = volumes("sub-02")

    def normalised(modality: str) -> tuple[np.ndarray, np.ndarray]:
        array = held_out[modality].array
        mask = foreground_mask([array])
        return fingerprint.input_normalizer(modality, array, own_mask=mask).forward(array), mask

    real, copy = (target_divergence(fingerprint, "t2", [normalised(m)]) for m in ("t2", "t1"))
    assert real < 0.01 < copy, (real, copy)


def test_paired_training_leaves_one_sided_subjects_out(unpaired_cohort: Path, tmp_path: Path) -> None:
    """Paired data keeps only the subjects with both images: two here, too few for train, val and test."""
    run = tmp_path / "paired"
    config = tiny_config(unpaired_cohort, extra=["train.steps_per_epoch=2"])
    claim_run_dir(run, config)
    with pytest.raises(MedsynthError, match="2 subjects cannot fill train, val"):
        train(config, run, quiet=True)


def test_data_check_says_what_each_subject_serves(unpaired_cohort: Path, capsys) -> None:
    code = main(["data", "check", str(unpaired_cohort), "--modalities", "t1,t2", "--pairing", "unpaired"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert re.search(r"sub-01\s+t1 .*both: training, validation, evaluation", out)
    assert re.search(r"sub-03\s+t1 .*source only: unpaired training", out)
    assert re.search(r"sub-05\s+t2 .*target only: unpaired training", out)
    assert "unpaired t1 -> t2: 2 with both (validation, evaluation), 2 t1 only, 1 t2 only" in out
    assert (
        main(["data", "check", str(unpaired_cohort), "--modalities", "t1,flair", "--pairing", "unpaired"])
        == 1
    )
    assert "no subject has flair: unpaired training needs both sides" in capsys.readouterr().out


# ----------------------------------------------------------------- resume, budget, torchrun
def test_resume_after_sigterm_matches_uninterrupted_run(unpaired_cohort: Path, tmp_path: Path) -> None:
    extra = [*CYCLE, "train.batch_size=1", "train.checkpoint_every=2", "train.steps_per_epoch=6",
             "train.objective_args={pool_size: 3}"]  # fmt: skip
    reference = tmp_path / "reference"
    config = tiny_config(unpaired_cohort, extra=extra)
    claim_run_dir(reference, config)
    train(config, reference, quiet=True)

    killed = tmp_path / "killed"
    train_until_sigterm(unpaired_cohort, tmp_path, "killed", extra, at_step=2)
    state = load_checkpoint(killed / "checkpoint_latest.pt")
    assert state["epoch"] < 2 and len(state["objective_state"]["pools"]["target"]["images"]) > 0

    assert main(["train", "--resume", str(killed), "--quiet"]) == 0
    keys = ("loss_critic", "loss_adv", "loss_cycle", "loss_identity", "val_psnr")
    got = [float(r[k]) for r in _rows(killed) for k in keys]
    assert got == pytest.approx([float(r[k]) for r in _rows(reference) for k in keys], rel=1e-5, abs=1e-6)


def test_time_budget_stops_and_resume_extends(unpaired_cohort: Path, tmp_path: Path, capsys) -> None:
    run = tmp_path / "budget"
    long = ["train.epochs=200", "train.decay_epochs=200", "train.steps_per_epoch=2", "train.val_every=1000"]
    config = tiny_config(unpaired_cohort, extra=[*CYCLE, *long, "train.max_minutes=0.03"])
    claim_run_dir(run, config)
    train(config, run, quiet=False)
    assert "stopped by the time budget" in capsys.readouterr().out
    first = load_checkpoint(run / "checkpoint_latest.pt")
    assert first["finished"] and first["elapsed_seconds"] >= 0.03 * 60
    assert main(["train", "--resume", str(run), "--set", "train.max_minutes=0.06", "--quiet"]) == 0
    assert load_checkpoint(run / "checkpoint_latest.pt")["global_step"] > first["global_step"]


def test_torchrun_trains_replicas_and_resumes_on_one_process(unpaired_cohort: Path, tmp_path: Path) -> None:
    """Two processes on gloo: the trainer compares every network of the objective across ranks after each
    epoch and stops on a difference, so a clean exit means the four networks stayed replicas."""
    runs = tmp_path / "runs"
    torchrun_two_processes(unpaired_cohort, runs, "cyc", CYCLE)
    state = load_checkpoint(runs / "cyc" / "checkpoint_latest.pt")
    assert state["distributed"]["world_size"] == 2 and (state["epoch"], state["global_step"]) == (1, 2)
    assert main(["train", "--resume", str(runs / "cyc"), "--quiet", "--set", "train.epochs=2"]) == 0
    assert [r["steps"] for r in _rows(runs / "cyc")] == ["2", "4"]


# ----------------------------------------------------------------------------- the seam
def test_only_the_objective_the_pairing_and_the_recipes_know_the_method() -> None:
    """The issue's rule: the training loop, the model home and every command stay method-agnostic."""
    package = Path(__file__).resolve().parents[1] / "medsynth"
    allowed = {
        "engine/objectives/__init__.py",
        "engine/objectives/registry.py",
        "engine/objectives/cyclegan.py",
    }
    knowing = {
        str(path.relative_to(package))
        for path in package.rglob("*.py")
        if "cyclegan" in path.read_text(encoding="utf-8").lower()
    }
    assert knowing <= allowed, knowing - allowed
    assert load_config("demo_cpu", CYCLE).train.objective == "cyclegan"
    with pytest.raises(ConfigError):
        load_config("demo_cpu", ["data.pairing=unpaired"])


def test_splits_draw_held_out_subjects_from_the_preferred_ones_first() -> None:
    from medsynth.data.splits import make_splits

    ids = [f"sub-{i:02d}" for i in range(12)]
    preferred = {"sub-03", "sub-07", "sub-09", "sub-11"}
    splits = make_splits(ids, val=2, test=2, seed=4, prefer_held_out=preferred)
    assert set(splits["val"] + splits["test"]) == preferred
    few = make_splits(ids, val=2, test=2, seed=4, prefer_held_out={"sub-05"})
    assert "sub-05" in few["val"] + few["test"] and len(few["train"]) == 8
    assert make_splits(ids, val=2, test=2, seed=4) == make_splits(
        ids, val=2, test=2, seed=4, prefer_held_out=None
    )


def test_a_partial_fingerprint_takes_each_modality_from_the_subjects_that_have_it(
    unpaired_cohort: Path,
) -> None:
    from medsynth.errors import DataError

    records = scan_dataset(unpaired_cohort)
    specs = {m: NormalizationSpec() for m in ("t1", "t2")}
    loaded = [(r.id, load_subject(r, [m for m in ("t1", "t2") if m in r.paths])) for r in records]
    fingerprint = Fingerprint.compute(loaded, specs, partial=True)
    assert sum("t2" in entry for entry in fingerprint.subjects.values()) == 3
    with pytest.raises(DataError, match="has no t2 image"):
        Fingerprint.compute(loaded, specs)
    with pytest.raises(DataError, match="no training subject has t2"):
        Fingerprint.compute([x for x in loaded if "t2" not in x[1]], specs, partial=True)


def _blobs(count: int, generator: torch.Generator) -> torch.Tensor:
    """Discs on a dark background, in [-0.8, 0.8]: a domain whose inverse is another domain."""
    rows, cols = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
    images = torch.zeros(count, 1, 32, 32)
    for image in images:
        for _ in range(3):
            centre = torch.randint(6, 26, (2,), generator=generator).float()
            radius = float(torch.randint(3, 8, (), generator=generator))
            image[0] += ((rows - centre[0]) ** 2 + (cols - centre[1]) ** 2 < radius**2).float()
    return images.clamp(0, 1) * 1.6 - 0.8


def test_it_learns_a_contrast_inversion_from_unpaired_images(tiny_cohort: Path) -> None:
    """Source images and the *negatives of other* images: no pair, yet G must learn x -> -x (the way a
    T1w's dark CSF becomes a T2w's bright one). Without the identity term, which pulls G towards x -> x."""
    torch.manual_seed(0)
    config = tiny_config(tiny_cohort, extra=[*CYCLE, "train.objective_args={identity_weight: 0.0}",
                                             "model.generator_args={base_channels: 16, depth: 3, norm: batch, dropout: 0.0}",
                                             "model.critic_args={base_channels: 16, n_layers: 2, norm: instance}"])  # fmt: skip
    plan = SynthesisPlan(task=Task(("t1",), "t2"), generator=NetworkSpec("unet", {}), window=(32, 32))
    ctx = _context(config, 1, plan)
    for group in ctx["optimizer"].param_groups:
        group["lr"], group["betas"] = 2e-4, (0.5, 0.999)
    objective = build_objective("cyclegan", **ctx)
    draws = torch.Generator().manual_seed(1)
    for _ in range(150):
        objective.step(_blobs(8, draws), -_blobs(8, draws), None, None, None)
    generator = ctx["generator"].eval()
    with torch.no_grad():
        test = _blobs(16, draws)
        synthetic = generator(test)
    assert (synthetic + test).abs().mean() < 0.25  # close to the inverse
    assert (synthetic - test).abs().mean() > 1.0  # far from a copy
