"""``medsynth info``: the versions, devices and choices a bug report needs, in one screen.

Like ``monai.config.print_config`` and ``torch.utils.collect_env``, but fast: nothing here imports torch
(over a second on a small machine) or any other heavy package. Versions come from the installed
packages' metadata; NVIDIA cards from the driver's management library (NVML, through ``ctypes``: name,
memory, compute capability, as ``nvidia-smi`` shows them); the CPU from ``/proc/cpuinfo``; the torch
build's CUDA version from its ``version.py``. What medsynth would choose on each device comes from the one
place that decides (:func:`medsynth.model.device.choose_precision`), given that description of the
hardware; nothing is measured here (``auto`` on a CPU with a bf16 unit measures the network when
training starts).

Example:
    >>> report = collect(runs_dir="runs")
    >>> sorted(report)[:3]
    ['cpu', 'cuda', 'medsynth']
"""

from __future__ import annotations

import ctypes
import importlib.metadata
import importlib.util
import json
import os
import platform
import re
import shutil
import sys
from pathlib import Path
from typing import Any

from . import __version__
from .hardware import cpu_model, simd
from .model.device import (
    BF16_MIN_GAIN,
    MIN_MEASURED_MS,
    CudaCapability,
    choose_precision,
    cpu_matrix_units_from_flags,
)

#: Distributions whose versions a report names (distribution name -> how the report spells it).
PACKAGES = {
    "torch": "torch",
    "monai": "MONAI",
    "nibabel": "nibabel",
    "SimpleITK": "SimpleITK",
    "pydicom": "pydicom",
    "numpy": "numpy",
}
GIB = 2**30


def collect(runs_dir: str | Path = "runs") -> dict[str, Any]:
    """Everything ``medsynth info`` reports, as plain JSON-ready values (documented in docs/cluster.md)."""
    torch_build = _torch_build()
    return {
        "medsynth": __version__,
        "python": {"version": platform.python_version(), "executable": sys.executable},
        "platform": platform.platform(),
        "packages": {name: _version(dist) for dist, name in PACKAGES.items()},
        "torch_build": torch_build,
        "cpu": _cpu(),
        "cuda": _cuda(torch_build),
        "runs_dir": _runs_dir(Path(runs_dir)),
    }


# ------------------------------------------------------------------------------------- versions
def _version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def _torch_build() -> dict[str, Any]:
    """torch's version and the CUDA it was built for, read from ``torch/version.py`` (not imported)."""
    build: dict[str, Any] = {"version": _version("torch"), "cuda": None}
    try:
        spec = importlib.util.find_spec("torch")
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        return build
    for folder in spec.submodule_search_locations:
        try:
            text = (Path(folder) / "version.py").read_text(encoding="utf-8")
        except OSError:
            continue
        found = re.search(r"^cuda(?:\s*:[^=]*)?=\s*['\"]([^'\"]+)['\"]", text, re.MULTILINE)
        build["cuda"] = found.group(1) if found else None
        break
    return build


# ------------------------------------------------------------------------------------- CPU
def _cpu() -> dict[str, Any]:
    units = cpu_matrix_units_from_flags()
    choice = choose_precision("cpu", "auto", channels_last=True, units=units)
    unit = units.bf16_unit
    if unit is None:
        precision, layout = choice.precision, "channels_last"
        why = (
            f"{choice.reason}: bf16 would be emulated, so auto trains and infers in fp32; nothing is measured"
        )
    else:
        precision, layout = "measured", "measured"
        why = (
            f"{unit}: when training starts, auto times fp32 and bf16, channels_last and contiguous, on the "
            f"run's own network and takes bf16 where it is {BF16_MIN_GAIN:g}x faster and a step takes over "
            f"{MIN_MEASURED_MS:g} ms (RUN/precision.json); infer, evaluate and convert compute in fp32 "
            "unless --precision auto asks them to time the generator alike; nothing is measured here"
        )
    return {
        "model": cpu_model(),
        "cores": os.cpu_count() or 0,
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "cpu_quota": _cpu_quota(),
        "vector": simd(),
        "memory": _host_memory(),
        "bf16": units.to_dict(),
        "choice": {"precision": precision, "memory_format": layout, "reason": why},
    }


def _cpu_quota() -> float | None:
    """CPUs a cgroup v2 quota allows (``cpu.max``), or None without a quota."""
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text(encoding="utf-8").split()[:2]
    except (OSError, ValueError):
        return None
    return None if quota == "max" else round(int(quota) / int(period), 2)


