"""The GPU people actually have (issue 24), every branch on a CPU.

* fp16 needs a gradient scaler: forced through an injected Tesla T4 (compute capability 7.5), the
  objectives train through an enabled ``torch.amp.GradScaler("cpu")`` (autocast stays fp32 on a CPU, so
  the scaled step must equal the plain one exactly), an overflow skips the step, the scale is resumed;
* a CUDA-graph capture that fails falls back to the eager step (the CPU stand-in of tests/test_graphs.py);
* out of memory: fakes raise ``torch.OutOfMemoryError`` above a batch size (64 fails, 16 fits), in
  training, slice-wise and 3D inference; ``data_on_device`` with a card another process fills.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import TINY_OVERRIDES, tiny_config
from test_graphs import _batches, _Model
from torch import nn

from medsynth.cli import main
from medsynth.data.datasets import SliceDataset, place_on_device
from medsynth.engine import precision as run_precision
from medsynth.engine.graphs import GraphedStep
from medsynth.engine.objectives import build_objective
from medsynth.engine.objectives.pix2pix import GANObjective
from medsynth.engine.run import claim_run_dir
from medsynth.engine.setup import prepare_run_data
from medsynth.engine.trainer import Trainer
from medsynth.errors import MedsynthError
from medsynth.losses import l1_loss
from medsynth.model import memory
from medsynth.model.checkpoint import LATEST, load_checkpoint, save_checkpoint
from medsynth.model.device import CudaCapability, choose_precision
from medsynth.model.layout import InputLayout
from medsynth.model.networks import build_model_generator
from medsynth.model.slicing import synthesize_slices
from medsynth.model.sliding import synthesize_patches
from medsynth.model.synthesis import SynthesisModel

CPU = torch.device("cpu")
T4 = CudaCapability("Tesla T4", 7, 5)
GIB = 2**30


def _oom() -> torch.OutOfMemoryError:
    return torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")


def _warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


# ------------------------------------------------------------------------------ fp16 gradient scaler
def _objective(name: str, precision: str, scaler: torch.amp.GradScaler | None = None):
    config = tiny_config(Path("unused"), extra=[f"train.objective={name}"])
    torch.manual_seed(0)
    generator, _ = build_model_generator(config.model, 1)
    optimizer = torch.optim.Adam(generator.parameters(), lr=1e-3, betas=(0.5, 0.999))
    objective = build_objective(
        name,
        config=config,
        generator=generator,
        in_channels=1,
        optimizer=optimizer,
        device=CPU,
        memory_format=torch.contiguous_format,
        precision=precision,
        scaler=scaler,
    )
    return objective, generator


def _images(count: int, batch: int = 4) -> list[tuple[torch.Tensor, torch.Tensor, None]]:
    generator = torch.Generator().manual_seed(1)
    return [
        (torch.rand(batch, 1, 16, 16, generator=generator) * 2 - 1,
         torch.rand(batch, 1, 16, 16, generator=generator) * 2 - 1, None)
        for _ in range(count)
    ]  # fmt: skip


@pytest.mark.parametrize("name", ["l1", "gan"])
def test_the_fp16_scaler_trains_exactly_like_fp32_while_nothing_overflows(name: str) -> None:
    # fp16 is a 7.x card's decision; on a CPU autocast stays fp32, so only the scaler differs, and
    # scaling by 2^16 and back is exact: the weights must agree bit for bit.
    assert choose_precision("cuda", "auto", cuda=T4).precision == "fp16"
    plain, plain_generator = _objective(name, "fp32")
    scaled, scaled_generator = _objective(name, "fp16")
    assert not plain.ctx.scaler.is_enabled() and scaled.ctx.scaler.is_enabled()
    for batch in _images(3):
        expected, got = plain.step(*batch), scaled.step(*batch)
        assert expected.keys() == got.keys()
        assert all(torch.equal(expected[k], got[k]) for k in expected)
    for a, b in zip(
        plain_generator.state_dict().values(), scaled_generator.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b)
    if name == "gan":  # the critic's step goes through the same scaler
        for a, b in zip(plain.critic.state_dict().values(), scaled.critic.state_dict().values(), strict=True):
            assert torch.equal(a, b)
    assert scaled.ctx.scaler.get_scale() == 2.0**16
    assert scaled.state_dict()["grad_scaler"]["scale"] == 2.0**16
    assert "grad_scaler" not in plain.state_dict()


@pytest.mark.parametrize("name", ["l1", "gan"])
def test_an_overflowing_fp16_step_is_skipped_and_the_scale_backs_off(name: str) -> None:
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**127)  # loss x 2^127 overflows float32
    objective, generator = _objective(name, "fp16", scaler=scaler)
    before = copy.deepcopy(generator.state_dict())
    objective.step(*_images(1)[0])
    for key, value in generator.state_dict().items():
        if "running" not in key and "num_batches" not in key:  # norm statistics move in any forward
            assert torch.equal(value, before[key]), key
    assert scaler.get_scale() == 2.0**126


def test_a_step_that_stopped_half_way_does_not_block_the_scaler() -> None:
    # Out of memory after the critic's step, before the generator's: the scaler saw one optimiser step
    # and no update; the next step (at a smaller batch) must go through, at the same scale.
    objective, _ = _objective("gan", "fp16")
    optimizer, calls = objective.ctx.optimizer, []
    step = optimizer.step

    def fails_once(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise _oom()
        return step(*args, **kwargs)

    optimizer.step = fails_once  # type: ignore[method-assign]
    batches = _images(2)
    with pytest.raises(torch.OutOfMemoryError):
        objective.step(*batches[0])
    losses = objective.step(*batches[1])
    assert torch.isfinite(losses["loss_l1"]) and len(calls) == 2
    assert objective.ctx.scaler.get_scale() == 2.0**16


def test_a_t4_trains_with_the_scaler_records_fp16_and_resumes_the_scale(
    tiny_cohort: Path, tmp_path: Path, monkeypatch
) -> None:
    decide = run_precision.choose_precision  # the device's decision, as on a Tesla T4
    monkeypatch.setattr(
        run_precision,
        "choose_precision",
        lambda device, wish, **options: decide("cuda", wish, channels_last=options["channels_last"], cuda=T4),
    )
    run_dir, extra = tmp_path / "runs" / "t4", ["train.precision=auto", "train.steps_per_epoch=2"]
    trainer = _trainer(tiny_cohort, run_dir, extra)
    assert trainer.precision.precision == "fp16" and trainer.objective.ctx.scaler.is_enabled()
    trainer.fit()
    recorded = yaml.safe_load((run_dir / "precision.json").read_text())
    assert recorded["precision"] == "fp16" and "gradient scaler" in recorded["reason"]
    assert "Tesla T4, compute capability 7.5" in recorded["reason"]
    state = load_checkpoint(run_dir / LATEST)
    assert state["objective_state"]["grad_scaler"]["scale"] == 2.0**16
    state["objective_state"]["grad_scaler"]["scale"] = 1024.0  # as after a few overflows
    save_checkpoint(state, run_dir / LATEST)
    resumed = _trainer(tiny_cohort, run_dir, extra, claim=False)
    resumed.resume(run_dir / LATEST)
    assert resumed.objective.ctx.scaler.get_scale() == 1024.0


# ------------------------------------------------------------------------------ CUDA graph capture
_capturing = False


class _SyncingModel(_Model):
    """A step with a host synchronisation, which a real capture refuses (here: a C++ op that raises)."""

    def step(self, source: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None) -> dict:
        self.opt.zero_grad(set_to_none=True)
        loss = l1_loss(self.net(source), target, mask)
        torch._assert_async(
            torch.tensor(not _capturing), "CUDA error: operation not permitted when stream is capturing"
        )
        loss.backward()
        self.opt.step()
        return {"loss_l1": loss.detach()}


class _RefusingGraph:
    """A capture records without running: state a failed capture touched is put back, as on a GPU."""

    def __init__(self, model: _Model, *, second_error: bool = False, oom: bool = False) -> None:
        self.model, self.second_error, self.oom, self.captures = model, second_error, oom, 0

    def warm(self, function):
        return function()

    def capture(self, function):
        global _capturing
        self.captures += 1
        saved = copy.deepcopy(self.model.net.state_dict())
        _capturing = True
        try:
            if self.oom:
                raise _oom()
            return function()
        except RuntimeError as error:
            if self.second_error:  # what ending an invalidated capture raises, chained to the first error
                raise RuntimeError(
                    "CUDA error: operation failed due to a previous error during capture"
                ) from error
            raise
        finally:
            _capturing = False
            self.model.net.load_state_dict(saved)

    def replay(self) -> None:  # pragma: no cover - never reached: the capture fails
        raise AssertionError("replayed a failed capture")


@pytest.mark.parametrize("second_error", [False, True])
def test_a_failed_capture_names_the_op_and_trains_on_eagerly(caplog, second_error: bool) -> None:
    lr = 2.0**-10
    eager, graphed = _SyncingModel(lr), _SyncingModel(lr)
    backend = _RefusingGraph(graphed, second_error=second_error)
    step = GraphedStep(graphed.step, [graphed.opt], CPU, warmup=2, backend=backend)
    with caplog.at_level(logging.INFO, logger="medsynth"):
        for batch in _batches(6):
            assert torch.equal(step(*batch)["loss_l1"], eager.step(*batch)["loss_l1"])
    assert backend.captures == 1 and not step.captured and step.failure is not None
    for a, b in zip(eager.net.state_dict().values(), graphed.net.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert isinstance(graphed.opt.param_groups[0]["lr"], float)
    (line,) = _warnings(caplog)
    assert line.startswith("CUDA graph capture failed at tests/test_gpu_fallbacks.py:")
    assert "torch._assert_async(torch.tensor(not _capturing)" in line
    assert "(RuntimeError: CUDA error: operation not permitted when stream is capturing)" in line
    assert "runs eagerly from now on" in line


@pytest.mark.parametrize("second_error", [False, True])
def test_an_out_of_memory_during_capture_is_left_to_the_batch_back_off(second_error: bool) -> None:
    # Also when ending the invalidated capture raised a second error on top of the out-of-memory.
    model = _SyncingModel(1e-3)
    backend = _RefusingGraph(model, oom=True, second_error=second_error)
    step = GraphedStep(model.step, [model.opt], CPU, warmup=1, backend=backend)
    batches = _batches(2)
    step(*batches[0])
    with pytest.raises(torch.OutOfMemoryError):
        step(*batches[1])
    assert step.failure is None and not step.captured


# ------------------------------------------------------------------------------ training out of memory
def _trainer(cohort: Path, run_dir: Path, extra: list[str], *, claim: bool = True) -> Trainer:
    config = tiny_config(cohort, extra=["train.decay_epochs=0", *extra])
    if claim:
        claim_run_dir(run_dir, config)
    task = config.parsed_task()
    data = prepare_run_data(config, task, run_dir, cache_dir=run_dir.parent.parent / "cache", progress=False)
    return Trainer(config, task, data, run_dir, quiet=True)


def _out_of_memory_above(trainer: Trainer, limit: int, *, after: int | None = None) -> list[int]:
    """The objective's step raises like a full card above ``limit`` slices (or at call ``after + 1``)."""
    step, seen = trainer.objective.step, []

    def fake(source: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None) -> dict:
        seen.append(int(source.shape[0]))
        if source.shape[0] > limit or (after is not None and len(seen) > after):
            raise _oom()
        return step(source, target, mask)

    trainer.objective.step = fake  # type: ignore[method-assign]
    trainer.objective_step = fake
    return seen


