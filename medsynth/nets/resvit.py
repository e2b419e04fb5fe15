"""ResViT generator (Dalmaz, Yurt, Cukur, "ResViT: Residual vision transformers for multi-modal medical
image synthesis", IEEE TMI 2022), 2D or 3D.

A convolutional encoder (7x7 convolution, then ``n_downsampling`` stride-2 convolutions) feeds a
bottleneck of aggregated residual transformer (ART) blocks and a mirrored convolutional decoder. Every
ART block is a residual CNN block; the selected ones first run a transformer module on their input,
concatenate its output with the input and compress the channels back. Two layouts of that path:

* ``art_style="paper"`` (the published model, Dalmaz et al.'s reference code): each transformer-carrying
  block has its own token path (``token_downsampling`` stride-2 convolutions, a patch embedding with a
  learned positional embedding, transposed convolutions back to the feature map) and a residual
  channel-compression block (3x3 conv-norm-ReLU-3x3 conv-norm plus a 1x1 projection, then ReLU); the
  transformer layers in between are one module shared by those blocks (``share_transformer=True``).
* ``art_style="compact"`` (medsynth's first version, the default so older checkpoints rebuild): the
  whole patch transformer, embedding included, is the shared module and a 1x1 convolution compresses.

Shared weights are held once by the generator (``model.transformer``) and handed to the blocks in
``forward``, so they exist (and are saved) once; ``share_transformer=False`` gives each block its own
(``model.transformers[n]`` for the n-th transformer-carrying block).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from monai.networks.layers import Conv
from torch import nn

from ..errors import CheckpointError, ConfigError
from .blocks import (
    RELU,
    ConvNormAct,
    check_choice,
    check_positive_int,
    crop_to,
    full_precision,
    init_weights,
    pad_to_multiple,
)

log = logging.getLogger("medsynth")

#: Input side the positional embedding is sized for when ``img_size`` is not given (the paper's).
DEFAULT_IMG_SIZE = 256


class PatchTransformer(nn.Module):
    """Vision transformer on a feature map: patch tokens -> self-attention layers -> same-size feature map.

    The learned positional embedding is stored on the token grid of the training size and resized
    (bilinear/trilinear) whenever another input size gives another grid, so any size works.
    """

    def __init__(
        self,
        spatial_dims: int,
        channels: int,
        *,
        patch_size: int,
        embed_dim: int,
        n_heads: int,
        mlp_ratio: float,
        n_layers: int,
        grid: Sequence[int],
    ) -> None:
        super().__init__()
        self.embed = Conv[Conv.CONV, spatial_dims](channels, embed_dim, patch_size, stride=patch_size)
        self.position = nn.Parameter(torch.empty(1, embed_dim, *grid))
        nn.init.trunc_normal_(self.position, std=0.02)
        self.encoder = _transformer_layers(embed_dim, n_heads, mlp_ratio, n_layers)
        # Projection back to the feature channels and up-sampling to the feature map in one step: the
        # exact transpose of the patch embedding's geometry.
        self.unembed = Conv[Conv.CONVTRANS, spatial_dims](embed_dim, channels, patch_size, stride=patch_size)
        self._interpolation = "bilinear" if spatial_dims == 2 else "trilinear"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.embed(x)
        batch, width, *grid = tokens.shape
        position = self.position
        if _exporting() or list(position.shape[2:]) != grid:  # an export follows the input's grid
            position = F.interpolate(position, size=grid, mode=self._interpolation, align_corners=False)
        tokens = self.encoder((tokens + position).flatten(2).transpose(1, 2))
        return self.unembed(tokens.transpose(1, 2).reshape(batch, width, *grid))


def _exporting() -> bool:
    """Traced or exported (medsynth export): the token grid is then symbolic, so always resize the
    positional embedding (an identity at the training grid) instead of branching on the size."""
    return torch.jit.is_tracing() or torch.compiler.is_exporting()


def _transformer_layers(embed_dim: int, n_heads: int, mlp_ratio: float, n_layers: int) -> nn.Module:
    """Pre-norm ViT layers with a final layer norm (the paper's ``Encoder``)."""
    layer = nn.TransformerEncoderLayer(
        embed_dim,
        n_heads,
        dim_feedforward=round(embed_dim * mlp_ratio),
        dropout=0.0,
        activation="gelu",
        batch_first=True,
        norm_first=True,
    )
    return nn.TransformerEncoder(layer, n_layers, norm=nn.LayerNorm(embed_dim), enable_nested_tensor=False)


class ChannelCompression(nn.Module):
    """The paper's channel compression: a residual block from ``in_channels`` to ``out_channels``."""

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int, *, norm: str) -> None:
        super().__init__()
        self.block = nn.Sequential(
            ConvNormAct(
                spatial_dims, in_channels, out_channels, kernel_size=3, padding=1, norm=norm, act=RELU
            ),
            ConvNormAct(spatial_dims, out_channels, out_channels, kernel_size=3, padding=1, norm=norm),
        )
        self.skip = ConvNormAct(spatial_dims, in_channels, out_channels, kernel_size=1, norm=norm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.block(x) + self.skip(x))


