"""``data.augment``: each change does what it should and nothing else, seeded per (seed, epoch, index),
sources only, and a killed augmented run resumes to the weights of an uninterrupted one."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_config, train_until_sigterm

from medsynth.cli import main
from medsynth.config import load_config
from medsynth.data.augment import (
    APPEARANCE_DRAWS,
    KINDS,
    PRESETS,
    AugmentSpec,
    SourceAugmentation,
    source_augmentation,
)
from medsynth.data.cache import Cohort
from medsynth.data.datasets import PatchDataset, SliceDataset
from medsynth.data.pairing import unpaired_slices
from medsynth.engine.run import claim_run_dir, train
from medsynth.engine.setup import prepare_run_data
from medsynth.errors import ConfigError
from medsynth.model.checkpoint import load_checkpoint

FLOOR = -1.0
#: Every kind on half the samples (the ``robust`` preset leaves noise and blur out).
ALL = AugmentSpec(intensity=True, bias=True, noise=True, blur=True, probability=0.5)
ALL_RECIPE = "data.augment={intensity: true, bias: true, noise: true, blur: true, probability: 0.5}"


def _stack(
    spatial: tuple[int, ...] = (32, 28), batch: int = 6, sources: int = 1, channels: int = 3
) -> torch.Tensor:
    """Normalised images: a floor (-1) frame around a smooth, textured foreground in (-0.9, -0.2)."""
    rng = np.random.default_rng(0)
    stack = np.full((batch, sources, channels, *spatial), FLOOR, np.float32)
    inner = tuple(slice(4, n - 4) for n in spatial)
    values = rng.uniform(-0.9, -0.2, (batch, sources, channels, *(n - 8 for n in spatial)))
    stack[(..., *inner)] = values
    return torch.from_numpy(stack)


def _only(kind: str, dims: int = 2) -> SourceAugmentation:
    return SourceAugmentation(AugmentSpec(**{kind: True}, probability=1.0), spatial_dims=dims)


# ------------------------------------------------------------------------------- the recipe field
@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, None),
        (False, None),
        (True, PRESETS["robust"]),
        ("robust", PRESETS["robust"]),
        ({"noise": True, "probability": 0.8}, AugmentSpec(noise=True, probability=0.8)),
    ],
)
def test_recipe_values(value: object, expected: AugmentSpec | None) -> None:
    assert AugmentSpec.from_config(value) == expected


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("data.augment=strong", "unknown data.augment preset 'strong'; choose one of robust"),
        ("data.augment={nois: true}", "unknown key data.augment.nois; valid keys: intensity"),
        ("data.augment={noise: 1}", "data.augment.noise must be true or false"),
        ("data.augment={noise: true, probability: 0}", "probability must be in (0, 1]"),
        ("data.augment={}", "switches on none of intensity, bias, noise, blur"),
    ],
)
def test_bad_recipe_values_are_one_line(override: str, message: str) -> None:
    with pytest.raises(ConfigError) as error:
        load_config("demo_cpu", [override])
    assert message in str(error.value) and "\n" not in str(error.value)


def test_the_robust_preset() -> None:
    assert PRESETS["robust"] == AugmentSpec(intensity=True, bias=True, probability=0.1)
    assert source_augmentation(None, 2) is None
    assert source_augmentation("robust", 2).spec == PRESETS["robust"]  # type: ignore[union-attr]


def test_a_run_saves_the_preset_spelled_out(tiny_cohort: Path, tmp_path: Path) -> None:
    """Resumed after ``robust`` changes meaning, a run trains on with the augmentation it started with."""
    config = tiny_config(tiny_cohort, extra=["data.augment=robust"])
    claim_run_dir(tmp_path / "run", config)
    saved = load_config(tmp_path / "run" / "config.yaml").data.augment
    assert saved == PRESETS["robust"].to_dict() and set(saved) == {*KINDS, "probability"}
    assert AugmentSpec.from_config(saved) == PRESETS["robust"]
    plain = tiny_config(tiny_cohort)
    claim_run_dir(tmp_path / "plain", plain)
    assert load_config(tmp_path / "plain" / "config.yaml").data.augment is None


# ------------------------------------------------------------------ each change, and nothing else
@pytest.mark.parametrize("kind", ["intensity", "bias", "noise"])
def test_intensity_changes_keep_the_floor_and_the_foreground(kind: str) -> None:
    stack = _stack()
    out = _only(kind)(stack, seed=1, epoch=0, index=np.arange(len(stack)))
    assert out.shape == stack.shape and out.dtype == torch.float32 and torch.isfinite(out).all()
    floor = stack == FLOOR
    assert torch.equal(out[floor], stack[floor])  # background stays the normaliser's floor
    assert (out[~floor] > FLOOR).all()  # and no foreground voxel becomes background
    assert not torch.allclose(out[~floor], stack[~floor], atol=1e-3)
    assert out.max() <= 1.0


def test_intensity_warp_is_monotone_per_image_and_shared_by_the_context() -> None:
    stack = _stack()
    stack[:, :, 1:] = stack[:, :, :1]  # three identical context slices
    out = _only("intensity")(stack, seed=2, epoch=0, index=np.arange(len(stack)))
    for before, after in zip(stack, out, strict=True):
        order = torch.argsort(before.flatten())
        assert (torch.diff(after.flatten()[order]) >= -1e-6).all()  # monotone: no contrast inversion
        assert torch.equal(after[:, 0], after[:, 1]) and torch.equal(after[:, 0], after[:, 2])
    draws = [_only("intensity")(stack, seed=s, epoch=0, index=np.arange(6)) for s in range(2)]
    assert not torch.equal(draws[0], draws[1])


def test_bias_is_a_smooth_unit_mean_field_shared_by_the_context() -> None:
    stack = _stack()
    out = _only("bias")(stack, seed=3, epoch=0, index=np.arange(len(stack)))
    inside = stack[0, 0, 0] > FLOOR
    log_ratio = torch.log((out + 1.0) / (stack + 1.0))[:, 0][:, :, inside]  # (images, context, voxels)
    torch.testing.assert_close(log_ratio[:, 0], log_ratio[:, 1], atol=1e-5, rtol=0)
    assert log_ratio.mean(dim=-1).abs().max() < 1e-4  # geometric mean 1: no global gain
    peak = log_ratio.abs().amax(dim=(1, 2))
    assert (peak > 0.02).all() and (peak < 1.0).all()
    field = torch.log((out + 1.0) / (stack + 1.0))[0, 0, 0, 4:-4, 4:-4]
    assert torch.diff(field, dim=0).abs().max() < 0.1  # smooth: no voxel-to-voxel jumps


def test_noise_is_rician_above_the_floor() -> None:
    stack = _stack(batch=8)
    out = _only("noise")(stack, seed=4, epoch=0, index=np.arange(8))
    difference = (out - stack)[stack > FLOOR]
    assert 0.0 < difference.std() < 2 * 0.04 * 2  # sd up to NOISE_SD of u = (x + 1) / 2
    assert difference.mean() > 0  # a magnitude: Rician noise brightens dark tissue on average


def test_blur_smooths_and_keeps_the_mean() -> None:
    stack = _stack(batch=8)
    out = _only("blur")(stack, seed=5, epoch=0, index=np.arange(8))
    assert torch.isfinite(out).all() and out.min() >= FLOOR and out.max() <= 1.0

    def roughness(x: torch.Tensor) -> torch.Tensor:
        return torch.diff(x, dim=-1).abs().mean(dim=(-1, -2, -3))

    assert (roughness(out[:, 0]) < roughness(stack[:, 0])).all()
    torch.testing.assert_close(out.mean(dim=(-1, -2, -3)), stack.mean(dim=(-1, -2, -3)), atol=0.03, rtol=0)


def test_3d_patches() -> None:
    stack = _stack(spatial=(16, 16, 12), batch=3, channels=1)
    augment = SourceAugmentation(ALL, spatial_dims=3)
    out = augment(stack, seed=0, epoch=0, index=np.arange(3))
    assert out.shape == stack.shape and torch.isfinite(out).all()
    for kind in KINDS:
        assert not torch.equal(_only(kind, dims=3)(stack, seed=0, epoch=0, index=np.arange(3)), stack), kind


def test_probability_leaves_some_samples_unchanged() -> None:
    stack = _stack(batch=64, spatial=(12, 12), channels=1)
    out = SourceAugmentation(AugmentSpec(bias=True, probability=0.5), spatial_dims=2)(
        stack, seed=0, epoch=0, index=np.arange(64)
    )
    unchanged = [torch.equal(a, b) for a, b in zip(out, stack, strict=True)]
    assert 16 < sum(unchanged) < 48


# ------------------------------------------------------------------------------------- seeding
def test_a_sample_is_a_function_of_seed_epoch_and_index() -> None:
    stack = _stack(batch=8, sources=2)
    augment = SourceAugmentation(ALL, spatial_dims=2)
    index = np.arange(100, 108)
    full = augment(stack, seed=7, epoch=3, index=index)
    assert torch.equal(full, augment(stack, seed=7, epoch=3, index=index))
    # any batch composition: a sample does not depend on its neighbours or its position in the batch
    order = np.array([5, 2, 7])
    torch.testing.assert_close(
        augment(stack[order], seed=7, epoch=3, index=index[order]), full[order], rtol=0, atol=0
    )
    assert not torch.equal(full, augment(stack, seed=7, epoch=4, index=index))
    assert not torch.equal(full, augment(stack, seed=8, epoch=3, index=index))
    assert not torch.equal(full[:, 0], full[:, 1])  # two sources: two scans, independent draws


# ----------------------------------------------------------------- datasets: the source only
@pytest.fixture(scope="module")
def cohort(tiny_cohort: Path, tmp_path_factory: pytest.TempPathFactory) -> Cohort:
    """The tiny demo cohort's T1w and T2w, normalised and cached as a run would."""
    root = tmp_path_factory.mktemp("augment")
    (root / "run").mkdir()
    config = tiny_config(tiny_cohort)
    data = prepare_run_data(
        config, config.parsed_task(), root / "run", cache_dir=root / "cache", progress=False
    )
    return data.cohort