def _host_memory() -> dict[str, int] | None:
    """``{"total_bytes", "available_bytes"}`` from ``/proc/meminfo``."""
    values: dict[str, int] = {}
    try:
        for line in Path("/proc/meminfo").read_text(encoding="utf-8").splitlines():
            key, _, rest = line.partition(":")
            if key in ("MemTotal", "MemAvailable"):
                values[key] = int(rest.split()[0]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    if "MemTotal" not in values:
        return None
    return {"total_bytes": values["MemTotal"], "available_bytes": values.get("MemAvailable", 0)}


# ------------------------------------------------------------------------------------- CUDA
class _NvmlMemory(ctypes.Structure):
    _fields_ = [("total", ctypes.c_ulonglong), ("free", ctypes.c_ulonglong), ("used", ctypes.c_ulonglong)]


def _cuda(torch_build: dict[str, Any]) -> dict[str, Any]:
    """The NVIDIA cards this process may use (``CUDA_VISIBLE_DEVICES`` applied), with medsynth's choices."""
    cards, driver, note = nvml_devices()
    visible = _visible(cards, os.environ.get("CUDA_VISIBLE_DEVICES"))
    devices = []
    for position, card in enumerate(visible):
        major, minor = card["compute_capability"]
        choice = choose_precision(
            "cuda", "auto", channels_last=True, cuda=CudaCapability(card["name"], major, minor)
        )
        devices.append(
            {
                "index": position,
                "name": card["name"],
                "uuid": card["uuid"],
                "compute_capability": f"{major}.{minor}",
                "memory_total_bytes": card["total"],
                "memory_free_bytes": card["free"],
                "precision": choice.precision,
                "memory_format": "channels_last",
                "reason": choice.reason,
            }
        )
    if cards and not torch_build.get("cuda"):
        note = (
            f"this torch ({torch_build.get('version')}) is built without CUDA: medsynth runs on the CPU; "
            "install a CUDA build of torch to use the card"
        )
    elif cards and not visible:
        note = "CUDA_VISIBLE_DEVICES hides every card"
    return {"driver": driver, "devices": devices, "note": note}


def nvml_devices() -> tuple[list[dict[str, Any]], str | None, str | None]:
    """``(cards, driver version, note)`` from NVML; no cards and a note where there is no NVIDIA driver."""
    try:
        nvml = ctypes.CDLL("libnvidia-ml.so.1")
    except OSError:
        return [], None, "no NVIDIA driver (libnvidia-ml.so.1 not found): no CUDA device"
    if nvml.nvmlInit_v2() != 0:
        return [], None, "the NVIDIA driver did not initialise (nvmlInit failed): no CUDA device usable"
    try:
        text = ctypes.create_string_buffer(96)
        driver = text.value.decode() if nvml.nvmlSystemGetDriverVersion(text, 96) == 0 else None
        count = ctypes.c_uint(0)
        if nvml.nvmlDeviceGetCount_v2(ctypes.byref(count)) != 0:
            return [], driver, "NVML could not count the cards"
        cards = []
        for index in range(count.value):
            handle = ctypes.c_void_p()
            if nvml.nvmlDeviceGetHandleByIndex_v2(index, ctypes.byref(handle)) != 0:
                continue
            name, uuid = ctypes.create_string_buffer(96), ctypes.create_string_buffer(96)
            nvml.nvmlDeviceGetName(handle, name, 96)
            nvml.nvmlDeviceGetUUID(handle, uuid, 96)
            memory = _NvmlMemory()
            nvml.nvmlDeviceGetMemoryInfo(handle, ctypes.byref(memory))
            major, minor = ctypes.c_int(0), ctypes.c_int(0)
            nvml.nvmlDeviceGetCudaComputeCapability(handle, ctypes.byref(major), ctypes.byref(minor))
            cards.append(
                {
                    "name": name.value.decode(errors="replace"),
                    "uuid": uuid.value.decode(errors="replace"),
                    "total": int(memory.total),
                    "free": int(memory.free),
                    "compute_capability": (major.value, minor.value),
                }
            )
        return cards, driver, None
    finally:
        nvml.nvmlShutdown()


def _visible(cards: list[dict[str, Any]], variable: str | None) -> list[dict[str, Any]]:
    """The cards ``CUDA_VISIBLE_DEVICES`` leaves, in its order (indices or UUID prefixes; as CUDA does,
    the list ends at the first entry that names no card)."""
    if variable is None:
        return list(cards)
    chosen = []
    for entry in (e.strip() for e in variable.split(",")):
        match = None
        if entry.isdigit() and int(entry) < len(cards):
            match = cards[int(entry)]
        elif entry.startswith(("GPU-", "MIG-")):
            match = next((c for c in cards if c["uuid"].startswith(entry)), None)
        if match is None:
            break
        chosen.append(match)
    return chosen


# ------------------------------------------------------------------------------------- runs folder
def _runs_dir(path: Path) -> dict[str, Any]:
    """Free space where runs are written (the nearest existing folder when ``path`` does not exist yet)."""
    probe = path.absolute()
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        usage = shutil.disk_usage(probe)
    except OSError:
        return {"path": str(path), "exists": path.exists(), "free_bytes": None, "total_bytes": None}
    return {"path": str(path), "exists": path.exists(), "free_bytes": usage.free, "total_bytes": usage.total}


# ------------------------------------------------------------------------------------- text
def render(report: dict[str, Any]) -> str:
    """One screen of text."""
    python, cpu, cuda, runs = report["python"], report["cpu"], report["cuda"], report["runs_dir"]
    packages = "  ".join(f"{name} {version or '-'}" for name, version in report["packages"].items())
    build = report["torch_build"]
    lines = [
        f"medsynth {report['medsynth']}  Python {python['version']} ({python['executable']})",
        f"platform  {report['platform']}",
        f"packages  {packages}",
        f"torch build  {build['version'] or 'not installed'}, CUDA {build['cuda'] or 'none (CPU build)'}",
        "",
        f"CPU  {cpu['model']}, {cpu['cores']} cores ({_cores(cpu)}), {cpu['vector']}",
    ]
    if cpu["memory"]:
        memory = cpu["memory"]
        lines.append(f"     RAM {_gib(memory['total_bytes'])} ({_gib(memory['available_bytes'])} available)")
    bf16 = cpu["bf16"]
    lines += [
        f"     bf16 unit: {bf16['bf16_unit'] or 'none'} (AMX {_yes(bf16['amx_bf16'])}, AVX-512 BF16 "
        f"{_yes(bf16['avx512_bf16'])}, oneDNN bf16 {_yes(bf16['onednn_bf16'])}; from the CPU flags)",
        f"     medsynth on cpu (precision auto): {_choice(cpu['choice'])}",
        f"       why: {cpu['choice']['reason']}",
        "",
    ]
    if cuda["devices"]:
        lines.append(f"CUDA  driver {cuda['driver'] or '?'}")
        for device in cuda["devices"]:
            lines += [
                f"  cuda:{device['index']}  {device['name']}, compute capability {device['compute_capability']}, "
                f"{_gib(device['memory_total_bytes'])} ({_gib(device['memory_free_bytes'])} free)",
                f"     medsynth on cuda:{device['index']} (precision auto): {_choice(device)}",
                f"       why: {device['reason']}",
            ]
    else:
        lines.append("CUDA  no device")
    if cuda["note"]:
        lines.append(f"  note: {cuda['note']}")
    lines += [
        "",
        f"runs folder  {runs['path']}{'' if runs['exists'] else ' (not created yet)'}: "
        + (
            f"{_gib(runs['free_bytes'])} free of {_gib(runs['total_bytes'])}"
            if runs["free_bytes"] is not None
            else "?"
        ),
        "",
        "For a bug report: medsynth info --json",
    ]
    return "\n".join(lines)


def to_json(report: dict[str, Any]) -> str:
    return json.dumps(report, indent=2)


def _choice(choice: dict[str, Any]) -> str:
    if choice["precision"] == "measured":
        return "bf16 or fp32, channels_last or contiguous: measured on the network when it runs"
    return f"{choice['precision']}, {choice['memory_format']} (the recipe's train.channels_last)"


def _cores(cpu: dict[str, Any]) -> str:
    usable = f"{cpu['usable_cores']} usable" if cpu["usable_cores"] is not None else "usable unknown"
    return usable + (f", quota {cpu['cpu_quota']:g}" if cpu["cpu_quota"] is not None else "")


def _gib(value: int | None) -> str:
    return "?" if value is None else f"{value / GIB:.1f} GiB"


def _yes(flag: bool) -> str:
    return "yes" if flag else "no"
