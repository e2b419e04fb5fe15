"""Whole-volume synthesis with a 3D generator: overlapping patches blended with a Gaussian window.

MONAI's ``sliding_window_inference`` does the tiling and Gaussian-weighted blending; this module only
restricts it to the head's bounding box (no FLOPs on air) and fills the rest with the background.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from monai.inferers import sliding_window_inference

from ..data.masks import bounding_box
from .device import autocast
from .memory import BatchBackoff
from .slicing import BACKGROUND, scale_from_log


@torch.inference_mode()
def synthesize_patches(
    generator: torch.nn.Module,
    images: Sequence[np.ndarray],
    mask: np.ndarray,
    *,
    patch_size: Sequence[int],
    overlap: float = 0.5,
    batch_size: int = 2,
    device: torch.device | str = "cpu",
    precision: str = "fp32",
    progress: bool = False,
    margin: int = 4,
    with_scale: bool = False,
    backoff: BatchBackoff | None = None,
) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """Synthesise a canonical ``(I, J, K)`` normalised volume from same-shaped normalised inputs.

    ``with_scale``: also the Laplace scale ``b`` of a generator's channel 1 (0 outside the box). An
    out-of-memory halves the windows per forward pass and starts the volume again (``backoff``, else a
    new :class:`~.memory.BatchBackoff` of ``batch_size``).
    """
    output = np.full(images[0].shape, BACKGROUND, dtype=np.float32)
    scale = np.zeros(images[0].shape, dtype=np.float32)
    if not mask.any():
        return (output, scale) if with_scale else output
    box = bounding_box(mask, margin=margin)
    stack = np.stack([np.asarray(image)[box] for image in images])[None]
    # Pad boxes smaller than a patch: sliding_window_inference pads too, but with zeros, not background.
    pad = [(0, 0), (0, 0)] + [
        (0, max(int(p) - s, 0)) for p, s in zip(patch_size, stack.shape[2:], strict=True)
    ]
    padded = np.pad(stack, pad, constant_values=BACKGROUND)
    generator.eval()
    device = torch.device(device)
    backoff = backoff or BatchBackoff(batch_size, what="inference batch (3D windows)", device=device)
    result = None
    while result is None:
        try:
            with autocast(device, precision):
                result = sliding_window_inference(
                    torch.from_numpy(np.ascontiguousarray(padded, dtype=np.float32)).to(device),
                    roi_size=tuple(int(p) for p in patch_size),
                    sw_batch_size=backoff.batch,
                    predictor=generator,
                    overlap=overlap,
                    mode="gaussian",
                    padding_mode="replicate",
                    progress=progress,
                )
        except torch.OutOfMemoryError:
            result = None
        if result is None:  # outside the except block, so the failed attempt's tensors are gone
            backoff.shrink()
    backoff.settled()
    crop = tuple(slice(0, s) for s in stack.shape[2:])
    output[box] = result[0, 0][crop].float().cpu().numpy()
    if not with_scale:
        return output
    scale[box] = scale_from_log(result[0, 1][crop].float()).cpu().numpy()
    return output, scale


def window_starts(size: int, patch: int, overlap: float) -> list[int]:
    """First voxel of every window along one axis of a box of ``size`` voxels, as MONAI tiles it.

    For drawing where windows meet (seams) and for tests: the step is ``int(patch * (1 - overlap))``
    (at least 1; ``patch`` when the axis is one window), the last window ends on the box's end.

    Example:
        >>> window_starts(100, 48, 0.5)
        [0, 24, 48, 52]
    """
    if size <= patch:
        return [0]
    step = max(int(patch * (1 - overlap)), 1)
    count = -(-(size - patch) // step) + 1
    return sorted({min(n * step, size - patch) for n in range(count)})
