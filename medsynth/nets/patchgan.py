"""The pix2pix PatchGAN critic ("NLayerDiscriminator"), 2D or 3D.

It is conditional: its input is the source channels concatenated with a real or a synthetic target,
so it judges whether the target fits *this* source. It outputs a map of raw scores, one per
overlapping patch (70x70 for ``n_layers=3``), for the least-squares loss of :mod:`medsynth.losses`.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm as apply_spectral_norm

from ..errors import ConfigError
from .blocks import LEAKY_RELU, ConvNormAct, check_choice, check_positive_int, init_weights

#: pix2pix caps the critic's width at 8x the base filters.
MAX_MULTIPLIER = 8


class PatchGAN(nn.Module):
    """pix2pix PatchGAN critic returning raw (pre-sigmoid) patch scores.

    Args:
        spatial_dims: 2 or 3.
        in_channels: source channels + target channels (the critic sees both).
        base_channels: filters of the first layer; doubled per stride-2 layer up to 8x.
        n_layers: number of stride-2 layers; 3 gives the 70x70 receptive field of pix2pix.
        norm: ``"instance"``, ``"batch"`` or ``"none"`` (usual with spectral norm).
        spectral_norm: constrain every convolution's spectral norm (Miyato et al.), which steadies
            training at the cost of one power iteration per layer and step.

    Example:
        >>> critic = PatchGAN(2, in_channels=2, base_channels=8)
        >>> critic.receptive_field(), critic(torch.zeros(1, 2, 64, 64)).shape
        (70, torch.Size([1, 1, 6, 6]))
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        *,
        base_channels: int = 64,
        n_layers: int = 3,
        norm: str = "instance",
        spectral_norm: bool = False,
    ) -> None:
        super().__init__()
        check_choice("PatchGAN", "spatial_dims", spatial_dims, (2, 3))
        check_positive_int(
            "PatchGAN", in_channels=in_channels, base_channels=base_channels, n_layers=n_layers
        )
        check_choice("PatchGAN", "norm", norm, ("instance", "batch", "none"))
        check_choice("PatchGAN", "spectral_norm", spectral_norm, (True, False))
        self.init_args = {
            "spatial_dims": spatial_dims,
            "in_channels": in_channels,
            "base_channels": base_channels,
            "n_layers": n_layers,
            "norm": norm,
            "spectral_norm": bool(spectral_norm),
        }
        widths = [base_channels * min(2**layer, MAX_MULTIPLIER) for layer in range(n_layers + 1)]
        layers = [
            ConvNormAct(
                spatial_dims, in_channels, widths[0], kernel_size=4, stride=2, padding=1, act=LEAKY_RELU
            )
        ]
        for layer in range(1, n_layers + 1):
            layers.append(
                ConvNormAct(
                    spatial_dims,
                    widths[layer - 1],
                    widths[layer],
                    kernel_size=4,
                    stride=2 if layer < n_layers else 1,
                    padding=1,
                    norm=norm,
                    act=LEAKY_RELU,
                )
            )
        layers.append(ConvNormAct(spatial_dims, widths[-1], 1, kernel_size=4, padding=1))
        self.layers = nn.Sequential(*layers)
        init_weights(self)
        if spectral_norm:
            for conv in self._convs():
                apply_spectral_norm(conv)

    def _convs(self) -> list[nn.Module]:
        return [block[0] for block in self.layers]

    def receptive_field(self) -> int:
        """Side, in input voxels, of the patch that one output score sees (70 for pix2pix's critic)."""
        field = 1
        for conv in reversed(self._convs()):
            field = (field - 1) * conv.stride[0] + conv.kernel_size[0]
        return field

    def min_input_size(self) -> int:
        """Smallest input side (voxels) for which the critic still returns at least one score."""
        size = 1
        for conv in reversed(self._convs()):
            size = (size - 1) * conv.stride[0] + conv.kernel_size[0] - 2 * conv.padding[0]
        return size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Score ``(B, in_channels, *size)``; returns ``(B, 1, *patch_grid)`` raw scores."""
        minimum = self.min_input_size()
        if min(x.shape[2:]) < minimum:
            size = "x".join(str(s) for s in x.shape[2:])
            raise ConfigError(
                f"PatchGAN: an input of {size} voxels is smaller than this critic's minimum of {minimum} a side "
                f"(n_layers={self.init_args['n_layers']}); use larger slices/patches or fewer critic layers"
            )
        return self.layers(x)
