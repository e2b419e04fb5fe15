"""Name -> network class, so a config or a checkpoint can rebuild a network from plain data.

``build_generator(name, **model.init_args)`` recreates any generator; unknown names and unknown
arguments raise :class:`~medsynth.errors.ConfigError` listing what is valid.
"""

from __future__ import annotations

import inspect
from typing import Any

from torch import nn

from ..errors import ConfigError
from .patchgan import PatchGAN
from .resvit import ResViT
from .unet import UNet

GENERATORS: dict[str, type[nn.Module]] = {"unet": UNet, "resvit": ResViT}
CRITICS: dict[str, type[nn.Module]] = {"patchgan": PatchGAN}


def _build(kind: str, table: dict[str, type[nn.Module]], name: str, init_args: dict[str, Any]) -> nn.Module:
    cls = table.get(str(name).lower())
    if cls is None:
        raise ConfigError(f"unknown {kind} {name!r}; choose one of: {', '.join(sorted(table))}")
    parameters = inspect.signature(cls).parameters
    unknown = sorted(set(init_args) - set(parameters))
    if unknown:
        raise ConfigError(
            f"unknown argument(s) {', '.join(unknown)} for {kind} {name!r}; valid: {', '.join(parameters)}"
        )
    missing = [
        arg
        for arg, parameter in parameters.items()
        if parameter.default is inspect.Parameter.empty and arg not in init_args
    ]
    if missing:
        raise ConfigError(f"{kind} {name!r} needs the argument(s) {', '.join(missing)}")
    return cls(**init_args)


def build_generator(name: str, **init_args: Any) -> nn.Module:
    """Build the generator registered as ``name`` (``unet``, ``resvit``) from its constructor arguments."""
    return _build("generator", GENERATORS, name, init_args)


def build_critic(name: str, **init_args: Any) -> nn.Module:
    """Build the critic registered as ``name`` (``patchgan``) from its constructor arguments."""
    return _build("critic", CRITICS, name, init_args)