def test_out_of_memory_at_64_trains_at_16_with_the_rule_s_learning_rates(
    tiny_cohort: Path, tmp_path: Path, caplog
) -> None:
    run_dir = tmp_path / "runs" / "oom"
    extra = ["train.batch_size=64", "train.lr_critic=2.0e-4", "train.steps_per_epoch=2"]
    trainer = _trainer(tiny_cohort, run_dir, extra)
    seen = _out_of_memory_above(trainer, 16)
    with caplog.at_level(logging.INFO, logger="medsynth"):
        trainer.fit()
    assert seen == [64, 32, 16, 16]  # two steps of the epoch at the batch that fitted
    assert trainer.config.train.batch_size == 16 and trainer.global_step == 2
    # lr x sqrt(batch / 8): from 64 to 16, x 0.5.
    assert trainer.config.train.lr_generator == pytest.approx(1e-4)
    assert trainer.config.train.lr_critic == pytest.approx(1e-4)
    assert all(g["initial_lr"] == pytest.approx(1e-4) for o in trainer.optimizers for g in o.param_groups)
    (line,) = _warnings(caplog)
    assert (
        "out of memory at training batch 64, 32 (on cpu); continuing with 16, the largest that fitted" in line
    )
    assert "learning rates x0.50" in line and "generator 0.0002 -> 0.0001" in line
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())  # a resume trains at the batch that fitted
    assert saved["train"]["batch_size"] == 16 and saved["train"]["lr_generator"] == pytest.approx(1e-4)
    state = load_checkpoint(run_dir / LATEST)
    assert state["config"]["train"]["batch_size"] == 16
    assert state["distributed"]["batch_size_per_process"] == 16