class TokenPath(nn.Module):
    """A paper-style ART block's own way into and out of the shared transformer layers.

    ``token_downsampling`` stride-2 convolutions (channels doubling), a ``patch_size`` patch embedding plus
    a learned positional embedding (resized for other grids, as in :class:`PatchTransformer`), and
    transposed convolutions back to the block's feature map.
    """

    def __init__(
        self,
        spatial_dims: int,
        channels: int,
        *,
        token_downsampling: int,
        patch_size: int,
        embed_dim: int,
        grid: Sequence[int],
        norm: str,
    ) -> None:
        super().__init__()
        down = [
            ConvNormAct(
                spatial_dims, channels * 2**level, channels * 2 ** (level + 1), kernel_size=3, stride=2,
                padding=1, norm=norm, act=RELU,
            )
            for level in range(token_downsampling)
        ]  # fmt: skip
        self.down = nn.Sequential(*down)
        deepest = channels * 2**token_downsampling
        self.embed = Conv[Conv.CONV, spatial_dims](deepest, embed_dim, patch_size, stride=patch_size)
        self.position = nn.Parameter(torch.empty(1, embed_dim, *grid))
        nn.init.trunc_normal_(self.position, std=0.02)
        up: list[nn.Module] = []
        width = embed_dim
        if patch_size > 1 or token_downsampling == 0:
            up.append(
                ConvNormAct(
                    spatial_dims, embed_dim, deepest, kernel_size=patch_size, stride=patch_size,
                    transposed=True, norm=norm, act=RELU,
                )
            )  # fmt: skip
            width = deepest
        for level in range(token_downsampling, 0, -1):
            up.append(
                ConvNormAct(
                    spatial_dims, width, channels * 2 ** (level - 1), kernel_size=3, stride=2, padding=1,
                    output_padding=1, transposed=True, norm=norm, act=RELU,
                )
            )  # fmt: skip
            width = channels * 2 ** (level - 1)
        self.up = nn.Sequential(*up)
        self._interpolation = "bilinear" if spatial_dims == 2 else "trilinear"

    def forward(self, x: torch.Tensor, layers: nn.Module) -> torch.Tensor:
        tokens = self.embed(self.down(x))
        batch, width, *grid = tokens.shape
        position = self.position
        if _exporting() or list(position.shape[2:]) != grid:  # an export follows the input's grid
            position = F.interpolate(position, size=grid, mode=self._interpolation, align_corners=False)
        tokens = layers((tokens + position).flatten(2).transpose(1, 2))
        return self.up(tokens.transpose(1, 2).reshape(batch, width, *grid))


