"""Networks built from a recipe's ``model`` section and the input layout the task implies."""

from __future__ import annotations

from torch import nn

from ..config import ModelConfig
from ..errors import ConfigError
from ..nets.registry import build_critic, build_generator
from .plan import NetworkSpec


def build_model_generator(model: ModelConfig, in_channels: int) -> tuple[nn.Module, NetworkSpec]:
    """The generator, initialised from ``model.generator_weights`` when set, and its spec for the plan."""
    generator = build_generator(
        model.generator,
        spatial_dims=model.spatial_dims,
        in_channels=in_channels,
        out_channels=1,
        **model.generator_args,
    )
    if model.generator_weights:
        if not hasattr(generator, "load_pretrained"):
            raise ConfigError(
                f"model.generator_weights: the {model.generator} generator has no initialisation from a file; use resvit"
            )
        generator.load_pretrained(model.generator_weights)
    return generator, NetworkSpec(model.generator, dict(generator.init_args))


def build_model_critic(model: ModelConfig, in_channels: int) -> nn.Module:
    """The conditional critic: it sees the generator's input channels plus the real or synthetic target."""
    return build_critic(
        model.critic, spatial_dims=model.spatial_dims, in_channels=in_channels + 1, **model.critic_args
    )
