"""The machine a run or a benchmark ran on, in words: figures and model cards must name it.

The same 2-core job takes three times longer on a Zen 3 EPYC without AVX-512 than on one with it, so a
time or a throughput means nothing without the CPU's model and vector extensions (and the GPU's model).
"""

from __future__ import annotations

import os
import platform
from pathlib import Path


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``, else the platform's own idea)."""
    for line in _cpuinfo().splitlines():
        if line.lower().startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine() or "unknown CPU"


def simd() -> str:
    """The widest vector extension the CPU reports: ``AVX-512``, ``AVX2, no AVX-512`` or ``no AVX2``."""
    flags = cpu_flags()
    if not flags:
        return "vector extensions unknown"
    if "avx512f" in flags:
        return "AVX-512"
    return "AVX2, no AVX-512" if "avx2" in flags else "no AVX2"


def cpu_flags() -> set[str]:
    """The kernel's CPU flags (``/proc/cpuinfo``; empty where there is none)."""
    for line in _cpuinfo().splitlines():
        if line.lower().startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def cpu_summary() -> str:
    """``AMD EPYC, 2 CPUs, AVX2, no AVX-512``: enough to tell two machines' timings apart."""
    return f"{cpu_model()}, {os.cpu_count() or 0} CPUs, {simd()}"


def _cpuinfo() -> str:
    try:
        return Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""
