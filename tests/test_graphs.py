"""The CUDA-graph step wrapper, exercised on a CPU with a backend that behaves like a graph.

A real capture records kernels without running them, and a replay reruns them on whatever the static
input buffers and learning-rate tensors hold. The fake backend does the same with Python: ``capture``
runs the step once on copies of the models and optimisers (so nothing trains) to get the static outputs,
``replay`` runs the recorded closure again. Graphed and eager training must then agree exactly.
"""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from torch import nn

from medsynth.config import TrainConfig, load_config
from medsynth.engine.graphs import GraphedStep, graphed_step
from medsynth.errors import ConfigError
from medsynth.losses import l1_loss


class _Model:
    """A generator and an optimiser whose learning rate the test's schedule changes mid-run."""

    def __init__(self, lr: float) -> None:
        torch.manual_seed(0)
        self.net = nn.Sequential(
            nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 1, 1)
        )
        self.opt = torch.optim.Adam(self.net.parameters(), lr=lr, betas=(0.5, 0.999))

    def step(self, source: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None) -> dict:
        self.opt.zero_grad(set_to_none=True)
        loss = l1_loss(self.net(source), target, mask)
        loss.backward()
        self.opt.step()
        return {"loss_l1": loss.detach()}


class _FakeGraph:
    def __init__(self, model: _Model) -> None:
        self.model, self.function = model, None

    def warm(self, function):
        return function()

    def capture(self, function):
        self.function = function
        # During a capture the optimiser reads learning-rate tensors; a replay reads only those.
        self.lr_tensors = [g["lr"] for g in self.model.opt.param_groups]
        assert all(isinstance(t, torch.Tensor) for t in self.lr_tensors)
        saved = (copy.deepcopy(self.model.net.state_dict()), copy.deepcopy(self.model.opt.state_dict()))
        lrs = [g["lr"] for g in self.model.opt.param_groups]
        outputs = {k: v.clone() for k, v in function().items()}  # a capture trains nothing: undo it
        self.model.net.load_state_dict(saved[0])
        self.model.opt.load_state_dict(saved[1])
        for group, lr in zip(self.model.opt.param_groups, lrs, strict=True):
            group["lr"] = lr  # load_state_dict restored floats; the capture holds tensors
        self.outputs = outputs
        return outputs

    def replay(self) -> None:
        groups = self.model.opt.param_groups
        floats = [g["lr"] for g in groups]
        for group, tensor in zip(groups, self.lr_tensors, strict=True):
            group["lr"] = tensor
        try:
            for key, value in self.function().items():
                self.outputs[key].copy_(value)
        finally:
            for group, value in zip(groups, floats, strict=True):
                group["lr"] = value


def _batches(count: int) -> list[tuple[torch.Tensor, ...]]:
    generator = torch.Generator().manual_seed(1)
    return [
        (torch.randn(4, 2, 8, 8, generator=generator), torch.randn(4, 1, 8, 8, generator=generator),
         (torch.rand(4, 1, 8, 8, generator=generator) > 0.3).float())
        for _ in range(count)
    ]  # fmt: skip


def test_graphed_step_trains_exactly_like_the_eager_step() -> None:
    lr = 2.0**-10  # exact in float32, so a learning-rate tensor holds the very value of the float
    eager, graphed = _Model(lr), _Model(lr)
    backend = _FakeGraph(graphed)
    step = GraphedStep(graphed.step, [graphed.opt], torch.device("cpu"), warmup=2, backend=backend)
    expected, got = [], []
    for index, batch in enumerate(_batches(7)):
        if index == 5:  # the schedule moves after the capture: the replay must see it
            for model in (eager, graphed):
                model.opt.param_groups[0]["lr"] = lr / 2
        expected.append(eager.step(*batch)["loss_l1"])
        got.append(step(*batch)["loss_l1"])
    assert step.captured and step.steps == 7
    assert [float(v) for v in got] == [float(v) for v in expected]
    for a, b in zip(eager.net.state_dict().values(), graphed.net.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    # The returned losses are copies: a later replay does not change what the loop already summed.
    first = got[-1].clone()
    step(*_batches(1)[0])
    assert torch.equal(got[-1], first)
    assert isinstance(graphed.opt.param_groups[0]["lr"], float)  # checkpoints and logs see floats


def test_cuda_graphs_on_a_cpu_is_the_eager_step(caplog) -> None:
    model = _Model(1e-3)
    with caplog.at_level(logging.INFO, logger="medsynth"):
        assert graphed_step(model.step, [model.opt], torch.device("cpu"), enabled=True) == model.step
    assert "CUDA devices only" in caplog.text
    assert graphed_step(model.step, [model.opt], torch.device("cpu"), enabled=False) == model.step


def test_cuda_graphs_and_compile_are_exclusive() -> None:
    with pytest.raises(ConfigError, match="set one of them"):
        TrainConfig(cuda_graphs=True, compile=True).validate()


def test_gpu_recipes_load(tiny_cohort) -> None:
    for recipe in ("demo_gpu", "t1_to_t2_unet2d_gpu"):
        loaded = load_config(recipe, [], {"data.root": str(tiny_cohort)})
        assert loaded.train.cuda_graphs and loaded.train.batch_size == 64 and loaded.train.channels_last
        assert loaded.model.generator_args["norm"] == "batch" and loaded.train.val_every == 5