def test_slice_dataset_changes_the_source_only(cohort: Cohort) -> None:
    ids = list(cohort.ids)[:2]
    kwargs = {"context": 3, "seed": 5}
    plain = SliceDataset(cohort, ids, ("t1",), "t2", **kwargs)
    augmented = SliceDataset(cohort, ids, ("t1",), "t2", augmentation=SourceAugmentation(ALL, 2), **kwargs)
    index = np.arange(0, len(plain), 3)
    for epoch in (0, 1):
        plain.set_epoch(epoch)
        augmented.set_epoch(epoch)
        a, b = plain.__getitems__(index), augmented.__getitems__(index)
        assert torch.equal(a["target"], b["target"]) and torch.equal(a["mask"], b["mask"])
        assert a["subject"] == b["subject"] and torch.equal(a["slice"], b["slice"])
        assert not torch.equal(a["source"], b["source"])
        assert torch.equal(augmented[int(index[2])]["source"], b["source"][2])  # one item = its batch row
    first = augmented.__getitems__(index)["source"]
    augmented.set_epoch(0)
    assert not torch.equal(first, augmented.__getitems__(index)["source"])  # epochs differ
    augmented.to_device("cpu")  # the device gather: the same batches
    augmented.set_epoch(1)
    assert torch.equal(augmented.__getitems__(index)["source"], first)