class ARTBlock(nn.Module):
    """Aggregated residual transformer block: [transformer path -> concat -> compression] -> residual CNN.

    ``style`` is ``"compact"`` (1x1 compression; the transformer module includes its embedding) or
    ``"paper"`` (own :class:`TokenPath` and :class:`ChannelCompression`; the module is the layers only).
    """

    def __init__(
        self,
        spatial_dims: int,
        channels: int,
        *,
        norm: str,
        with_transformer: bool,
        style: str = "compact",
        token_path: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.tokens = (
            TokenPath(spatial_dims, channels, norm=norm, **(token_path or {}))
            if with_transformer and style == "paper"
            else None
        )
        if not with_transformer:
            self.compress: nn.Module | None = None
        elif style == "paper":
            self.compress = ChannelCompression(spatial_dims, 2 * channels, channels, norm=norm)
        else:
            self.compress = ConvNormAct(
                spatial_dims, 2 * channels, channels, kernel_size=1, norm=norm, act=RELU
            )
        self.residual = nn.Sequential(
            ConvNormAct(
                spatial_dims,
                channels,
                channels,
                kernel_size=3,
                padding=1,
                padding_mode="reflect",
                norm=norm,
                act=RELU,
            ),
            ConvNormAct(
                spatial_dims, channels, channels, kernel_size=3, padding=1, padding_mode="reflect", norm=norm
            ),
        )

    def forward(self, x: torch.Tensor, transformer: nn.Module | None) -> torch.Tensor:
        """Apply the block; ``transformer`` is the generator's (shared) module (used if this block has one)."""
        if self.compress is not None:
            branch = self.tokens(x, transformer) if self.tokens is not None else transformer(x)
            x = self.compress(torch.cat([branch, x], dim=1))
        return x + self.residual(x)


class ResViT(nn.Module):
    """ResViT generator; any input size of at least :meth:`min_input_size` a side works.

    Args:
        spatial_dims: 2 (the paper) or 3.
        in_channels, out_channels: source and synthesised channels.
        base_channels: filters after the first convolution; doubled by each down-sampling.
        n_downsampling: stride-2 convolutions before the ART bottleneck (the paper: 2).
        n_art_blocks: ART blocks in the bottleneck (the paper: 9).
        transformer_blocks: indices of the ART blocks that carry the (shared) transformer; the paper
            uses the first and the sixth. Empty gives the CNN-only model the paper pre-trains first.
        patch_size: side of the patches that become tokens, on the bottleneck feature map after
            ``token_downsampling``; the grid has ``size / 2**(n_downsampling + token_downsampling) /
            patch_size`` tokens a side (the paper, 256 px: 2 + 2 down-samplings and patch 1, 16x16 tokens).
        embed_dim, n_heads, mlp_ratio, n_transformer_layers: the transformer (ViT-B: 768, 12, 4, 12).
        norm: ``"instance"`` or ``"batch"`` (the paper's code: batch).
        img_size: the training input side (int or one per axis) that sizes the positional embedding;
            defaults to 256. Other sizes interpolate it.
        art_style: ``"paper"`` (per-block token paths and residual channel compression around shared
            transformer layers, as published) or ``"compact"`` (one shared patch transformer and a 1x1
            compression; the default only so that checkpoints saved before this option rebuild).
        share_transformer: one set of transformer weights for every transformer-carrying block (the
            paper), else one per block.
        token_downsampling: ``"paper"`` style only: stride-2 convolutions in each token path before the
            patch embedding (the paper: 2, channels 256 -> 512 -> 1024).

    Example:
        >>> net = ResViT(2, 1, 1, base_channels=8, n_art_blocks=2, transformer_blocks=(0,), embed_dim=16,
        ...              n_heads=2, n_transformer_layers=1, img_size=32)
        >>> net(torch.zeros(1, 1, 40, 56)).shape
        torch.Size([1, 1, 40, 56])
        >>> paper = ResViT(2, 1, 1, base_channels=4, n_art_blocks=6, transformer_blocks=(0, 5), patch_size=1,
        ...                embed_dim=16, n_heads=2, n_transformer_layers=1, img_size=32, art_style="paper")
        >>> paper(torch.zeros(1, 1, 32, 48)).shape
        torch.Size([1, 1, 32, 48])
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        out_channels: int,
        *,
        base_channels: int = 64,
        n_downsampling: int = 2,
        n_art_blocks: int = 9,
        transformer_blocks: Sequence[int] = (0, 5),
        patch_size: int = 2,
        embed_dim: int = 768,
        n_heads: int = 12,
        mlp_ratio: float = 4.0,
        n_transformer_layers: int = 12,
        norm: str = "instance",
        img_size: int | Sequence[int] | None = None,
        art_style: str = "compact",
        share_transformer: bool = True,
        token_downsampling: int = 2,
    ) -> None:
        super().__init__()
        check_choice("ResViT", "spatial_dims", spatial_dims, (2, 3))
        check_positive_int(
            "ResViT",
            in_channels=in_channels,
            out_channels=out_channels,
            base_channels=base_channels,
            n_downsampling=n_downsampling,
            n_art_blocks=n_art_blocks,
            patch_size=patch_size,
            embed_dim=embed_dim,
            n_heads=n_heads,
            n_transformer_layers=n_transformer_layers,
        )
        check_choice("ResViT", "norm", norm, ("instance", "batch"))
        check_choice("ResViT", "art_style", art_style, ("paper", "compact"))
        if not isinstance(share_transformer, bool):
            raise ConfigError(f"ResViT: share_transformer must be true or false, got {share_transformer!r}")
        if (
            isinstance(token_downsampling, bool)
            or not isinstance(token_downsampling, int)
            or token_downsampling < 0
        ):
            raise ConfigError(f"ResViT: token_downsampling must be an int >= 0, got {token_downsampling!r}")
        transformer_blocks = [int(index) for index in transformer_blocks]
        if len(set(transformer_blocks)) != len(transformer_blocks) or any(
            not 0 <= index < n_art_blocks for index in transformer_blocks
        ):
            raise ConfigError(
                f"ResViT: transformer_blocks must be distinct indices in 0..{n_art_blocks - 1} "
                f"(n_art_blocks={n_art_blocks}), got {transformer_blocks}"
            )
        if embed_dim % n_heads:
            raise ConfigError(f"ResViT: embed_dim ({embed_dim}) must be a multiple of n_heads ({n_heads})")
        if mlp_ratio <= 0:
            raise ConfigError(f"ResViT: mlp_ratio must be positive, got {mlp_ratio!r}")
        sizes = self._img_size(spatial_dims, img_size)
        self.init_args = {
            "spatial_dims": spatial_dims,
            "in_channels": in_channels,
            "out_channels": out_channels,
            "base_channels": base_channels,
            "n_downsampling": n_downsampling,
            "n_art_blocks": n_art_blocks,
            "transformer_blocks": transformer_blocks,
            "patch_size": patch_size,
            "embed_dim": embed_dim,
            "n_heads": n_heads,
            "mlp_ratio": float(mlp_ratio),
            "n_transformer_layers": n_transformer_layers,
            "norm": norm,
            "img_size": None if img_size is None else list(sizes),
            "art_style": art_style,
            "share_transformer": share_transformer,
            "token_downsampling": token_downsampling,
        }
        paper = art_style == "paper"
        #: Feature-map voxels per token side: the token paths' own down-sampling times the patch.
        self._token_stride = (2**token_downsampling if paper else 1) * patch_size
        # Padding the input to this multiple makes every down-sampling exact and the feature map a whole
        # number of patches, so the decoder lands on the input size.
        self._multiple = 2**n_downsampling * self._token_stride
        features = base_channels * 2**n_downsampling

        encoder = [
            ConvNormAct(
                spatial_dims,
                in_channels,
                base_channels,
                kernel_size=7,
                padding=3,
                padding_mode="reflect",
                norm=norm,
                act=RELU,
            )
        ]
        for level in range(n_downsampling):
            encoder.append(
                ConvNormAct(
                    spatial_dims,
                    base_channels * 2**level,
                    base_channels * 2 ** (level + 1),
                    kernel_size=3,
                    stride=2,
                    padding=1,
                    norm=norm,
                    act=RELU,
                )
            )
        self.encoder = nn.Sequential(*encoder)
        grid = [math.ceil(size / self._multiple) for size in sizes]

        def transformer() -> nn.Module:
            if paper:
                return _transformer_layers(embed_dim, n_heads, mlp_ratio, n_transformer_layers)
            return PatchTransformer(
                spatial_dims, features, patch_size=patch_size, embed_dim=embed_dim, n_heads=n_heads,
                mlp_ratio=mlp_ratio, n_layers=n_transformer_layers, grid=grid,
            )  # fmt: skip

        shared = share_transformer or len(transformer_blocks) <= 1
        #: The shared transformer (None when there is none or each block has its own).
        self.transformer = transformer() if transformer_blocks and shared else None
        #: One transformer per transformer-carrying block, in index order (``share_transformer=False``).
        self.transformers = (
            nn.ModuleList(transformer() for _ in transformer_blocks)
            if transformer_blocks and not shared
            else None
        )
        token_path = {
            "token_downsampling": token_downsampling,
            "patch_size": patch_size,
            "embed_dim": embed_dim,
            "grid": grid,
        }
        self.art_blocks = nn.ModuleList(
            ARTBlock(
                spatial_dims, features, norm=norm, with_transformer=index in transformer_blocks,
                style=art_style, token_path=token_path,
            )
            for index in range(n_art_blocks)
        )  # fmt: skip
        self._transformer_of = {index: position for position, index in enumerate(sorted(transformer_blocks))}
        decoder = []
        for level in range(n_downsampling, 0, -1):
            decoder.append(
                ConvNormAct(
                    spatial_dims,
                    base_channels * 2**level,
                    base_channels * 2 ** (level - 1),
                    kernel_size=3,
                    stride=2,
                    padding=1,
                    output_padding=1,
                    transposed=True,
                    norm=norm,
                    act=RELU,
                )
            )
        decoder.append(
            ConvNormAct(
                spatial_dims,
                base_channels,
                out_channels,
                kernel_size=7,
                padding=3,
                padding_mode="reflect",
                act=("tanh", {}),
            )
        )
        self.decoder = nn.Sequential(*decoder)
        init_weights(self)

    @staticmethod
    def _img_size(spatial_dims: int, img_size: int | Sequence[int] | None) -> tuple[int, ...]:
        if img_size is None:
            return (DEFAULT_IMG_SIZE,) * spatial_dims
        sizes = (img_size,) * spatial_dims if isinstance(img_size, int) else tuple(img_size)
        if len(sizes) != spatial_dims or any(
            isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in sizes
        ):
            raise ConfigError(
                f"ResViT: img_size must be a positive int or {spatial_dims} positive ints, got {img_size!r}"
            )
        return sizes

    def min_input_size(self) -> int:
        """Smallest input side: the feature map must hold one patch and 2 voxels (for reflection padding)."""
        return 2 ** self.init_args["n_downsampling"] * max(self._token_stride, 2)

    def transformer_of(self, index: int) -> nn.Module | None:
        """The transformer module ART block ``index`` uses (the shared one, its own, or None)."""
        if index not in self._transformer_of:
            return None
        if self.transformers is not None:
            return self.transformers[self._transformer_of[index]]
        return self.transformer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map ``(B, in_channels, *size)`` to ``(B, out_channels, *size)``."""
        minimum = self.min_input_size()
        if min(x.shape[2:]) < minimum:
            size = "x".join(str(s) for s in x.shape[2:])
            raise ConfigError(
                f"ResViT: an input of {size} voxels is smaller than the minimum of {minimum} a side "
                f"(2**n_downsampling * max(token side, 2)); use larger slices/patches or a smaller patch_size"
            )
        x, size = pad_to_multiple(x, self._multiple)
        x = self.encoder(x)
        for index, block in enumerate(self.art_blocks):
            x = block(x, self.transformer_of(index))
        x = self.decoder[:-1](x)
        with full_precision(x):  # the output layer in float32 under any autocast (model/device.py)
            return crop_to(self.decoder[-1](x.float()), size)

    def load_pretrained(self, source: str | Path | Mapping[str, torch.Tensor]) -> list[str]:
        """Initialise from a state dict or a local state-dict file (``torch.save(model.state_dict(), path)``).

        The weights may cover only part of this model: the paper first trains a CNN-only ResViT
        (``transformer_blocks=()``) and loads it into the full one (stage 2), so the names left unset are
        then the transformer path's only (the transformer, and the token paths and channel compression of
        the blocks that carry it). Every given tensor must exist here with the same shape. No downloads.
        Returns the names this model has that the weights lacked (left as they were).
        """
        if isinstance(source, Mapping):
            path = Path("<state dict>")
            state = dict(source)
        else:
            path = Path(source)
            if not path.is_file():
                raise CheckpointError(
                    "no such state-dict file; give the path of a saved ResViT state dict", path
                )
            try:
                state = torch.load(path, map_location="cpu", weights_only=True)
            except Exception as exc:  # torch raises many types for a corrupt or foreign file
                raise CheckpointError(
                    f"not a readable PyTorch state dict ({type(exc).__name__})", path
                ) from exc
        if not isinstance(state, dict) or not all(
            isinstance(value, torch.Tensor) for value in state.values()
        ):
            raise CheckpointError("this file is not a state dict (a mapping of names to tensors)", path)
        own = self.state_dict()
        foreign = [name for name in state if name not in own]
        reshaped = [name for name in state if name in own and state[name].shape != own[name].shape]
        if foreign or reshaped:
            example = foreign[0] if foreign else f"{reshaped[0]} {tuple(state[reshaped[0]].shape)}"
            raise CheckpointError(
                f"{len(foreign)} tensors unknown to this ResViT and {len(reshaped)} of another shape (e.g. "
                f"{example}); build the ResViT with the settings the file was saved from",
                path,
            )
        self.load_state_dict(state, strict=False)
        missing = [name for name in own if name not in state]
        if missing:
            log.warning(
                "%s: %d of %d tensors were not in the file and keep their initial values",
                path,
                len(missing),
                len(own),
            )
        return missing
