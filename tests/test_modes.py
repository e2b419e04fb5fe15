"""Many-to-one (U-Net) and ResViT runs through the real commands: train -> infer -> evaluate.

Each run uses its GPU recipe from ``configs/`` shrunk to tiny networks, so the recipe itself is what is
exercised; the demo (CPU) recipes are checked to build their networks.
"""

from __future__ import annotations

import csv
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import TINY_OVERRIDES, tiny_config

from medsynth.cli import main
from medsynth.config import CONFIG_DIR, load_config
from medsynth.engine.run import claim_run_dir, train
from medsynth.engine.setup import prepare_run_data
from medsynth.errors import ConfigError
from medsynth.io.readers import read_volume
from medsynth.model import synthesis as synthesis_module
from medsynth.model.checkpoint import load_checkpoint
from medsynth.model.layout import InputLayout
from medsynth.model.synthesis import SynthesisModel
from medsynth.nets.registry import build_critic, build_generator

#: A ResViT small enough for a CPU test: the paper's layout, few filters and a one-layer transformer.
TINY_RESVIT = (
    "model.generator_args={base_channels: 8, n_art_blocks: 3, transformer_blocks: [0, 2], patch_size: 2, "
    "embed_dim: 32, n_heads: 2, n_transformer_layers: 1, img_size: 32}"
)


def train_run(runs: Path, name: str, task: list[str], recipe: str, extra: list[str], data: Path) -> Path:
    """Train with ``main`` (the CLI path) on the tiny cohort; returns the run folder."""
    arguments = ["train", *task, "--data", str(data), "--config", recipe, "--runs-dir", str(runs)]
    for item in [*TINY_OVERRIDES, *extra]:
        arguments += ["--set", item]
    assert main([*arguments, "--name", name, "--quiet"]) == 0
    return runs / name


def anat(cohort: Path, subject: str, suffix: str) -> Path:
    return cohort / subject / "anat" / f"{subject}_{suffix}.nii.gz"


def held_out_subject(run: Path) -> str:
    """The run's first test subject (never seen in training)."""
    return load_checkpoint(run / "checkpoint_best.pt")["data"]["splits"]["test"][0]


def assert_on_input_grid(output: Path, reference: Path) -> np.ndarray:
    """The synthetic volume has the input's shape and affine, float32 and finite values; returns it."""
    out, ref = nib.load(output), nib.load(reference)
    assert out.shape == ref.shape
    np.testing.assert_allclose(out.affine, ref.affine, atol=1e-5)
    array = np.asarray(out.dataobj)
    assert array.dtype == np.float32 and np.isfinite(array).all()
    assert array.std() > 0  # not a constant fill
    return array


def read_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as stream:
        return list(csv.DictReader(stream))


def one_line_error(capsys: pytest.CaptureFixture[str], code: int, message: str) -> None:
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.startswith("error:") and "\n" not in err and message in err, err