def test_out_of_memory_at_the_floor_is_one_error_line(
    tiny_cohort: Path, tmp_path: Path, monkeypatch, capsys
) -> None:
    seen: list[int] = []

    def full_card(self, source, target, mask):
        seen.append(int(source.shape[0]))
        raise _oom()

    monkeypatch.setattr(GANObjective, "step", full_card)
    command = ["train", "t1->t2", "--data", str(tiny_cohort), "--config", "demo_cpu", "--runs-dir", str(tmp_path),
               "--name", "full", "--quiet"]  # fmt: skip
    for item in [*TINY_OVERRIDES, "train.batch_size=64"]:
        command += ["--set", item]
    assert main(command) == 2
    assert seen == [64, 32, 16, 8, 4]
    err = capsys.readouterr().err
    assert "Traceback" not in err
    (line,) = [e for e in err.splitlines() if e.startswith("error:")]
    assert line.startswith("error: out of memory even at training batch 4 (tried 64, 32, 16, 8, 4; on cpu): ")


def test_out_of_memory_after_the_first_steps_is_one_line_with_the_resume_command(
    tiny_cohort: Path, tmp_path: Path
) -> None:
    run_dir = tmp_path / "runs" / "late"
    trainer = _trainer(tiny_cohort, run_dir, ["train.steps_per_epoch=12"])
    _out_of_memory_above(trainer, 64, after=9)  # batch 4 fits for 9 steps, then another job takes the card
    with pytest.raises(MedsynthError, match="after 9 steps had fitted") as error:
        trainer.fit()
    assert f"medsynth train --resume {run_dir}" in str(error.value)
    assert trainer.config.train.batch_size == 4


