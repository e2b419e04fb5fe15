"""The registration-aware paired objective (``train.objective: reggan``): the ``gan`` objective whose L1
compares the synthetic image after a jointly trained registration network warped it onto the target.

What is checked: it starts as the ``gan`` objective (zero field), the registration network learns a known
shift, the network stays training machinery (never in checkpoint_best.pt, infer loads G alone), resume
after a kill is exact, two gloo processes keep replicas, and recipes it cannot train are one line.
"""

from __future__ import annotations

import copy
import csv
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_OVERRIDES, tiny_config, torchrun_two_processes, train_until_sigterm
from torch import nn

from medsynth.cli import main
from medsynth.engine.objectives import build_objective
from medsynth.engine.objectives.reggan import RegistrationNetwork
from medsynth.engine.run import claim_run_dir, train
from medsynth.io.readers import read_volume
from medsynth.losses import structure_loss
from medsynth.model.checkpoint import load_checkpoint
from medsynth.model.synthesis import SynthesisModel
from medsynth.nets.registry import build_generator

#: A small registration network: the tests train it on CPU in seconds.
REG = ["train.objective=reggan", "train.objective_args={registration_channels: 4, registration_depth: 2}"]
#: The resume test's run; the checkpoint and metrics tests read its uninterrupted reference.
RESUMED = [*REG, "train.batch_size=1", "train.checkpoint_every=2", "train.steps_per_epoch=6"]


def _rows(run: Path) -> list[dict[str, str]]:
    with open(run / "metrics.csv", newline="") as stream:
        return list(csv.DictReader(stream))


