"""The machine a benchmark runs on, and that machine's own peak, measured in the same run.

Every benchmark prints :func:`describe` as its first lines, so a figure never travels without the CPU
(model, cores, AVX-512 / AVX2), the GPU (model, memory), torch's version and thread count. Throughput
is put against :func:`measure_peak`, a dense matrix product timed on the same device, with the same
threads, minutes before: fp32 ``torch.mm`` on a CPU, bf16 on a GPU. A figure such as "87 % of the
measured peak" therefore means the same thing on a laptop, a shared 2-core VM and an H100, and a
constant copied from a datasheet (or an issue) never enters the arithmetic.

    >>> import machine
    >>> print(machine.describe("cpu"))                                     # doctest: +SKIP
    machine: AMD EPYC, 2 CPUs (2 usable), AVX2 (torch kernels: AVX2); torch 2.13.0+cpu, 2 threads; load 0.4
    >>> peak = machine.measure_peak("cpu")                                 # doctest: +SKIP
    >>> machine.fraction(60.0, peak)                                       # doctest: +SKIP
    '60.0 GFLOP/s = 70 % of the measured peak'

GPU benchmarks call :func:`cuda_or_exit` first: without CUDA they print one line and exit 0.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

from medsynth.hardware import cpu_model, simd

#: The one line a GPU benchmark prints on a machine without CUDA (and then exits 0).
NO_CUDA = "no CUDA device: GPU figures skipped"
#: Matrix side of the peak measurement: large enough to saturate the device, small enough to take
#: seconds on 2 CPU cores (4096^3 fp32 = 137 GFLOP) and milliseconds on a GPU (8192^3 bf16 = 1.1 TFLOP).
PEAK_SIZE = {"cpu": 4096, "cuda": 8192}
PEAK_DTYPE = {"cpu": "float32", "cuda": "bfloat16"}


@dataclass(frozen=True)
class Peak:
    """A measured matrix-product throughput: the yardstick of this run's fractions."""

    gflops: float
    device: str
    dtype: str
    size: int
    repeats: int

    def __str__(self) -> str:
        n = self.size
        return (
            f"peak: {self.gflops:,.1f} GFLOP/s, {self.dtype} torch.mm {n}x{n}x{n} on {self.device}, "
            f"best of {self.repeats} (measured in this run)"
        )


def describe(device: str = "cpu") -> str:
    """One line naming the machine (two with a GPU); benchmarks print it before any figure."""
    import torch

    cpus = os.cpu_count() or 0
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else cpus
    try:
        kernels = f" (torch kernels: {torch.backends.cpu.get_cpu_capability()})"
    except AttributeError:  # torch < 2.1
        kernels = ""
    load = f"; load {os.getloadavg()[0]:.1f}" if hasattr(os, "getloadavg") else ""
    from medsynth.model.device import cpu_matrix_units

    units = cpu_matrix_units()
    flags = ", ".join(f"{k} {'yes' if v else 'no'}" for k, v in units.to_dict().items() if k != "bf16_unit")
    text = (
        f"machine: {cpu_model()}, {cpus} CPUs ({usable} usable), {simd()}{kernels}; "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads{load}\n"
        f"bf16:    matrix unit {units.bf16_unit or 'none'} ({flags})"
    )
    if device.startswith("cuda") and torch.cuda.is_available():
        index = torch.device(device).index or 0
        props = torch.cuda.get_device_properties(index)
        text += (
            f"\ngpu:     {props.name}, {props.total_memory / 2**30:.1f} GiB, CUDA {torch.version.cuda}, "
            f"{torch.cuda.device_count()} device(s) visible, using {device}"
        )
    return text


def cuda_or_exit(device: str) -> None:
    """On ``--device cuda`` without a CUDA device, print :data:`NO_CUDA` and exit 0 (nothing to measure)."""
    if not device.startswith("cuda"):
        return
    import torch

    if not torch.cuda.is_available():
        print(NO_CUDA)
        raise SystemExit(0)


def synchronize(device: str) -> None:
    """Wait for the device's queued work, so that a host clock reads the work's end (no-op on a CPU)."""
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize(device)


def measure_peak(
    device: str = "cpu", *, size: int | None = None, repeats: int = 3, dtype_name: str | None = None
) -> Peak:
    """Best-of-``repeats`` throughput of one dense ``size``-cubed matrix product on ``device``.

    Uses the current ``torch.get_num_threads()``: set the benchmark's thread count first. On a GPU each
    repeat times 10 back-to-back products between two synchronisations. ``dtype_name`` (``"float32"``,
    ``"bfloat16"``) overrides the device's default (fp32 on a CPU, bf16 on a GPU): a CPU benchmark that
    compares the two precisions measures both peaks.
    """
    import torch

    kind = "cuda" if device.startswith("cuda") else "cpu"
    n = size or PEAK_SIZE[kind]
    dtype_name = dtype_name or PEAK_DTYPE[kind]
    dtype = getattr(torch, dtype_name)
    generator = torch.Generator(device="cpu").manual_seed(0)
    a = torch.randn(n, n, generator=generator).to(device=device, dtype=dtype)
    b = torch.randn(n, n, generator=generator).to(device=device, dtype=dtype)
    inner = 10 if kind == "cuda" else 1
    torch.mm(a, b)  # warm-up: library initialisation, kernel selection
    synchronize(device)
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        for _ in range(inner):
            torch.mm(a, b)
        synchronize(device)
        best = min(best, (time.perf_counter() - started) / inner)
    return Peak(2 * n**3 / best / 1e9, device, dtype_name, n, repeats)


def percent(gflops: float, peak: Peak) -> str:
    """``gflops`` as a share of the measured peak, for table cells: ``"87 %"``."""
    return f"{gflops / peak.gflops:.0%}".replace("%", " %")


def fraction(gflops: float, peak: Peak) -> str:
    """``"X GFLOP/s = Y % of the measured peak"``."""
    return f"{gflops:,.1f} GFLOP/s = {percent(gflops, peak)} of the measured peak"
