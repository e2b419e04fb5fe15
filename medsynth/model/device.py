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


def autocast(device: torch.device, precision: str) -> Any:
    """Autocast to the plan's precision on CUDA; fp32 elsewhere (bf16 is emulated and slower on CPUs)."""
    if device.type != "cuda" or precision not in _DTYPES:
        return contextlib.nullcontext()
    return torch.autocast(device_type="cuda", dtype=_DTYPES[precision])
