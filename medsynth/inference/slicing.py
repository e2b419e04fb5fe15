"""Whole-volume synthesis with a 2D generator, slice by slice (2D or 2.5D).

Shared by validation during training, ``medsynth evaluate`` and ``medsynth infer`` so that all three
see exactly the same computation. Works on normalised, canonical arrays stored slice-axis first
(``(n_slices, H, W)``): the layout of the preprocessed cache.

Only the head's bounding box is computed: slices without foreground and the air around the head are
filled with the background value (-1 in normalised space) instead of being pushed through the network.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from ..data.datasets import crop_plane, round_up, window_slices
from ..data.masks import bounding_box

BACKGROUND = -1.0


def context_indices(n_slices: int, context: int) -> np.ndarray:
    """For every slice, the indices of its ``context`` neighbours (edge slices replicated)."""
    half = context // 2
    offsets = np.arange(-half, half + 1)
    return np.clip(np.arange(n_slices)[:, None] + offsets[None, :], 0, n_slices - 1)


def assemble_channels(
    images: Sequence[np.ndarray], slices: np.ndarray, context: int, planes: np.ndarray | None = None
) -> np.ndarray:
    """Network input for the given slices: per image its ``context`` neighbours, then constant planes.

    ``images`` are slice-first arrays of equal shape; the channel order is image-major
    (image 0's neighbours, image 1's neighbours, ...) followed by ``planes`` (one constant value each,
    used by unified models for availability and target codes). Returns ``(len(slices), C, H, W)``.
    """
    neighbours = context_indices(images[0].shape[0], context)[slices]  # (B, context)
    stacks = [np.asarray(image)[neighbours] for image in images]  # each (B, context, H, W)
    parts = stacks
    if planes is not None and len(planes):
        batch, _, height, width = stacks[0].shape
        parts = [*stacks, np.broadcast_to(planes[None, :, None, None], (batch, len(planes), height, width))]
    return np.ascontiguousarray(np.concatenate(parts, axis=1), dtype=np.float32)


@torch.inference_mode()
def synthesize_slices(
    generator: torch.nn.Module,
    images: Sequence[np.ndarray],
    mask: np.ndarray,
    *,
    context: int = 1,
    planes: np.ndarray | None = None,
    batch_size: int = 16,
    device: torch.device | str = "cpu",
    amp: bool = False,
    flip_tta: bool = False,
    progress: bool = False,
    margin: int = 4,
    window: Sequence[int] | None = None,
) -> np.ndarray:
    """Synthesise a slice-first normalised volume from slice-first normalised inputs.

    ``mask`` (same shape) is the foreground of the inputs; only its bounding box is computed.
    ``window`` is the training crop: slices are framed like training samples — a window of that size
    (grown to a multiple of 16 when the head is larger) centred on the head, padded with background —
    because instance normalisation makes the output depend on how much air surrounds the head.
    ``flip_tta`` averages the prediction with that of the left-right flipped input.
    """
    device = torch.device(device)
    output = np.full(images[0].shape, BACKGROUND, dtype=np.float32)
    if not mask.any():
        return output
    box = bounding_box(mask)
    extent = [b.stop - b.start for b in box[1:]]
    # Without a training window, the head's box grown by ``margin`` in-plane is the frame.
    size = (
        [max(int(w), round_up(e, 16)) for w, e in zip(window, extent, strict=True)]
        if window
        else [e + 2 * margin for e in extent]
    )
    centre = [(b.start + b.stop) // 2 for b in box[1:]]
    grid, inside = window_slices(centre, size, images[0].shape[1:])
    cropped = [crop_plane(np.asarray(image), centre, size, BACKGROUND) for image in images]
    slice_ids = np.arange(box[0].start, box[0].stop)
    generator.eval()
    # Mixed precision only on CUDA: bf16 on these CPUs is emulated and slower than fp32.
    use_amp = amp and device.type == "cuda"
    autocast = (
        torch.autocast(device_type="cuda", dtype=torch.float16) if use_amp else contextlib.nullcontext()
    )
    batches = range(0, len(slice_ids), batch_size)
    for start in tqdm(batches, desc="slices", unit="batch", disable=None if progress else True, leave=False):
        chunk = slice_ids[start : start + batch_size]
        batch = torch.from_numpy(assemble_channels(cropped, chunk, context, planes)).to(device)
        batch = batch.contiguous(memory_format=torch.channels_last)
        with autocast:
            prediction = generator(batch)
            if flip_tta:
                prediction = 0.5 * (prediction + generator(batch.flip(-2)).flip(-2))
        output[chunk, grid[0], grid[1]] = prediction[:, 0, inside[0], inside[1]].float().cpu().numpy()
    return output


def unified_planes(modalities: Sequence[str], inputs: Sequence[str], target: str) -> np.ndarray:
    """Constant planes of a unified model's input: availability of each modality, then the target's one-hot.

    Matches :func:`medsynth.data.datasets.unified_input`, whose image channels are zero for absent inputs.
    """
    available = [1.0 if m in inputs else 0.0 for m in modalities]
    one_hot = [1.0 if m == target else 0.0 for m in modalities]
    return np.asarray(available + one_hot, dtype=np.float32)