# ------------------------------------------------------------------------------ inference out of memory
class _OutOfMemoryAbove(nn.Module):
    """A generator on a card that holds at most ``limit`` slices (or 3D windows) per forward pass."""

    def __init__(self, net: nn.Module, limit: int) -> None:
        super().__init__()
        self.net, self.limit, self.batches = net, limit, []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.batches.append(int(x.shape[0]))
        if x.shape[0] > self.limit:
            raise _oom()
        return self.net(x)


def _slices(count: int = 80) -> tuple[np.ndarray, np.ndarray]:
    image = np.random.default_rng(0).uniform(-1, 1, (count, 24, 24)).astype(np.float32)
    mask = np.zeros(image.shape, dtype=bool)
    mask[:, 4:20, 4:20] = True
    return image, mask


def test_slice_inference_backs_off_from_64_to_16(caplog) -> None:
    torch.manual_seed(0)
    net = nn.Conv2d(1, 1, 3, padding=1)
    image, mask = _slices()
    layout = InputLayout(("t1",))
    expected = synthesize_slices(net, {"t1": image}, mask, layout=layout, batch_size=16, channels_last=False)
    small = _OutOfMemoryAbove(net, 16)
    with caplog.at_level(logging.INFO, logger="medsynth"):
        got = synthesize_slices(small, {"t1": image}, mask, layout=layout, batch_size=64, channels_last=False)
    assert small.batches == [64, 32, 16, 16, 16, 16, 16]  # 80 slices; none computed twice
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)
    assert _warnings(caplog) == [
        "out of memory at inference batch 64, 32 (on cpu); continuing with 16, the largest that fitted"
    ]


def test_3d_inference_backs_off_its_windows_per_pass(caplog) -> None:
    torch.manual_seed(0)
    net = nn.Conv3d(1, 1, 3, padding=1)
    volume = np.random.default_rng(1).uniform(-1, 1, (20, 20, 20)).astype(np.float32)
    mask = np.ones(volume.shape, dtype=bool)
    options = {"patch_size": (8, 8, 8), "overlap": 0.5, "margin": 0}
    expected = synthesize_patches(net, [volume], mask, batch_size=2, **options)
    small = _OutOfMemoryAbove(net, 2)
    with caplog.at_level(logging.INFO, logger="medsynth"):
        got = synthesize_patches(small, [volume], mask, batch_size=8, **options)
    assert small.batches[:2] == [8, 4] and max(small.batches[2:]) == 2
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)
    (line,) = _warnings(caplog)
    assert line.startswith("out of memory at inference batch (3D windows) 8, 4 (on cpu); continuing with 2")


def test_a_model_keeps_the_batch_that_fitted_for_its_next_volumes(tiny_run: Path, caplog) -> None:
    model = SynthesisModel.from_checkpoint(tiny_run, precision="fp32")
    small = _OutOfMemoryAbove(model.generator, 4)
    model.generator = small
    shape = (33, 39, 32)
    images = {"t1": np.random.default_rng(2).uniform(-1, 1, shape).astype(np.float32)}
    mask = np.zeros(shape, dtype=bool)
    mask[4:29, 4:35, 4:28] = True
    with caplog.at_level(logging.INFO, logger="medsynth"):
        first = model.synthesize_normalised(images, mask, batch_size=16)
        calls = len(small.batches)
        second = model.synthesize_normalised(images, mask, batch_size=16)
    assert small.batches[:3] == [16, 8, 4] and model.batch_limit == 4
    assert set(small.batches[calls:]) == {4}  # the second volume starts at the batch that fitted
    np.testing.assert_array_equal(first, second)
    assert len(_warnings(caplog)) == 1