def test_patch_and_unpaired_datasets_change_the_source_only(cohort: Cohort) -> None:
    ids = list(cohort.ids)[:2]
    kwargs = {"patch_size": (16, 16, 16), "samples_per_epoch": 4, "seed": 1}
    plain = PatchDataset(cohort, ids, ("t1",), "t2", **kwargs)
    augmented = PatchDataset(cohort, ids, ("t1",), "t2", augmentation=SourceAugmentation(ALL, 3), **kwargs)
    a, b = plain.__getitems__(np.arange(4)), augmented.__getitems__(np.arange(4))
    assert torch.equal(a["target"], b["target"]) and torch.equal(a["mask"], b["mask"])
    assert a["source"].shape == b["source"].shape and not torch.equal(a["source"], b["source"])

    pairs = [unpaired_slices(cohort, ids, "t1", "t2", seed=2, augmentation=aug)
             for aug in (None, SourceAugmentation(ALL, 2))]  # fmt: skip
    a, b = (p.__getitems__(np.arange(6)) for p in pairs)
    assert torch.equal(a["target"], b["target"]) and not torch.equal(a["source"], b["source"])


def test_unified_mode_refuses_augmentation(cohort: Cohort) -> None:
    with pytest.raises(ConfigError, match="unified mode is not augmented"):
        SliceDataset(cohort, list(cohort.ids)[:2], (), None, unified_modalities=("t1", "t2"),
                     augmentation=SourceAugmentation(ALL, 2))  # fmt: skip


# ------------------------------------------------------------------ a killed run resumes exactly
def test_augmented_run_resumes_to_the_same_weights(tiny_cohort: Path, tmp_path: Path) -> None:
    # 6 epochs of 6 steps: long enough that the SIGTERM sent after step 2 lands before the run ends on a loaded
    # machine (with 12 steps a CI run once finished first).
    extra = [ALL_RECIPE, "train.batch_size=2", "train.checkpoint_every=2", "train.steps_per_epoch=6",
             "train.val_every=2", "train.epochs=3", "train.decay_epochs=3"]  # fmt: skip
    reference = tmp_path / "reference"
    config = tiny_config(tiny_cohort, extra=extra)
    claim_run_dir(reference, config)
    train(config, reference, quiet=True)
    # The run's out-of-distribution reference includes what the augmentation showed it (source only).
    subjects = json.loads((reference / "fingerprint.json").read_text())["subjects"].values()
    assert all(len(s["t1"]["appearance"]["augmented_histograms"]) == APPEARANCE_DRAWS for s in subjects)
    assert not any("augmented_histograms" in s["t2"]["appearance"] for s in subjects)

    killed = tmp_path / "killed"
    train_until_sigterm(tiny_cohort, tmp_path, "killed", extra, at_step=2)
    state = load_checkpoint(killed / "checkpoint_latest.pt")
    assert state["step_in_epoch"] > 0 and state["global_step"] < 36  # stopped mid-epoch, before the end
    assert AugmentSpec.from_config(state["config"]["data"]["augment"]) == ALL

    assert main(["train", "--resume", str(killed), "--quiet"]) == 0
    done, expected = (load_checkpoint(r / "checkpoint_latest.pt") for r in (killed, reference))
    assert done["global_step"] == expected["global_step"]
    for name, weight in expected["generator_state"].items():
        torch.testing.assert_close(done["generator_state"][name], weight, rtol=0, atol=0, msg=name)
