"""Precision by capability (medsynth/model/device.py): every branch driven by an injected description of
the hardware, so it runs on any CPU; then real bf16 training and synthesis on this CPU."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_config

from medsynth.engine.run import claim_run_dir, train
from medsynth.errors import ConfigError
from medsynth.model.checkpoint import LATEST, load_checkpoint
from medsynth.model.device import (
    BF16_MIN_GAIN,
    CpuMatrixUnits,
    CudaCapability,
    autocast,
    choose_precision,
)
from medsynth.model.synthesis import SynthesisModel
from medsynth.model_card import build_model_card
from medsynth.nets.registry import build_generator

CPU = torch.device("cpu")
CUDA = torch.device("cuda")
AMX = CpuMatrixUnits(amx_bf16=True, avx512_bf16=True, onednn_bf16=True)
ZEN4 = CpuMatrixUnits(amx_bf16=False, avx512_bf16=True, onednn_bf16=True)
AVX2 = CpuMatrixUnits()
AVX512_NO_BF16 = CpuMatrixUnits(onednn_bf16=True)  # oneDNN runs bf16 there, but emulated


def timings(table: dict[tuple[str, bool], float]):
    calls: list[tuple[str, bool]] = []

    def measure(precision: str, channels_last: bool) -> float:
        calls.append((precision, channels_last))
        return table[(precision, channels_last)]

    return measure, calls


def test_no_bf16_unit_keeps_fp32_without_measuring() -> None:
    for units in (AVX2, AVX512_NO_BF16):
        measure, calls = timings({})
        choice = choose_precision(CPU, "auto", channels_last=True, measure=measure, units=units)
        assert (choice.precision, choice.channels_last, calls) == ("fp32", True, [])
        assert "no bf16 matrix unit" in choice.reason


@pytest.mark.parametrize("units, unit_name", [(AMX, "AMX"), (ZEN4, "AVX-512 BF16")])
def test_a_bf16_unit_picks_the_fastest_measured_precision_and_format(units, unit_name) -> None:
    # The AMX figures for the instance-norm recipe: bf16 fastest without channels_last.
    measure, calls = timings(
        {("fp32", True): 1.008, ("fp32", False): 1.268, ("bf16", True): 1.022, ("bf16", False): 0.506}
    )
    choice = choose_precision(CPU, "auto", channels_last=True, measure=measure, units=units)
    assert (choice.precision, choice.channels_last) == ("bf16", False)
    assert len(calls) == 4 and unit_name in choice.reason and "1.99x" in choice.reason
    assert choice.timings_ms == {"fp32/channels_last": 1008.0, "fp32/contiguous": 1268.0,
                                 "bf16/channels_last": 1022.0, "bf16/contiguous": 506.0}  # fmt: skip


def test_bf16_must_win_clearly_and_short_steps_stay_fp32() -> None:
    close = 0.100 / (BF16_MIN_GAIN - 0.05)
    measure, _ = timings(
        {("fp32", True): 0.100, ("fp32", False): 0.2, ("bf16", True): close, ("bf16", False): 1}
    )
    choice = choose_precision(CPU, "auto", channels_last=False, measure=measure, units=AMX)
    assert (choice.precision, choice.channels_last) == ("fp32", True)  # fp32's clearly faster format
    measure, _ = timings(
        {("fp32", True): 0.100, ("fp32", False): 0.105, ("bf16", True): 1, ("bf16", False): 1}
    )
    choice = choose_precision(CPU, "auto", channels_last=False, measure=measure, units=AMX)
    assert (choice.precision, choice.channels_last) == ("fp32", False)  # a 5 % difference is noise: keep it
    measure, _ = timings(
        {("fp32", True): 0.004, ("fp32", False): 0.005, ("bf16", True): 0.001, ("bf16", False): 1}
    )
    choice = choose_precision(CPU, "auto", channels_last=False, measure=measure, units=AMX)
    assert (choice.precision, choice.channels_last) == ("fp32", False) and "too short" in choice.reason


def test_explicit_wishes_on_a_cpu() -> None:
    assert choose_precision(CPU, "fp32", units=AMX).precision == "fp32"
    emulated = choose_precision(CPU, "bf16", channels_last=False, units=AVX2)
    assert (emulated.precision, emulated.channels_last) == ("bf16", False) and "emulated" in emulated.reason
    with pytest.raises(ConfigError, match="fp16 autocast is for CUDA"):
        choose_precision(CPU, "fp16", units=AMX)
    with pytest.raises(ConfigError, match="auto, bf16, fp16, fp32"):
        choose_precision(CPU, "half", units=AMX)


@pytest.mark.parametrize(
    "card, wish, expected",
    [
        (CudaCapability("Tesla T4", 7, 5), "auto", "fp16"),
        (CudaCapability("Tesla T4", 7, 5), "bf16", "fp16"),  # PyTorch refuses bf16 autocast there
        (CudaCapability("Tesla V100-SXM2-16GB", 7, 0), "auto", "fp16"),
        (CudaCapability("NVIDIA A100-SXM4-80GB", 8, 0), "auto", "bf16"),
        (CudaCapability("NVIDIA H100 80GB HBM3", 9, 0), "auto", "bf16"),
        (CudaCapability("NVIDIA H100 80GB HBM3", 9, 0), "fp32", "fp32"),
        (CudaCapability("NVIDIA H100 80GB HBM3", 9, 0), "fp16", "fp16"),
        (CudaCapability("Tesla P100-PCIE-16GB", 6, 0), "auto", "fp32"),
    ],
)
def test_cuda_precision_by_compute_capability(card, wish, expected) -> None:
    choice = choose_precision(CUDA, wish, cuda=card)
    assert choice.precision == expected and card.name in choice.reason


@pytest.mark.parametrize("name, args", [
    ("unet", {"spatial_dims": 2, "in_channels": 1, "out_channels": 1, "base_channels": 4, "depth": 2,
              "stem_channels": 4}),
    ("unet", {"spatial_dims": 2, "in_channels": 1, "out_channels": 1, "base_channels": 4, "depth": 2}),
])  # fmt: skip
def test_the_output_layer_is_float32_under_bf16_autocast(name: str, args: dict) -> None:
    generator = build_generator(name, **args).eval()
    with torch.no_grad(), autocast(CPU, "bf16"):
        output = generator(torch.randn(2, 1, 32, 32))
    assert output.dtype == torch.float32


def test_bf16_training_is_recorded_kept_on_resume_and_shown_on_the_card(
    tiny_cohort: Path, tmp_path: Path
) -> None:
    run = tmp_path / "bf16"
    config = tiny_config(tiny_cohort, extra=["train.precision=bf16", "train.channels_last=false"])
    claim_run_dir(run, config)
    train(config, run, quiet=True)
    recorded = json.loads((run / "precision.json").read_text())
    assert (recorded["device"], recorded["precision"], recorded["channels_last"]) == ("cpu", "bf16", False)
    assert load_checkpoint(run / LATEST)["plan"]["precision"] == "bf16"
    card = build_model_card(run)
    assert card["training"]["precision"]["precision"] == "bf16"
    # A resume reads the recorded choice instead of deciding again, whatever the recipe now says.
    (run / "precision.json").write_text(json.dumps({**recorded, "reason": "kept from the first session"}))
    resumed = tiny_config(
        tiny_cohort, extra=["train.precision=bf16", "train.channels_last=false", "train.epochs=2"]
    )
    train(resumed, run, resume=True, quiet=True)
    assert json.loads((run / "precision.json").read_text())["reason"] == "kept from the first session"


def test_bf16_synthesis_stays_close_to_fp32_and_returns_float32(tiny_run: Path, tiny_cohort: Path) -> None:
    from medsynth.io.readers import read_volume

    t1 = read_volume(next(tiny_cohort.glob("sub-01/anat/sub-01_T1w.nii.gz")))
    fp32 = SynthesisModel.from_checkpoint(tiny_run, precision="fp32").predict({"t1": t1})
    bf16_model = SynthesisModel.from_checkpoint(tiny_run, precision="bf16")
    bf16 = bf16_model.predict({"t1": t1})
    assert bf16_model.precision.precision == "bf16" and bf16.volume.array.dtype == np.float32
    inside = fp32.mask
    difference = np.abs(bf16.normalised - fp32.normalised)[inside]
    assert 0 < difference.max() < 0.05  # bf16 really ran, and stays near fp32 (a tiny untrained model)
