"""The pix2pix U-Net generator (Isola et al., CVPR 2017) for 2D slices and 3D patches.

Encoder: ``depth`` strided 4x4 convolutions (LeakyReLU 0.2, no norm on the first and the innermost
level), each halving the size. Decoder: transposed 4x4 convolutions (or resize + 3x3 convolution) with
ReLU, concatenating the encoder feature of the same size, dropout on the three levels under the
innermost one as pix2pix does, and a final ``tanh`` matching images normalised to [-1, 1].
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ..errors import ConfigError
from .blocks import (
    LEAKY_RELU,
    RELU,
    ConvNormAct,
    check_choice,
    check_positive_int,
    crop_to,
    full_precision,
    init_weights,
    pad_to_multiple,
)

#: pix2pix applies dropout in the decoder of the three levels right under the innermost one.
DROPOUT_LEVELS = 3


class UNet(nn.Module):
    """pix2pix U-Net; any input size works (padded to a multiple of ``2**depth``, output cropped back).

    Args:
        spatial_dims: 2 (slices) or 3 (patches).
        in_channels: source modalities (times slices, for 2.5D input).
        out_channels: synthesised channels (1 for one target).
        base_channels: filters of the first level; they double per level up to ``max_channels``.
        depth: number of down-sampling levels; pix2pix uses 8 for 256 px and 7 for 128 px. Pick it with
            :meth:`depth_for` so the bottleneck keeps a few voxels.
        max_channels: cap on the filters of deep levels.
        norm: ``"instance"`` (per-sample statistics, batch-size independent) or ``"batch"`` (pix2pix).
        dropout: decoder dropout probability on the levels under the innermost (pix2pix's noise source);
            0 disables it.
        upsample: ``"deconv"`` (transposed convolution, pix2pix) or ``"resize"`` (nearest-neighbour
            resize + 3x3 convolution, which avoids checkerboard artefacts).
        final_activation: ``"tanh"`` for targets in [-1, 1], ``None`` for an unbounded output, or
            ``"tanh_scale"`` for a mean and a scale (``out_channels=2``): channel 0 is the image in
            [-1, 1] (tanh), channel 1 an unbounded log-scale ``log b`` (a Laplace likelihood's scale,
            see :func:`medsynth.losses.laplace_nll`), the model's own voxel-wise uncertainty.

    Example:
        >>> net = UNet(2, in_channels=1, out_channels=1, base_channels=8, depth=UNet.depth_for((37, 53)))
        >>> net(torch.zeros(2, 1, 37, 53)).shape
        torch.Size([2, 1, 37, 53])
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        out_channels: int,
        *,
        base_channels: int = 64,
        depth: int = 8,
        max_channels: int = 512,
        norm: str = "instance",
        dropout: float = 0.5,
        upsample: str = "deconv",
        final_activation: str | None = "tanh",
        stem_channels: int = 0,
    ) -> None:
        super().__init__()
        check_choice("UNet", "spatial_dims", spatial_dims, (2, 3))
        check_positive_int(
            "UNet",
            in_channels=in_channels,
            out_channels=out_channels,
            base_channels=base_channels,
            depth=depth,
        )
        check_positive_int("UNet", minimum=base_channels, max_channels=max_channels)
        check_choice("UNet", "norm", norm, ("instance", "batch"))
        check_choice("UNet", "upsample", upsample, ("deconv", "resize"))
        check_choice("UNet", "final_activation", final_activation, ("tanh", "tanh_scale", None))
        if final_activation == "tanh_scale" and out_channels != 2:
            raise ConfigError(
                f"UNet: final_activation='tanh_scale' outputs a mean and a log-scale channel: "
                f"out_channels must be 2, got {out_channels}"
            )
        if stem_channels < 0:
            raise ConfigError(
                f"UNet: stem_channels must be >= 0 (0 = the pix2pix U-Net), got {stem_channels}"
            )
        if not 0.0 <= dropout < 1.0:
            raise ConfigError(f"UNet: dropout must be in [0, 1), got {dropout!r}")
        self.init_args = {
            "spatial_dims": spatial_dims,
            "in_channels": in_channels,
            "out_channels": out_channels,
            "base_channels": base_channels,
            "depth": depth,
            "max_channels": max_channels,
            "norm": norm,
            "dropout": float(dropout),
            "upsample": upsample,
            "final_activation": final_activation,
            "stem_channels": stem_channels,
        }
        self.depth = depth
        self.scale_channel = final_activation == "tanh_scale"
        channels = [min(base_channels * 2**level, max_channels) for level in range(depth)]

        # Encoder level i outputs channels[i] at 1/2**(i+1) of the input size. The first and the innermost
        # level have no norm (pix2pix); the innermost feeds the decoder, whose input pix2pix passes
        # through ReLU, so it ends in ReLU instead of LeakyReLU.
        self.encoder = nn.ModuleList()
        for level in range(depth):
            innermost = level == depth - 1
            self.encoder.append(
                ConvNormAct(
                    spatial_dims,
                    (stem_channels or in_channels) if level == 0 else channels[level - 1],
                    channels[level],
                    kernel_size=4,
                    stride=2,
                    padding=1,
                    norm="none" if level == 0 or innermost else norm,
                    act=RELU if innermost else LEAKY_RELU,
                )
            )

        # Decoder block for level i (innermost first) brings level i's size up to level i-1's; its output
        # is concatenated with encoder level i-1's feature.
        self.decoder = nn.ModuleList()
        for level in range(depth - 1, 0, -1):
            from_innermost = depth - 1 - level
            self.decoder.append(
                self._up(
                    spatial_dims,
                    channels[level] * (1 if from_innermost == 0 else 2),
                    channels[level - 1],
                    upsample,
                    norm=norm,
                    act=RELU,
                    dropout=dropout if 1 <= from_innermost <= DROPOUT_LEVELS else 0.0,
                )
            )
        final_act = ("tanh", {}) if final_activation == "tanh" else None
        head_channels = channels[0] * (1 if depth == 1 else 2)
        if stem_channels:
            # Full-resolution path: a 3x3 stem whose features skip to a 3x3 output layer. The pix2pix
            # U-Net computes nothing at full resolution, so even a voxel-wise intensity mapping must
            # be learnt through the downsampling path; the stem makes it direct and learning faster.
            self.stem = ConvNormAct(
                spatial_dims, in_channels, stem_channels, kernel_size=3, padding=1, act=LEAKY_RELU
            )
            self.head = self._up(
                spatial_dims, head_channels, stem_channels, upsample, norm=norm, act=RELU, dropout=0.0
            )
            self.output = ConvNormAct(
                spatial_dims, 2 * stem_channels, out_channels, kernel_size=3, padding=1, act=final_act
            )
        else:
            self.stem = None
            self.head = self._up(
                spatial_dims, head_channels, out_channels, upsample, norm="none", act=final_act, dropout=0.0
            )
            self.output = None
        init_weights(self)

    @staticmethod
    def _up(
        spatial_dims: int,
        in_channels: int,
        out_channels: int,
        upsample: str,
        *,
        norm: str,
        act: tuple[str, dict] | None,
        dropout: float,
    ) -> nn.Module:
        """One decoder step that doubles the spatial size."""
        if upsample == "deconv":
            return ConvNormAct(
                spatial_dims,
                in_channels,
                out_channels,
                kernel_size=4,
                stride=2,
                padding=1,
                transposed=True,
                norm=norm,
                act=act,
                dropout=dropout,
            )
        conv = ConvNormAct(
            spatial_dims,
            in_channels,
            out_channels,
            kernel_size=3,
            padding=1,
            norm=norm,
            act=act,
            dropout=dropout,
        )
        return nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"), conv)

    @staticmethod
    def depth_for(size: int | Sequence[int], min_bottleneck: int = 1, max_depth: int = 8) -> int:
        """The largest depth (at most ``max_depth``) whose bottleneck keeps ``min_bottleneck`` voxels a side.

        ``size`` is the input's spatial size (its smallest side decides). A deeper U-Net sees more
        context, but levels past a 1-voxel bottleneck only add padding.

        Example:
            >>> UNet.depth_for(256), UNet.depth_for((128, 160)), UNet.depth_for(40, min_bottleneck=4)
            (8, 7, 3)
        """
        smallest = min(size) if isinstance(size, Sequence) else size
        check_positive_int("UNet.depth_for", min_bottleneck=min_bottleneck, max_depth=max_depth)
        depth = 0
        while depth < max_depth and smallest // 2 ** (depth + 1) >= min_bottleneck:
            depth += 1
        if depth == 0:
            raise ConfigError(
                f"UNet: an input of {smallest} voxels a side is too small for a {min_bottleneck}-voxel "
                f"bottleneck; use slices or patches of at least {2 * min_bottleneck} voxels"
            )
        return depth

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map ``(B, in_channels, *size)`` to ``(B, out_channels, *size)`` for any ``size``."""
        x, size = pad_to_multiple(x, 2**self.depth)
        stem = self.stem(x) if self.stem is not None else None
        if stem is not None:
            x = stem
        skips = []
        for block in self.encoder:
            x = block(x)
            skips.append(x)
        skips.pop()  # the bottleneck is x itself
        for block in self.decoder:
            x = torch.cat([skips.pop(), block(x)], dim=1)
        if self.output is not None:
            x = self.head(x)
            with full_precision(x):  # the output layer in float32 under any autocast (model/device.py)
                x = self.output(torch.cat([stem, x], dim=1).float())
        else:
            with full_precision(x):
                x = self.head(x.float())
        if self.scale_channel:
            x = torch.cat([torch.tanh(x[:, :1]), x[:, 1:]], dim=1)
        return crop_to(x, size)
