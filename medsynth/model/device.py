"""Device choice and mixed precision, decided once, in this module, for training and inference alike.

Which precision pays depends on the machine, not on the recipe:

* **CUDA**: bf16 autocast where the card computes bf16 (compute capability >= 8.0), fp16 where it does not;
  the recipe's ``amp`` / precision is a wish that this module may narrow.
* **CPU**: bf16 autocast is several times faster than fp32 on CPUs with a bf16 matrix unit (Intel AMX
  since Sapphire Rapids; AVX-512 BF16 on Cooper Lake and AMD Zen 4) and emulated, slower, everywhere else.
  Even with a unit, whether a given network gains depends on its layers and memory format (measured: a
  batch-norm U-Net gained 2.3x with channels_last, an instance-norm one lost its gain with it). So ``auto``
  on a CPU asks the hardware first and then a short measurement of the actual network
  (:func:`choose_precision` with a ``measure`` callable); without a unit it stays fp32 and measures
  nothing, so such a machine runs exactly as before.

Whatever autocast does, the generator's output layer, the losses, the metrics and everything written to
disk stay float32 (the networks run their last layer outside autocast, ``nets.blocks.full_precision``: a bf16 output has 8 bits of
mantissa, too few for 10 HU at 1000 HU).

torch is imported inside the functions that use it: ``medsynth info`` reads the capability table and
the CPU's flags without paying torch's import (over a second on a small machine).
"""

from __future__ import annotations

import contextlib
import functools
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..errors import ConfigError, MedsynthError
from ..hardware import cpu_flags

if TYPE_CHECKING:
    import torch

#: What a user or recipe may ask for; ``auto`` lets this module decide.
PRECISION_WISHES = ("auto", "bf16", "fp16", "fp32")
#: bf16 must beat fp32 by this factor to be chosen by ``auto``: fp32 is exact, so a tie goes to it.
BF16_MIN_GAIN = 1.1
#: Below this many milliseconds per measured step, timings are mostly overhead and noise, and whatever
#: bf16 saves is not worth a precision that differs from machine to machine: ``auto`` keeps fp32.
MIN_MEASURED_MS = 20.0


