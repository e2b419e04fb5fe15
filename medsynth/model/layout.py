"""The network's input channels: the one builder used by training samples and by every synthesis.

Fixed tasks (``t1->t2``, ``t1,t2,pd->flair``) stack each source's ``context`` neighbouring slices,
source-major: all context slices of source 0, then source 1, ...

**Unified models** learn every "available subset -> missing modality" pair with one network. Their
layout is ``M x context`` image channels (zero where a modality is not given), ``M`` availability
planes (1/0) and ``M`` one-hot planes naming the target. Telling the network what is present and what
is wanted through extra input channels needs no change to any generator or critic, and the critic sees
it too because it is conditioned on the source.

Training (:class:`medsynth.data.datasets.SliceDataset`) and synthesis (:mod:`medsynth.model.slicing`)
both call :meth:`InputLayout.assemble` / :func:`assemble_unified`, so the two cannot drift apart.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from ..errors import MedsynthError


def assemble_unified(stack: np.ndarray, available: np.ndarray, target_index: np.ndarray) -> np.ndarray:
    """(B, M, context, H, W) images + (B, M) availability + (B,) target -> (B, M*context + 2M, H, W).

    Images of modalities marked unavailable are zeroed here, so a caller cannot leak them.
    """
    batch, count, context, height, width = stack.shape
    images = (stack * available[:, :, None, None, None]).reshape(batch, count * context, height, width)
    planes = np.broadcast_to(available[:, :, None, None], (batch, count, height, width))
    one_hot = np.eye(count, dtype=np.float32)[target_index]
    targets = np.broadcast_to(one_hot[:, :, None, None], (batch, count, height, width))
    return np.concatenate([images, planes, targets], axis=1).astype(np.float32, copy=False)


def assemble_fixed(stack: np.ndarray) -> np.ndarray:
    """(B, S, context, H, W) source images -> (B, S*context, H, W), source-major."""
    batch, count, context, height, width = stack.shape
    return np.ascontiguousarray(stack.reshape(batch, count * context, height, width), dtype=np.float32)


@dataclass(frozen=True)
class InputLayout:
    """Which images go into which channels.

    ``modalities``: the sources in order (fixed task) or every modality the model knows (unified).
    """

    modalities: tuple[str, ...]
    context: int = 1
    unified: bool = False

    @property
    def channels(self) -> int:
        """Generator input channels (the critic takes one more: the target or synthetic image)."""
        count = len(self.modalities)
        return count * self.context + (2 * count if self.unified else 0)

    def assemble(self, images: Mapping[str, np.ndarray], target: str | None = None) -> np.ndarray:
        """Network input from ``images``: {modality: (..., context, H, W)} -> (..., channels, H, W).

        A fixed task needs every source; a unified model takes any non-empty subset of its modalities
        without the target.

        >>> layout = InputLayout(("t1", "t2", "pd"), unified=True)
        >>> x = layout.assemble({"t1": np.ones((1, 4, 4))}, target="t2")
        >>> x.shape, x[:, 0, 0].tolist()
        ((9, 4, 4), [1.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0, 0.0])
        """
        if not self.unified:
            missing = [m for m in self.modalities if m not in images]
            if missing:
                raise MedsynthError(
                    f"the model needs {', '.join(self.modalities)}; missing: {', '.join(missing)}"
                )
            lead, plane = self._shape(images)
            stack = np.stack([np.reshape(images[m], (-1, self.context, *plane)) for m in self.modalities], 1)
            out = assemble_fixed(stack)
            return out.reshape(*lead, out.shape[1], *plane)
        if target not in self.modalities:
            raise MedsynthError(
                f"target {target!r} is not one of the model's modalities {', '.join(self.modalities)}"
            )
        if target in images:
            raise MedsynthError(f"{target!r} is both an input and the target; leave it out of the inputs")
        unknown = sorted(set(images) - set(self.modalities))
        if unknown or not images:
            raise MedsynthError(
                f"give at least one input among {', '.join(self.modalities)}"
                + (f"; the model does not know {', '.join(unknown)}" if unknown else "")
            )
        lead, plane = self._shape(images)
        rows = int(np.prod(lead, dtype=np.int64))
        count = len(self.modalities)
        stack = np.zeros((rows, count, self.context, *plane), np.float32)
        available = np.zeros((rows, count), np.float32)
        for name, array in images.items():
            position = self.modalities.index(name)
            stack[:, position] = np.reshape(array, (-1, self.context, *plane))
            available[:, position] = 1.0
        target_index = np.full(rows, self.modalities.index(str(target)))
        out = assemble_unified(stack, available, target_index)
        return out.reshape(*lead, out.shape[1], *plane)

    def _shape(self, images: Mapping[str, np.ndarray]) -> tuple[tuple[int, ...], tuple[int, int]]:
        shapes = {np.shape(a) for a in images.values()}
        shape = next(iter(shapes))
        if len(shapes) > 1 or len(shape) < 3 or shape[-3] != self.context:
            raise ValueError(f"inputs must share a shape (..., {self.context}, H, W), got {sorted(shapes)}")
        return tuple(shape[:-3]), (int(shape[-2]), int(shape[-1]))