def test_inference_out_of_memory_at_batch_1_is_one_error_line() -> None:
    image, mask = _slices(8)
    with pytest.raises(
        MedsynthError, match=r"out of memory even at inference batch 1 \(tried 8, 4, 2, 1; on cpu\)"
    ):
        synthesize_slices(
            _OutOfMemoryAbove(nn.Identity(), 0),
            {"t1": image},
            mask,
            layout=InputLayout(("t1",)),
            batch_size=8,
        )


# ------------------------------------------------------------------------------ data on the device
@pytest.fixture(scope="module")
def slices(tiny_cohort: Path, tmp_path_factory) -> SliceDataset:
    run_dir = tmp_path_factory.mktemp("placement") / "run"
    config = tiny_config(tiny_cohort)
    claim_run_dir(run_dir, config)
    data = prepare_run_data(
        config, config.parsed_task(), run_dir, cache_dir=run_dir.parent / "cache", progress=False
    )
    return SliceDataset(data.cohort, data.splits["train"], ["t1"], "t2")


def _fresh(dataset: SliceDataset, monkeypatch, *, oom: bool = False) -> list[torch.device]:
    dataset.pin_memory = False
    moved: list[torch.device] = []

    def to_device(device: torch.device) -> None:
        if oom:
            raise _oom()
        moved.append(device)

    monkeypatch.setattr(dataset, "to_device", to_device)
    return moved


def test_slices_go_resident_on_a_card_with_room(slices: SliceDataset, monkeypatch) -> None:
    moved = _fresh(slices, monkeypatch)
    decision = place_on_device(slices, torch.device("cuda"), resident=True, memory=(8 * GIB, 16 * GIB))
    assert moved == [torch.device("cuda")] and not slices.pin_memory
    assert decision.startswith("training slices resident on cuda") and "8.0 of 16.0 GiB free" in decision


def test_a_card_another_process_fills_gets_pinned_host_batches(
    slices: SliceDataset, monkeypatch, caplog
) -> None:
    moved = _fresh(slices, monkeypatch)
    # 15 of 16 GiB held by another job: the driver's free figure is what is left.
    free = int(1.5 * slices.resident_bytes)
    with caplog.at_level(logging.INFO, logger="medsynth"):
        decision = place_on_device(slices, torch.device("cuda"), resident=True, memory=(free, 16 * GIB))
    assert moved == [] and slices.pin_memory and "pinned" in decision
    assert "exceed 50 % of the free GPU memory (0.0 of 16.0 GiB free on cuda)" in caplog.text


def test_the_free_figure_is_the_driver_s_plus_this_process_s_cache(slices: SliceDataset, monkeypatch) -> None:
    # mem_get_info counts every process's memory as used; our own allocator's unused cache is ours to use.
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (1 * GIB, 16 * GIB))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 3 * GIB)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 1 * GIB)
    assert memory.device_memory("cuda") == (3 * GIB, 16 * GIB)
    moved = _fresh(slices, monkeypatch)
    assert "3.0 of 16.0 GiB free" in place_on_device(slices, torch.device("cuda"), resident=True)
    assert moved == [torch.device("cuda")]


def test_a_copy_that_runs_out_of_memory_falls_back_to_pinned_batches(
    slices: SliceDataset, monkeypatch, caplog
) -> None:
    _fresh(slices, monkeypatch, oom=True)  # the other process grew between the check and the copy
    with caplog.at_level(logging.INFO, logger="medsynth"):
        decision = place_on_device(slices, torch.device("cuda"), resident=True, memory=(8 * GIB, 16 * GIB))
    assert slices.pin_memory and "pinned" in decision
    (line,) = _warnings(caplog)
    assert line.startswith("out of memory copying the training slices")


def test_the_learning_rate_rule_and_the_back_off_floor() -> None:
    assert memory.lr_scale(64, 16) == 0.5 and memory.lr_scale(8, 32) == 2.0
    backoff = memory.BatchBackoff(6, floor=4)
    backoff.shrink()
    assert backoff.batch == 4
    with pytest.raises(MedsynthError, match=r"tried 6, 4"):
        backoff.shrink()