def pick_device(name: str) -> torch.device:
    """``auto`` means CUDA when present; asking for CUDA without one is a user error."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise MedsynthError("--device cuda asked for, but no CUDA device is available; use --device cpu")
    return torch.device(name)


# ------------------------------------------------------------------------------------- capabilities
@dataclass(frozen=True)
class CpuMatrixUnits:
    """The CPU's bf16 hardware, as PyTorch and the kernel report it.

    ``onednn_bf16`` is oneDNN's own answer (``torch.ops.mkldnn._is_mkldnn_bf16_supported``): it can run
    bf16 kernels at all (AVX-512 suffices). Only ``amx_bf16`` (PyTorch's ``_init_amx``, which also asks
    the kernel for the AMX tile state) or ``avx512_bf16`` (the ``vdpbf16ps`` dot product, from the
    kernel's CPU flags) make them faster than fp32.
    """

    amx_bf16: bool = False
    avx512_bf16: bool = False
    onednn_bf16: bool = False

    @property
    def bf16_unit(self) -> str | None:
        """``"AMX"``, ``"AVX-512 BF16"`` or None (no bf16 matrix unit: bf16 would be emulated)."""
        if not self.onednn_bf16:
            return None
        if self.amx_bf16:
            return "AMX"
        return "AVX-512 BF16" if self.avx512_bf16 else None

    def to_dict(self) -> dict[str, Any]:
        return {
            "amx_bf16": self.amx_bf16,
            "avx512_bf16": self.avx512_bf16,
            "onednn_bf16": self.onednn_bf16,
            "bf16_unit": self.bf16_unit,
        }


#: oneDNN computes bf16 at all from AVX-512 "core" (F, BW, VL, DQ) or AVX-NE-CONVERT on.
_ONEDNN_BF16_FLAGS = ({"avx512f", "avx512bw", "avx512vl", "avx512dq"}, {"avx_ne_convert"})


def cpu_matrix_units_from_flags(flags: set[str] | None = None) -> CpuMatrixUnits:
    """:func:`cpu_matrix_units` from the CPU flags alone, without importing torch (``medsynth info``).

    oneDNN's answer is inferred from the flags its own check reads, and AMX is taken as granted when the
    CPU reports it (PyTorch's check also asks the kernel for the tile state); a bf16 unit needs AMX or
    AVX-512 BF16 either way, and both imply AVX-512 core, so the inferred unit is the same.
    """
    flags = cpu_flags() if flags is None else flags
    onednn = any(needed <= flags for needed in _ONEDNN_BF16_FLAGS)
    return CpuMatrixUnits(
        amx_bf16="amx_bf16" in flags, avx512_bf16="avx512_bf16" in flags, onednn_bf16=onednn
    )


@functools.lru_cache(maxsize=1)
def cpu_matrix_units() -> CpuMatrixUnits:
    """Detect the CPU's bf16 units once per process."""
    import torch

    flags = cpu_flags()
    onednn = False
    with contextlib.suppress(Exception):  # absent in builds without oneDNN
        onednn = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    amx = "amx_bf16" in flags
    with contextlib.suppress(Exception):  # PyTorch's query also checks that the OS grants the tile state
        amx = amx and bool(torch._C._cpu._init_amx())
    return CpuMatrixUnits(amx_bf16=amx, avx512_bf16="avx512_bf16" in flags, onednn_bf16=onednn)


@dataclass(frozen=True)
class CudaCapability:
    """What decides a CUDA card's precision: its name and compute capability."""

    name: str
    major: int
    minor: int

    @property
    def bf16(self) -> bool:
        """bf16 tensor cores exist from Ampere (8.0) on; on 7.x PyTorch refuses bf16 autocast."""
        return self.major >= 8

    @property
    def fp16(self) -> bool:
        """fp16 tensor cores exist from Volta (7.0) on."""
        return self.major >= 7


def cuda_capability(device: torch.device) -> CudaCapability:
    import torch

    index = device.index if device.index is not None else torch.cuda.current_device()
    major, minor = torch.cuda.get_device_capability(index)
    return CudaCapability(torch.cuda.get_device_name(index), major, minor)


# ------------------------------------------------------------------------------------- the decision
@dataclass(frozen=True)
class PrecisionChoice:
    """The precision and memory format a run computes in, and why (one line for logs and model cards)."""

    precision: str
    channels_last: bool
    reason: str
    #: Milliseconds per measured step of each candidate (``"bf16/channels_last": 61.2``), when measured.
    timings_ms: dict[str, float] | None = None

    def describe(self) -> str:
        layout = "channels_last" if self.channels_last else "contiguous"
        return f"{self.precision}, {layout}: {self.reason}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "precision": self.precision,
            "channels_last": self.channels_last,
            "reason": self.reason,
            "timings_ms": dict(self.timings_ms) if self.timings_ms else None,
        }


#: ``measure(precision, channels_last) -> seconds`` of one representative step of the actual network.
Measure = Callable[[str, bool], float]


def check_precision_wish(wish: str, where: str = "precision") -> str:
    if wish not in PRECISION_WISHES:
        raise ConfigError(f"{where} must be one of {', '.join(PRECISION_WISHES)}, got {wish!r}")
    return wish


def choose_precision(
    device: torch.device | str,
    wish: str,
    *,
    channels_last: bool = True,
    measure: Measure | None = None,
    units: CpuMatrixUnits | None = None,
    cuda: CudaCapability | None = None,
    formats: tuple[bool, ...] = (True, False),
) -> PrecisionChoice:
    """Decide the precision (and, on a CPU under ``auto``, the memory format) for ``device``.

    ``channels_last`` is the recipe's memory format, kept unless a CPU measurement picks the other one.
    ``units`` / ``cuda`` describe the hardware (detected when None; tests pass a T4, an A100, an AMX CPU).
    ``device`` may be a device type (``"cuda"``, ``"cpu"``) when both are given (``medsynth info``).
    ``formats``: the channels_last settings worth measuring (``(True,)`` where the memory format plays no
    part, e.g. 3D sliding-window synthesis); the recipe's ``channels_last`` must be among them.
    """
    check_precision_wish(wish)
    kind = device if isinstance(device, str) else device.type
    if kind == "cuda":
        if cuda is None:
            import torch

            cuda = cuda_capability(torch.device(device))
        return _choose_cuda(wish, channels_last, cuda)
    if wish == "fp16":
        raise ConfigError("fp16 autocast is for CUDA cards; on a CPU use bf16, fp32 or auto")
    units = units or cpu_matrix_units()
    unit = units.bf16_unit
    if wish == "fp32":
        return PrecisionChoice("fp32", channels_last, "fp32 asked for")
    if wish == "bf16":
        if unit is None:
            return PrecisionChoice(
                "bf16", channels_last, "bf16 asked for; this CPU has no bf16 matrix unit, so it is emulated and "
                "likely slower than fp32",
            )  # fmt: skip
        return PrecisionChoice("bf16", channels_last, f"bf16 asked for ({unit})")
    if unit is None:
        return PrecisionChoice(
            "fp32", channels_last, "no bf16 matrix unit on this CPU (no AMX, no AVX-512 BF16)"
        )
    if measure is None:
        return PrecisionChoice("fp32", channels_last, f"{unit} present, but nothing was measured")
    timings = {
        f"{precision}/{'channels_last' if layout else 'contiguous'}": 1000.0 * measure(precision, layout)
        for precision in ("fp32", "bf16")
        for layout in formats
    }
    given = f"fp32/{'channels_last' if channels_last else 'contiguous'}"
    fp32_key = min((k for k in timings if k.startswith("fp32")), key=timings.__getitem__)
    if timings[given] < BF16_MIN_GAIN * timings[fp32_key]:
        fp32_key = given  # the recipe's format unless the other is clearly faster: no flip on noise
    bf16_key = min((k for k in timings if k.startswith("bf16")), key=timings.__getitem__)
    if timings[fp32_key] < MIN_MEASURED_MS:
        reason = f"{unit} present, but a step takes {timings[fp32_key]:.1f} ms in fp32: too short for bf16 to matter"
        return PrecisionChoice("fp32", channels_last, reason, timings)
    gain = timings[fp32_key] / timings[bf16_key]
    best = bf16_key if gain >= BF16_MIN_GAIN else fp32_key
    precision, layout = best.split("/")
    verdict = "faster" if best == bf16_key else f"not {BF16_MIN_GAIN:g}x faster"
    reason = (
        f"{unit}: bf16 {timings[bf16_key]:.0f} ms vs fp32 {timings[fp32_key]:.0f} ms per step "
        f"({gain:.2f}x, {verdict}; measured on this network)"
    )
    return PrecisionChoice(precision, layout == "channels_last", reason, timings)


def _choose_cuda(wish: str, channels_last: bool, card: CudaCapability) -> PrecisionChoice:
    where = f"{card.name}, compute capability {card.major}.{card.minor}"
    if wish == "fp32":
        return PrecisionChoice("fp32", channels_last, f"fp32 asked for ({where})")
    if wish in ("auto", "bf16") and card.bf16:
        return PrecisionChoice("bf16", channels_last, f"bf16 autocast ({where})")
    if card.fp16:
        why = "bf16 needs compute capability 8.0" if wish in ("auto", "bf16") else "fp16 asked for"
        return PrecisionChoice(
            "fp16", channels_last, f"fp16 autocast with a gradient scaler ({where}; {why})"
        )
    return PrecisionChoice("fp32", channels_last, f"fp32: no tensor cores for bf16 or fp16 ({where})")


def time_call(step: Callable[[], Any], *, warmup: int = 1, repeats: int = 3) -> float:
    """Seconds of the fastest of ``repeats`` calls of ``step`` after ``warmup`` calls (the minimum: the
    measurement is a comparison, and noise from a busy machine only ever adds time)."""
    for _ in range(warmup):
        step()
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        step()
        best = min(best, time.perf_counter() - started)
    return best


# ------------------------------------------------------------------------------------- autocast
def autocast_dtype(device: torch.device, precision: str) -> torch.dtype | None:
    """The dtype :func:`autocast` computes convolutions in, or None where it does nothing (fp32)."""
    import torch

    if device.type not in ("cuda", "cpu"):
        return None
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    if device.type == "cpu" and dtype is not torch.bfloat16:
        return None  # fp16 on a CPU is refused by choose_precision; old plans saying fp16 run in fp32
    return dtype


def autocast(device: torch.device, precision: str, *, cache: bool = True) -> Any:
    """Autocast to ``precision`` on ``device`` (a no-op context for fp32).

    ``cache=False`` disables autocast's cache of low-precision weight copies, which a CUDA graph capture
    requires (:mod:`medsynth.engine.graphs`).
    """
    import torch

    dtype = autocast_dtype(device, precision)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype, cache_enabled=cache)
