"""Networks built from a recipe's ``model`` section and the input layout the task implies."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from ..config import ModelConfig
from ..errors import ConfigError
from ..nets.registry import build_critic, build_generator
from .plan import NetworkSpec


def build_model_generator(model: ModelConfig, in_channels: int) -> tuple[nn.Module, NetworkSpec]:
    """The generator, initialised from ``model.generator_weights`` when set, and its spec for the plan."""
    # model.predict_scale: channel 0 the image, channel 1 the log of its Laplace scale (the uncertainty).
    scale = {"out_channels": 2, "final_activation": "tanh_scale"} if model.predict_scale else {}
    generator = build_generator(
        model.generator,
        spatial_dims=model.spatial_dims,
        in_channels=in_channels,
        **{"out_channels": 1, **model.generator_args, **scale},
    )
    if model.generator_weights:
        if not hasattr(generator, "load_pretrained"):
            raise ConfigError(
                f"model.generator_weights: the {model.generator} generator has no initialisation from a file; use resvit"
            )
        generator.load_pretrained(initial_weights(model.generator_weights))
    return generator, NetworkSpec(model.generator, dict(generator.init_args))


def initial_weights(path: str | Path) -> Path | dict[str, Any]:
    """What ``model.generator_weights`` names: a run folder or medsynth checkpoint (its generator's
    weights, e.g. ResViT's stage-1 CNN-only run), else a plain state-dict file, passed on as a path.

    Example (the paper's two-stage ResViT training)::

        medsynth train --config demo_resvit_stage1 --data demo/data --runs-dir demo/runs --name resvit-s1
        medsynth train --config demo_resvit --data demo/data --runs-dir demo/runs --name resvit \
            --set model.generator_weights=demo/runs/resvit-s1
    """
    from .checkpoint import load_checkpoint, resolve_checkpoint

    path = Path(path)
    if path.is_dir():
        return dict(load_checkpoint(path)["generator_state"])
    if path.is_file():
        import torch

        try:
            payload = torch.load(resolve_checkpoint(path), map_location="cpu", weights_only=True)
        except Exception:  # not a torch file: the generator's own loader names the problem
            return path
        if isinstance(payload, dict) and isinstance(payload.get("generator_state"), dict):
            return dict(payload["generator_state"])
    return path


def build_model_critic(model: ModelConfig, in_channels: int) -> nn.Module:
    """The conditional critic: it sees the generator's input channels plus the real or synthetic target."""
    return build_critic(
        model.critic, spatial_dims=model.spatial_dims, in_channels=in_channels + 1, **model.critic_args
    )
