"""benchmarks/machine.py: the header names the machine, fractions are of a peak measured in the run."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

# The benchmarks are scripts, not a package: load the module from its file (the scripts import it as
# ``machine`` because Python puts benchmarks/ on their path).
_SPEC = importlib.util.spec_from_file_location(
    "benchmarks_machine", Path(__file__).parents[1] / "benchmarks" / "machine.py"
)
machine = importlib.util.module_from_spec(_SPEC)
sys.modules[_SPEC.name] = machine
_SPEC.loader.exec_module(machine)


def test_the_header_names_cpu_threads_and_torch():
    header = machine.describe("cpu")
    assert header.startswith(f"machine: {machine.cpu_model()}, ")
    assert f"torch {torch.__version__}, {torch.get_num_threads()} threads" in header
    assert machine.simd() in header


def test_a_small_measured_peak_and_its_fractions():
    peak = machine.measure_peak("cpu", size=128, repeats=2)
    assert (peak.device, peak.dtype, peak.size, peak.repeats) == ("cpu", "float32", 128, 2)
    assert peak.gflops > 0
    assert str(peak).startswith(f"peak: {peak.gflops:,.1f} GFLOP/s, float32 torch.mm 128x128x128 on cpu")
    fixed = machine.Peak(200.0, "cpu", "float32", 4096, 3)
    assert machine.percent(174.0, fixed) == "87 %"
    assert machine.fraction(174.0, fixed) == "174.0 GFLOP/s = 87 % of the measured peak"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour without CUDA")
def test_a_gpu_benchmark_without_cuda_says_so_and_exits_0(capsys):
    machine.cuda_or_exit("cpu")  # nothing to say on a CPU run
    with pytest.raises(SystemExit) as stop:
        machine.cuda_or_exit("cuda")
    assert stop.value.code == 0
    assert capsys.readouterr().out == machine.NO_CUDA + "\n"
