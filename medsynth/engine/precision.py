"""The training run's precision and memory format: decided once per run, recorded, kept on resume.

:func:`medsynth.model.device.choose_precision` makes the decision; this module gives it what only the
training loop knows (the actual networks and the batch shape, for the CPU measurement) and keeps the
answer in ``RUN/precision.json``: a resumed run computes as it started (a measurement repeated on a
busy machine could flip it mid-run), every process of a torchrun job uses rank 0's answer, and the model
card reads the line from there.
"""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path
from typing import Any

import torch

from ..config import Config
from ..io.atomic import atomic_write_text
from ..model.device import Measure, PrecisionChoice, autocast, choose_precision, time_call
from ..model.networks import build_model_critic
from .distributed import Dist

log = logging.getLogger("medsynth")

PRECISION_FILE = "precision.json"


def training_measure(
    config: Config, generator: torch.nn.Module, in_channels: int, source_shape: tuple[int, ...],
    target_shape: tuple[int, ...], device: torch.device,
) -> Measure:  # fmt: skip
    """``measure(precision, channels_last)``: seconds of one forward + backward of the generator and, for
    the GAN objective, its critic, on a random batch of the run's shape.

    Copies of the networks are measured (the run's own weights and optimiser state are untouched), in
    training mode, at the recipe's batch size: the step the run will repeat thousands of times.
    """
    batch = config.train.batch_size
    critic = build_model_critic(config.model, in_channels) if config.train.objective == "gan" else None
    source = torch.randn(batch, *source_shape, device=device)
    target = torch.randn(batch, *target_shape, device=device)
    spatial = len(source_shape) - 1

    def measure(precision: str, channels_last: bool) -> float:
        layout = (torch.channels_last if spatial == 2 else torch.channels_last_3d) if channels_last else (
            torch.contiguous_format
        )  # fmt: skip
        net = copy.deepcopy(generator).to(device, memory_format=layout).train()
        judge = copy.deepcopy(critic).to(device, memory_format=layout).train() if critic is not None else None
        x, y = source.contiguous(memory_format=layout), target.contiguous(memory_format=layout)

        def step() -> None:
            with autocast(device, precision):
                output = net(x)[:, : y.shape[1]]
                loss = (output - y).abs().mean()
                if judge is not None:
                    loss = loss + judge(torch.cat([x, output], dim=1)).float().square().mean()
            loss.backward()
            net.zero_grad(set_to_none=True)
            if judge is not None:
                judge.zero_grad(set_to_none=True)

        return time_call(step, warmup=2, repeats=2)  # oneDNN builds bf16 kernels in the first steps

    return measure


def decide_training_precision(
    config: Config, run_dir: Path, device: torch.device, dist: Dist, measure: Measure | None
) -> PrecisionChoice:
    """The run's precision: the recorded one on resume, else a new decision (rank 0's, shared)."""
    # Rank 0 reads the record for all: another rank reading it itself could find the file rank 0 has
    # just written for a new decision, skip the broadcast below and leave rank 0 waiting in it.
    recorded = _read(run_dir / PRECISION_FILE, device) if dist.is_main else None
    recorded = dist.broadcast_object(recorded) if dist.enabled else recorded
    if recorded is not None:
        asked = config.train.precision if config.train.amp else "fp32"
        if asked not in ("auto", recorded.precision):
            log.warning(
                "train.precision=%s is not applied: this run trains in %s, as decided when it started "
                "(%s); a run keeps one precision so that its resumed steps continue the same numerics; "
                "start a new run (another --name) to train in %s",
                asked, recorded.precision, PRECISION_FILE, asked,
            )  # fmt: skip
        log.debug("precision: %s (recorded when the run started)", recorded.describe())
        return recorded
    wish = "fp32" if not config.train.amp else config.train.precision
    choice = None
    if dist.is_main:
        choice = choose_precision(device, wish, channels_last=config.train.channels_last, measure=measure)
        record = {"device": device.type, **choice.to_dict()}
        atomic_write_text(run_dir / PRECISION_FILE, json.dumps(record, indent=2) + "\n")
    choice = dist.broadcast_object(choice) if dist.enabled else choice
    assert choice is not None
    log.debug("precision: %s", choice.describe())  # printed with the run's first lines (engine/run.py)
    return choice


def _read(path: Path, device: torch.device) -> PrecisionChoice | None:
    """The recorded choice, if it was made for this kind of device (a run moved to a GPU decides anew)."""
    try:
        data: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
        if data.get("device") != device.type:
            return None
        return PrecisionChoice(
            str(data["precision"]), bool(data["channels_last"]), str(data["reason"]), data.get("timings_ms")
        )
    except (OSError, ValueError, KeyError, TypeError):
        return None
