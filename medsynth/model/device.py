"""Device choice and mixed precision, decided once for training and inference alike."""

from __future__ import annotations

import contextlib
from typing import Any

import torch

from ..errors import MedsynthError

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def pick_device(name: str) -> torch.device:
    """``auto`` means CUDA when present; asking for CUDA without one is a user error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise MedsynthError("--device cuda asked for, but no CUDA device is available; use --device cpu")
    return torch.device(name)


def autocast_dtype(device: torch.device, precision: str) -> torch.dtype | None:
    """The dtype :func:`autocast` computes convolutions in, or None where it does nothing (fp32)."""
    if device.type != "cuda":
        return None
    return _DTYPES.get(precision)


def autocast(device: torch.device, precision: str, *, cache: bool = True) -> Any:
    """Autocast to the plan's precision on CUDA; fp32 elsewhere (bf16 is emulated and slower on CPUs).

    ``cache=False`` disables autocast's cache of low-precision weight copies, which a CUDA graph capture
    requires (:mod:`medsynth.engine.graphs`).
    """
    dtype = autocast_dtype(device, precision)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type="cuda", dtype=dtype, cache_enabled=cache)