@pytest.fixture(scope="session")
def reggan_run(tiny_cohort: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("regruns") / "reference"
    config = tiny_config(tiny_cohort, extra=RESUMED)
    claim_run_dir(run, config)
    train(config, run, quiet=True)
    return run


def _build(name: str, config, generator: nn.Module, channels: int, lr: float = 1e-3):
    optimizer = torch.optim.Adam(generator.parameters(), lr=lr)
    objective = build_objective(name, config=config, generator=generator, in_channels=channels,
                                optimizer=optimizer, device=torch.device("cpu"),
                                memory_format=torch.contiguous_format, precision="fp32")  # fmt: skip
    return objective, generator


# --------------------------------------------------------------------------------- the step
@pytest.mark.parametrize("context", [1, 3])
def test_it_starts_as_the_gan_objective_and_then_trains_every_network(
    tiny_cohort: Path, context: int
) -> None:
    """R's output layer starts at zero: the first step's field is the identity, so its losses and the
    generator it leaves are the ``gan`` objective's; later steps move R (and the critic, and G)."""
    config = tiny_config(tiny_cohort, extra=[*REG, f"data.context={context}"])
    torch.manual_seed(3)
    generator = build_generator("unet", spatial_dims=2, in_channels=context, out_channels=1,
                                **config.model.generator_args)  # fmt: skip
    gan_generator = copy.deepcopy(generator)
    torch.manual_seed(4)  # the gan objective's critic is drawn like reggan's (R is built after it)
    gan, _ = _build("gan", config, gan_generator, context)
    torch.manual_seed(4)
    reggan, _ = _build("reggan", config, generator, context)
    draws = torch.Generator().manual_seed(0)
    source = torch.rand((4, context, 32, 32), generator=draws) * 2 - 1
    target = torch.rand((4, 1, 32, 32), generator=draws) * 2 - 1
    first, reference = reggan.step(source, target, None), gan.step(source, target, None)
    assert set(first) == set(reggan.loss_names) and float(first["reg_shift_px"]) == 0.0
    assert float(first["loss_smooth"]) == 0.0
    torch.testing.assert_close(first["loss_l1_unwarped"], first["loss_l1"])  # the identity warp
    for name in ("loss_critic", "loss_adv", "loss_l1"):
        torch.testing.assert_close(first[name], reference[name], rtol=1e-5, atol=1e-6)
    for ours, theirs in zip(generator.parameters(), gan_generator.parameters(), strict=True):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    before = [[p.detach().clone() for p in m.parameters()] for m in (generator, *reggan.modules)]
    for _ in range(2):
        losses = reggan.step(source, target.roll(2, dims=2), None)
    assert all(torch.isfinite(v) for v in losses.values()) and float(losses["reg_shift_px"]) > 0
    for module, old in zip((generator, *reggan.modules), before, strict=True):
        assert any(not torch.equal(a, b) for a, b in zip(old, module.parameters(), strict=True))
    assert reggan.directions() == [] and reggan.optimizers[-1] is reggan.optimizer_registration


def test_the_structure_term_compares_the_synthetic_image_with_each_inputs_centre_slice(
    tiny_cohort: Path,
) -> None:
    """Source-major channels, 3-slice context: inputs 1 and 4 are the centres; the term is weighted and logged."""
    args = "train.objective_args={registration_channels: 4, registration_depth: 2, structure_weight: 2.0}"
    config = tiny_config(tiny_cohort, extra=["train.objective=reggan", args, "data.context=3"])
    torch.manual_seed(0)
    generator = build_generator("unet", spatial_dims=2, in_channels=3, out_channels=1,
                                **config.model.generator_args)  # fmt: skip
    reggan, _ = _build("reggan", config, generator, 3)
    draws = torch.Generator().manual_seed(0)
    source = torch.rand((2, 6, 32, 32), generator=draws)
    synthetic = torch.rand((2, 1, 32, 32), generator=draws)
    expected = (structure_loss(synthetic, source[:, 1:2]) + structure_loss(synthetic, source[:, 4:5])) / 2
    torch.testing.assert_close(reggan.input_structure(synthetic, source, None), expected)
    losses = reggan.step(source[:, :3], synthetic, None)
    assert "loss_structure" in reggan.loss_names and set(losses) == set(reggan.loss_names)
    assert float(losses["loss_structure"]) > 0


@pytest.mark.parametrize("shape", [(32, 32), (30, 20), (33, 39)])
def test_any_crop_gives_a_zero_field_of_its_own_size(shape: tuple[int, int]) -> None:
    """LocalNet halves the grid ``depth`` times; crops that do not divide are padded and cropped back."""
    network = RegistrationNetwork(channels=2, depth=2)
    field = network(torch.rand(2, 1, *shape), torch.rand(2, 1, *shape))
    assert field.shape == (2, 2, *shape) and not field.any()


def test_a_coarse_registration_network_gives_a_full_size_field_in_full_grid_voxels() -> None:
    """``scale`` 4: R works on 4 x 4 blocks; a field it predicts there is 4 times longer in full-grid voxels."""
    network = RegistrationNetwork(channels=2, depth=2, scale=4)
    assert not network(torch.rand(1, 1, 30, 22), torch.rand(1, 1, 30, 22)).any()
    with torch.no_grad():
        for layer in network.net.output_block.layers:  # type: ignore[union-attr]
            layer.conv.bias = nn.Parameter(torch.tensor([0.5, -0.25]))
    field = network(torch.rand(1, 1, 32, 24), torch.rand(1, 1, 32, 24))
    assert field.shape == (1, 2, 32, 24)
    torch.testing.assert_close(field.mean(dim=(0, 2, 3)), torch.tensor([2.0, -1.0]))


def _blobs(count: int, draws: torch.Generator) -> torch.Tensor:
    """Gaussian blobs in [-1, 1]: smooth images whose shift a registration network can see."""
    rows, cols = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
    images = torch.zeros(count, 1, 32, 32)
    for image in images:
        for _ in range(3):
            centre = torch.randint(8, 24, (2,), generator=draws).float()
            sigma = float(torch.randint(2, 5, (), generator=draws))
            image[0] += torch.exp(-((rows - centre[0]) ** 2 + (cols - centre[1]) ** 2) / (2 * sigma**2))
    return images.clamp(0, 1) * 2 - 1


class _Copy(nn.Module):
    """A generator that returns its input: whatever the L1 gains, R must have gained it."""

    def __init__(self) -> None:
        super().__init__()
        self.unused = nn.Parameter(torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + 0 * self.unused


def test_the_registration_network_learns_to_undo_a_known_shift(tiny_cohort: Path) -> None:
    """Targets are the synthetic images moved by (2, -1) voxels; R must find the field (-2, +1)."""
    config = tiny_config(tiny_cohort, extra=[*REG, "train.lr_generator=2e-3",
                                             "train.objective_args={registration_channels: 8, registration_depth: 2}"])  # fmt: skip
    torch.manual_seed(0)
    objective, _ = _build("reggan", config, _Copy(), 1, lr=0.0)
    draws = torch.Generator().manual_seed(1)
    for _ in range(60):
        images = _blobs(4, draws)
        objective.step(images, images.roll((2, -1), dims=(2, 3)), None)
    images = _blobs(8, draws)
    target = images.roll((2, -1), dims=(2, 3))
    with torch.no_grad():
        field = objective.registration(images, target)
        warped = objective.warp(images, field)
    assert (warped - target).abs().mean() < 0.2 * (images - target).abs().mean()
    centre = field[:, :, 8:24, 8:24].mean(dim=(0, 2, 3))
    torch.testing.assert_close(centre, torch.tensor([-2.0, 1.0]), atol=0.3, rtol=0)


# ------------------------------------------------------------------- a run and its outputs
def test_metrics_show_what_the_registration_network_does(reggan_run: Path) -> None:
    rows = _rows(reggan_run)
    assert {"loss_l1", "loss_smooth", "reg_shift_px"} <= set(rows[0])
    assert all(float(r["reg_shift_px"]) > 0 and np.isfinite(float(r["loss_smooth"])) for r in rows)
    latest = load_checkpoint(reggan_run / "checkpoint_latest.pt")
    assert {"registration_state", "optimizer_registration", "critic_state"} <= set(latest["objective_state"])
    assert latest["objective"]["name"] == "reggan" and latest["objective"]["registration"]["init_args"] == {
        "spatial_dims": 2, "channels": 4, "depth": 2, "scale": 1,
    }  # fmt: skip


def _tensors(value: object, path: str = "") -> dict[str, torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return {path: value}
    if isinstance(value, dict):
        return {k: v for key, item in value.items() for k, v in _tensors(item, f"{path}/{key}").items()}
    if isinstance(value, (list, tuple)):
        return {k: v for i, item in enumerate(value) for k, v in _tensors(item, f"{path}/{i}").items()}
    return {}


def test_the_best_checkpoint_serves_the_generator_alone(reggan_run: Path, tiny_cohort: Path,
                                                        tmp_path: Path) -> None:  # fmt: skip
    best = load_checkpoint(reggan_run / "checkpoint_best.pt")
    tensors = _tensors(best)
    assert tensors and all(path.startswith("/generator_state/") for path in tensors), sorted(tensors)
    assert best["directions"] == [] and "objective_state" not in best
    source = tiny_cohort / "sub-02" / "anat" / "sub-02_T1w.nii.gz"
    assert main(["infer", "--checkpoint", str(reggan_run), "--volume", str(source),
                 "--out", str(tmp_path / "t2.nii.gz"), "--quiet"]) == 0  # fmt: skip
    written, given = read_volume(tmp_path / "t2.nii.gz"), read_volume(source)
    assert written.shape == given.shape and np.allclose(written.affine, given.affine)
    model = SynthesisModel.from_checkpoint(reggan_run)
    assert model.directions == ["t1->t2"]
    assert {name for name, _ in model.generator.named_parameters()} == set(best["generator_state"])


# ------------------------------------------------------------------------ resume, torchrun
def test_resume_after_sigterm_matches_uninterrupted_run(reggan_run: Path, tiny_cohort: Path,
                                                        tmp_path: Path) -> None:  # fmt: skip
    killed = tmp_path / "killed"
    train_until_sigterm(tiny_cohort, tmp_path, "killed", RESUMED, at_step=2)
    state = load_checkpoint(killed / "checkpoint_latest.pt")
    assert state["epoch"] < 2 and "registration_state" in state["objective_state"]

    assert main(["train", "--resume", str(killed), "--quiet"]) == 0
    keys = ("loss_critic", "loss_adv", "loss_l1", "loss_smooth", "reg_shift_px", "val_psnr")
    got = [float(r[k]) for r in _rows(killed) for k in keys]
    assert got == pytest.approx([float(r[k]) for r in _rows(reggan_run) for k in keys], rel=1e-5, abs=1e-6)
    ours = load_checkpoint(killed / "checkpoint_latest.pt")["objective_state"]["registration_state"]
    reference = load_checkpoint(reggan_run / "checkpoint_latest.pt")["objective_state"]["registration_state"]
    for name, value in reference.items():
        torch.testing.assert_close(ours[name], value, rtol=1e-5, atol=1e-7)


def test_torchrun_keeps_the_registration_network_a_replica(tiny_cohort: Path, tmp_path: Path) -> None:
    """Two processes on gloo: the loop compares G, the critic and R across ranks after each epoch and stops
    on a difference, so a clean exit means R is trained through DDP like the other networks."""
    runs = tmp_path / "runs"
    torchrun_two_processes(tiny_cohort, runs, "reg", REG)
    state = load_checkpoint(runs / "reg" / "checkpoint_latest.pt")
    assert state["distributed"]["world_size"] == 2 and (state["epoch"], state["global_step"]) == (1, 2)
    assert any(value.abs().sum() > 0 for value in state["objective_state"]["registration_state"].values())


# ----------------------------------------------------------------------- one-line refusals
def _train(tiny_cohort: Path, tmp_path: Path, task: str, extra: list[str]) -> list[str]:
    args = ["train", task, "--data", str(tiny_cohort), "--runs-dir", str(tmp_path), "--config", "demo_cpu"]
    for item in [*TINY_OVERRIDES, *extra]:
        args += ["--set", item]
    return args


@pytest.mark.parametrize(
    ("task", "extra", "message"),
    [
        ("t1->t2", ["train.objective_args={smooth_wieght: 5}"], "unknown train.objective_args key 'smooth_wieght' for reggan; valid: anchor_weight, field_spacing, registration_channels"),
        ("t1->t2", ["train.objective_args={smooth_weight: -1}"], "smooth_weight must be a number >= 0"),
        ("t1->t2", ["train.objective_args={anchor_weight: -0.1}"], "anchor_weight must be a number >= 0"),
        ("t1->t2", ["train.objective_args={registration_depth: 0}"], "registration_depth must be an integer >= 1"),
        ("t1->t2", ["train.objective_args={registration_lr: 0}"], "registration_lr must be a number > 0"),
        ("t1->t2", ["model.spatial_dims=3"], "reggan learns an in-plane field (2D and 2.5D); set model.spatial_dims=2"),
        ("unified", ["data.context=1"], "a unified model has many targets"),
        ("t1->t2", ["data.pairing=unpaired"], "needs pairs (one subject's source and target)"),
        ("t1->t2", ["model.predict_scale=true"], "predict_scale is not available with train.objective=reggan"),
    ],
)  # fmt: skip
def test_recipes_it_cannot_train_are_one_line(
    tiny_cohort: Path, tmp_path: Path, task: str, extra: list[str], message: str, capsys
) -> None:
    args = _train(tiny_cohort, tmp_path, task, ["train.objective=reggan", *extra])
    if task == "unified":
        args += ["--modalities", "t1,t2,pd"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err and "Traceback" not in err, err


def test_only_the_objective_and_the_registry_know_the_method() -> None:
    """The loop, the model home and every command stay method-agnostic (the cyclegan test's rule)."""
    package = Path(__file__).resolve().parents[1] / "medsynth"
    allowed = {
        "engine/objectives/__init__.py",
        "engine/objectives/registry.py",
        "engine/objectives/reggan.py",
    }
    knowing = {
        str(path.relative_to(package))
        for path in package.rglob("*.py")
        if "reggan" in path.read_text(encoding="utf-8").lower()
    }
    assert knowing <= allowed, knowing - allowed


def test_the_field_is_coarse_so_a_voxel_wise_pattern_cannot_pick_intensities() -> None:
    """A field that moves each voxel on its own would let G draw every intensity and R pick the target's;
    averaged over blocks of ``field_spacing`` voxels, a one-voxel shift is spread over its block."""
    from medsynth.engine.objectives.reggan import coarse_field

    field = torch.zeros(1, 2, 32, 32)
    field[0, 0, 10, 10] = 1.0
    coarse = coarse_field(field, 8)
    assert coarse.shape == field.shape and float(coarse.abs().max()) < 0.05
    steady = torch.full((1, 2, 32, 32), 1.5)  # a rigid shift is kept as it is
    torch.testing.assert_close(coarse_field(steady, 8), steady)
    assert coarse_field(field, 1) is field