@pytest.fixture(scope="module")
def many_to_one_run(tiny_cohort: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    runs = tmp_path_factory.mktemp("modes")
    return train_run(runs, "m2o", ["t1,t2,pd->flair"], "t1_t2_pd_to_flair_unet2d", [], tiny_cohort)


@pytest.fixture(scope="module")
def resvit_run(tiny_cohort: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    runs = tmp_path_factory.mktemp("modes")
    return train_run(runs, "resvit", [], "t1_to_t2_resvit2d", [TINY_RESVIT], tiny_cohort)


# ------------------------------------------------------------------------------- many-to-one
def test_many_to_one_checkpoint_records_source_order(many_to_one_run: Path) -> None:
    state = load_checkpoint(many_to_one_run / "checkpoint_best.pt")
    assert (
        state["plan"]["task"]["sources"] == ["t1", "t2", "pd"] and state["plan"]["task"]["target"] == "flair"
    )
    assert state["plan"]["generator"]["init_args"]["in_channels"] == 3
    assert (
        state["objective"]["critic"]["init_args"]["in_channels"] == 4
    )  # sources + the (real or synthetic) target


def test_many_to_one_infer_named_or_in_order(
    many_to_one_run: Path, tiny_cohort: Path, tmp_path: Path
) -> None:
    subject = held_out_subject(many_to_one_run)
    t1, t2, pd = (anat(tiny_cohort, subject, s) for s in ("T1w", "T2w", "PDw"))
    common = ["infer", "--checkpoint", str(many_to_one_run), "--quiet"]
    ordered, named = tmp_path / "ordered.nii.gz", tmp_path / "named.nii.gz"
    assert (
        main([*common, "--volume", str(t1), "--volume", str(t2), "--volume", str(pd), "--out", str(ordered)])
        == 0
    )
    # Named inputs in another order reach the same channels: the result is identical.
    assert (
        main(
            [
                *common,
                "--volume",
                f"pd={pd}",
                "--volume",
                f"t1={t1}",
                "--volume",
                f"t2={t2}",
                "--out",
                str(named),
            ]
        )
        == 0
    )
    first = assert_on_input_grid(ordered, t1)
    np.testing.assert_array_equal(first, np.asarray(nib.load(named).dataobj))
    assert (tmp_path / "ordered.json").is_file()


def test_inference_feeds_the_network_what_training_cached(
    many_to_one_run: Path, tiny_cohort: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No train/inference skew: for a 3-source model, the normalised inputs ``predict`` hands to the
    network equal the cache's arrays of the same subject (each input normalised on its own foreground)."""
    config = load_config(many_to_one_run / "config.yaml")
    data = prepare_run_data(
        config,
        config.parsed_task(),
        many_to_one_run,
        cache_dir=many_to_one_run.parent / ".cache",
        progress=False,
    )
    model = SynthesisModel.from_checkpoint(many_to_one_run)
    subject = held_out_subject(many_to_one_run)
    seen: dict[str, np.ndarray] = {}

    def capture(generator, images, mask, **kwargs):  # what the slice loop would hand the network
        seen.update({m: np.array(a) for m, a in images.items()})
        return np.full(mask.shape, -1.0, np.float32)

    monkeypatch.setattr(synthesis_module, "synthesize_slices", capture)
    inputs = {
        m: read_volume(anat(tiny_cohort, subject, s))
        for m, s in (("t1", "T1w"), ("t2", "T2w"), ("pd", "PDw"))
    }
    model.predict(inputs)
    cached = data.cohort.subject(subject)
    assert sorted(seen) == ["pd", "t1", "t2"]
    for modality, array in seen.items():
        # Axial slicing: slice-first arrays are the cache's (k, i, j) storage order.
        np.testing.assert_allclose(array, cached.image(modality), atol=1e-6)


def test_many_to_one_evaluate(many_to_one_run: Path) -> None:
    assert main(["evaluate", "--run", str(many_to_one_run), "--quiet"]) == 0
    rows = read_rows(many_to_one_run / "eval" / "metrics.csv")
    assert [(r["method"], r["target"], r["inputs"]) for r in rows] == [("model", "flair", "t1+t2+pd")]
    assert np.isfinite(float(rows[0]["psnr_masked"]))


def test_many_to_one_refuses_too_few_volumes(
    many_to_one_run: Path, tiny_cohort: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    subject = held_out_subject(many_to_one_run)
    code = main(
        [
            "infer",
            "--checkpoint",
            str(many_to_one_run),
            "--out",
            str(tmp_path / "x.nii.gz"),
            "--volume",
            str(anat(tiny_cohort, subject, "T1w")),
            "--volume",
            str(anat(tiny_cohort, subject, "T2w")),
        ]
    )
    one_line_error(capsys, code, "missing: pd")
    assert not (tmp_path / "x.nii.gz").exists()


def test_many_to_one_refuses_volumes_on_different_grids(
    many_to_one_run: Path, tiny_cohort: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    subject = held_out_subject(many_to_one_run)
    pd = nib.load(anat(tiny_cohort, subject, "PDw"))
    shifted = pd.affine.copy()
    shifted[:3, 3] += 12.0  # two voxels off: same shape, another grid
    moved = tmp_path / "pd_moved.nii.gz"
    nib.save(nib.Nifti1Image(np.asarray(pd.dataobj), shifted), moved)
    code = main(
        [
            "infer",
            "--checkpoint",
            str(many_to_one_run),
            "--out",
            str(tmp_path / "x.nii.gz"),
            "--volume",
            str(anat(tiny_cohort, subject, "T1w")),
            "--volume",
            str(anat(tiny_cohort, subject, "T2w")),
            "--volume",
            str(moved),
        ]
    )
    one_line_error(capsys, code, "not on the grid")
    assert not (tmp_path / "x.nii.gz").exists()


# ------------------------------------------------------------------------------------ ResViT
def test_resvit_train_infer_evaluate(resvit_run: Path, tiny_cohort: Path, tmp_path: Path) -> None:
    state = load_checkpoint(resvit_run / "checkpoint_best.pt")
    assert state["plan"]["generator"]["name"] == "resvit"
    assert state["plan"]["generator"]["init_args"]["transformer_blocks"] == [0, 2]
    subject = held_out_subject(resvit_run)
    t1 = anat(tiny_cohort, subject, "T1w")
    out = tmp_path / "t2_syn.nii.gz"
    assert (
        main(
            [
                "infer",
                "--checkpoint",
                str(resvit_run / "checkpoint_best.pt"),
                "--volume",
                str(t1),
                "--out",
                str(out),
                "--quiet",
            ]
        )
        == 0
    )
    assert_on_input_grid(out, t1)
    assert main(["evaluate", "--run", str(resvit_run), "--quiet"]) == 0
    rows = read_rows(resvit_run / "eval" / "metrics.csv")
    assert [(r["subject"], r["target"], r["inputs"]) for r in rows] == [(subject, "t2", "t1")]


def test_resvit_feature_map_smaller_than_its_patch_is_refused(
    tiny_cohort: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # 4x down-sampling of the ~32 x 48 px tiny slices leaves 8 x 12 features: no room for 16 x 16 patches.
    too_big = TINY_RESVIT.replace("patch_size: 2", "patch_size: 16")
    arguments = [
        "train",
        "t1->t2",
        "--data",
        str(tiny_cohort),
        "--config",
        "t1_to_t2_resvit2d",
        "--runs-dir",
        str(tmp_path),
        "--quiet",
    ]
    for item in [*TINY_OVERRIDES, too_big]:
        arguments += ["--set", item]
    one_line_error(capsys, main(arguments), "smaller patch_size")
    assert not list(tmp_path.glob("*/checkpoint_*.pt"))


# ----------------------------------------------------------------------------------- recipes
@pytest.mark.parametrize("recipe", sorted(p.stem for p in CONFIG_DIR.glob("*.yaml")))
def test_every_recipe_builds_its_networks(recipe: str) -> None:
    """Every recipe loads and its generator/critic accept its arguments (built without memory)."""
    config = load_config(recipe)
    model = config.model
    task = config.parsed_task()
    channels = InputLayout(task.modalities or task.sources, config.data.context, task.is_unified).channels
    with torch.device("meta"):
        generator = build_generator(
            model.generator,
            spatial_dims=model.spatial_dims,
            in_channels=channels,
            out_channels=1,
            **model.generator_args,
        )
        critic = build_critic(
            model.critic, spatial_dims=model.spatial_dims, in_channels=channels + 1, **model.critic_args
        )
    assert generator.init_args["in_channels"] == channels
    if model.spatial_dims == 3:
        assert config.data.crop_size and len(config.data.crop_size) == 3
        assert min(config.data.crop_size) >= critic.min_input_size()


def test_generator_weights_initialise_resvit_and_are_refused_for_unet(
    tiny_cohort: Path, tmp_path: Path
) -> None:
    resvit_args = {"base_channels": 4, "n_art_blocks": 2, "transformer_blocks": [0], "embed_dim": 8,
                   "n_heads": 2, "n_transformer_layers": 1, "img_size": 32}  # fmt: skip
    weights = tmp_path / "cnn.pt"
    cnn_only = build_generator("resvit", spatial_dims=2, in_channels=1, out_channels=1,
                               **{**resvit_args, "transformer_blocks": []})  # fmt: skip
    torch.save(cnn_only.state_dict(), weights)
    extra = ["model.generator=resvit", f"model.generator_args={resvit_args}", f"model.generator_weights={weights}",
             "train.steps_per_epoch=1", "train.decay_epochs=0"]  # fmt: skip
    config = tiny_config(tiny_cohort, extra=extra)
    claim_run_dir(tmp_path / "resvit", config)
    train(config, tmp_path / "resvit", quiet=True)
    assert (tmp_path / "resvit" / "checkpoint_best.pt").is_file()
    with pytest.raises(ConfigError, match="generator_weights"):
        unet = tiny_config(tiny_cohort, extra=[f"model.generator_weights={weights}"])
        claim_run_dir(tmp_path / "unet", unet)
        train(unet, tmp_path / "unet", quiet=True)


# ------------------------------------------------------------------------------- objectives
def test_l1_objective_trains_without_a_critic_and_evaluates(tiny_cohort: Path, tmp_path: Path) -> None:
    """The objective seam: ``train.objective: l1`` trains the generator alone, then infers and evaluates."""
    run = train_run(tmp_path, "l1", [], "demo_l1", [], tiny_cohort)
    latest = load_checkpoint(run / "checkpoint_latest.pt")
    assert latest["objective"]["name"] == "l1" and latest["objective_state"] == {}
    assert "critic" not in latest["objective"]
    rows = read_rows(run / "metrics.csv")
    assert rows and all(r["loss_critic"] == "" and float(r["loss_l1"]) > 0 for r in rows)
    assert main(["evaluate", "--run", str(run), "--quiet"]) == 0
    assert np.isfinite(float(read_rows(run / "eval" / "metrics.csv")[0]["psnr_masked"]))
