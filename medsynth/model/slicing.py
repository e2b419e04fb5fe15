"""Whole-volume synthesis with a 2D generator, slice by slice (2D or 2.5D).

Works on normalised arrays stored slice-axis first (``(n_slices, H, W)``): the layout of the
preprocessed cache. Only the head's bounding box is computed: slices without foreground and the air
around the head are filled with the background value (-1 in normalised space) instead of being pushed
through the network.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from ..data.datasets import crop_plane, round_up, window_slices
from ..data.masks import bounding_box
from ..losses import LOG_SCALE_RANGE
from .device import autocast
from .layout import InputLayout
from .memory import BatchBackoff

BACKGROUND = -1.0


def context_indices(n_slices: int, context: int) -> np.ndarray:
    """For every slice, the indices of its ``context`` neighbours (edge slices replicated)."""
    half = context // 2
    offsets = np.arange(-half, half + 1)
    return np.clip(np.arange(n_slices)[:, None] + offsets[None, :], 0, n_slices - 1)


@torch.inference_mode()
def synthesize_slices(
    generator: torch.nn.Module,
    images: Mapping[str, np.ndarray],
    mask: np.ndarray,
    *,
    layout: InputLayout,
    target: str | None = None,
    batch_size: int = 16,
    device: torch.device | str = "cpu",
    precision: str = "fp32",
    channels_last: bool = True,
    flip_tta: bool = False,
    progress: bool = False,
    margin: int = 4,
    window: Sequence[int] | None = None,
    with_scale: bool = False,
    backoff: BatchBackoff | None = None,
) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """Synthesise a slice-first normalised volume from slice-first normalised inputs.

    ``images`` maps the given modalities to arrays of one shape; ``layout`` turns them into network
    channels (``target`` names what a unified model should produce). ``mask`` (same shape) is the
    foreground of the inputs; only its bounding box is computed. ``window`` is the training crop:
    slices are framed like training samples — a window of that size (grown to a multiple of 16 when the
    head is larger) centred on the head, padded with background — because instance and batch statistics
    depend on how much air surrounds the head. ``flip_tta`` averages the prediction with that of the
    left-right flipped input. ``precision`` and ``channels_last`` are the model's choice
    (:attr:`SynthesisModel.precision`). ``with_scale`` (a generator with a scale channel, ``plan.scale_channel``)
    also returns ``b = exp(channel 1)``, the predicted Laplace scale in normalised units (0 outside the
    computed box). An out-of-memory halves the batch and retries the same slices (``backoff``, else a
    new :class:`~.memory.BatchBackoff` of ``batch_size``; the caller may keep it for its next volume).
    """
    device = torch.device(device)
    shape = next(iter(images.values())).shape
    output = np.full(shape, BACKGROUND, dtype=np.float32)
    scale = np.zeros(shape, dtype=np.float32)
    if not mask.any():
        return (output, scale) if with_scale else output
    box = bounding_box(mask)
    extent = [b.stop - b.start for b in box[1:]]
    # Without a training window, the head's box grown by ``margin`` in-plane is the frame.
    size = (
        [max(int(w), round_up(e, 16)) for w, e in zip(window, extent, strict=True)]
        if window
        else [e + 2 * margin for e in extent]
    )
    centre = [(b.start + b.stop) // 2 for b in box[1:]]
    grid, inside = window_slices(centre, size, shape[1:])
    cropped = {m: crop_plane(np.asarray(image), centre, size, BACKGROUND) for m, image in images.items()}
    slice_ids = np.arange(box[0].start, box[0].stop)
    neighbours = context_indices(shape[0], layout.context)
    generator.eval()
    # Predictions stay on the device and come back in one copy per volume: a copy per batch would
    # make the host wait for every batch, leaving the GPU idle while the next one is assembled.
    rows, cols = (s.stop - s.start for s in inside)
    result = torch.empty((len(slice_ids), rows, cols), dtype=torch.float32, device=device)
    log_scale = torch.empty_like(result) if with_scale else None
    pin = device.type == "cuda"
    backoff = backoff or BatchBackoff(batch_size, what="inference batch", device=device)
    bar = tqdm(
        total=len(slice_ids), desc="slices", unit="slice", disable=None if progress else True, leave=False
    )
    start = 0
    while start < len(slice_ids):
        chunk = slice_ids[start : start + backoff.batch]
        try:
            prediction = _predict(
                generator, layout, cropped, neighbours[chunk], target, device, pin, precision, channels_last,
                flip_tta,
            )  # fmt: skip
        except torch.OutOfMemoryError:
            prediction = None
        if prediction is None:  # outside the except block, so the failed attempt's tensors are gone
            backoff.shrink()
            continue
        backoff.settled()
        result[start : start + len(chunk)] = prediction[:, 0, inside[0], inside[1]].float()
        if log_scale is not None:
            log_scale[start : start + len(chunk)] = prediction[:, 1, inside[0], inside[1]].float()
        start += len(chunk)
        bar.update(len(chunk))
    bar.close()
    output[slice_ids[0] : slice_ids[-1] + 1, grid[0], grid[1]] = result.cpu().numpy()
    if log_scale is None:
        return output
    scale[slice_ids[0] : slice_ids[-1] + 1, grid[0], grid[1]] = scale_from_log(log_scale).cpu().numpy()
    return output, scale


def _predict(
    generator: torch.nn.Module,
    layout: InputLayout,
    cropped: Mapping[str, np.ndarray],
    neighbours: np.ndarray,
    target: str | None,
    device: torch.device,
    pin: bool,
    precision: str,
    channels_last: bool,
    flip_tta: bool,
) -> torch.Tensor:
    """The generator's output for one batch of slices (``neighbours``: their context slices)."""
    stacks = {m: image[neighbours] for m, image in cropped.items()}  # (B, context, H, W)
    host = torch.from_numpy(layout.assemble(stacks, target))
    batch = (host.pin_memory() if pin else host).to(device, non_blocking=True)
    batch = batch.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    with autocast(device, precision):
        prediction = generator(batch)
        if flip_tta:
            prediction = 0.5 * (prediction + generator(batch.flip(-2)).flip(-2))
    return prediction


def scale_from_log(log_scale: torch.Tensor) -> torch.Tensor:
    """A generator's log-scale channel -> the Laplace scale ``b``, bounded as in training."""
    return torch.exp(log_scale.clamp(*LOG_SCALE_RANGE))
