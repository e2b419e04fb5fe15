"""Training samples from the preprocessed cache: 2D/2.5D slices and 3D patches, fetched a batch at a time.

``SliceDataset`` loads every requested subject's slices, cropped in-plane around the subject's
foreground, into one RAM array ``(slices, modalities, H, W)`` when it is built (about
``slices x modalities x H x W x 4`` bytes: a few hundred MB for a hundred 256x256x150 subjects, ~20 MB
for the demo cohort). A batch is then one numpy fancy-index gather, with no file access and no
per-sample Python, which is why ``__getitems__`` exists and why :func:`make_loader` needs no worker
processes. ``PatchDataset`` reads 3D patches from the memory-mapped cache instead, since whole volumes
of a large cohort would not fit.

Randomness (shuffling, unified-mode modality draws, patch centres, ``data.augment``) is a pure function of
``(seed, epoch, index)``, so a run is reproducible whatever the batch size or resume point.

**Unified mode** trains one network for every "available subset -> missing modality" pair; the channel
layout (and the one function that builds it, for training and synthesis alike) is
:mod:`medsynth.model.layout`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch.utils.data import Dataset

from ..errors import ConfigError, MedsynthError
from ..model.layout import assemble_fixed, assemble_unified
from ..model.memory import GIB, device_memory, release_memory
from .cache import CachedSubject, Cohort
from .draws import uniform_draws

if TYPE_CHECKING:
    from .augment import SourceAugmentation

log = logging.getLogger("medsynth")

#: Normalised background value used to pad crops (images are mapped to [-1, 1]).
BACKGROUND = -1.0
# Storage order of the cache is (k, i, j): volume axis -> storage axis.
_STORAGE_AXIS = {2: 0, 0: 1, 1: 2}


#: ``data.unified_subsets`` schemes: how unified training draws the available inputs of a sample.
UNIFIED_SUBSETS = ("uniform", "emphasis")


def draw_unified(
    seed: int, epoch: int, index: np.ndarray, count: int, scheme: str = "uniform"
) -> tuple[np.ndarray, np.ndarray]:
    """Per sample: a uniform target of ``count`` modalities, then a non-empty subset of the others.

    ``uniform``: every non-empty subset equally likely (4 modalities: the full set 1/7, each single input
    1/7). ``emphasis``: a third of the samples get all the others, a third one of them (uniform), a third
    a uniform subset as above; missing-modality training (MM-GAN, Hi-Net) oversamples the full and
    single-input cases, which are also the directions users ask most. Returns ``(available (B, count)
    float32, target_index (B,))``; a pure function of ``(seed, epoch, index)``.
    """
    if scheme not in UNIFIED_SUBSETS:
        raise ConfigError(
            f"unified subset scheme must be one of {', '.join(UNIFIED_SUBSETS)}, got {scheme!r}"
        )
    index = np.asarray(index, dtype=np.int64)
    target_index = uniform_draws(seed, epoch, index[:, None], np.arange(count)).argmax(axis=1)
    rest = np.ones((len(index), count), bool)
    rest[np.arange(len(index)), target_index] = False
    # Subsets of the n remaining modalities are the integers 1 .. 2**n - 1 read as bit masks.
    n_rest = rest.sum(axis=1)
    subsets = 2**n_rest - 1
    uniform = uniform_draws(seed, epoch, index, count)
    draw = 1 + (uniform * subsets).astype(np.int64)
    if scheme == "emphasis":
        mode = uniform_draws(seed, epoch, index, count + 1)
        single = np.left_shift(1, np.minimum((uniform * n_rest).astype(np.int64), n_rest - 1))
        draw = np.where(mode < 1 / 3, subsets, np.where(mode < 2 / 3, single, draw))
    rank = np.cumsum(rest, axis=1) - 1
    chosen = rest & (((draw[:, None] >> np.maximum(rank, 0)) & 1) == 1)
    return chosen.astype(np.float32), target_index


def _oriented(array: np.ndarray, axis: int) -> np.ndarray:
    """View a ``(k, i, j)`` cache array as ``(slices along axis, in-plane a, in-plane b)``."""
    in_plane = [a for a in (0, 1, 2) if a != axis]
    return array.transpose(_STORAGE_AXIS[axis], *(_STORAGE_AXIS[a] for a in in_plane))


def window_slices(
    centre: Sequence[int], size: Sequence[int], extent: Sequence[int]
) -> tuple[tuple[slice, ...], tuple[slice, ...]]:
    """A ``size`` window centred on ``centre`` in a grid of ``extent``: (grid slices, window slices).

    The two tuples select the same voxels, in grid and in window coordinates; parts of the window that
    fall off the grid are simply not selected (the caller pads them). Training crops and inference use
    this one rule, so a network sees slices framed the same way in both.
    """
    grid, window = [], []
    for centre_a, length, limit in zip(centre, size, extent, strict=True):
        start = int(centre_a) - int(length) // 2
        low, high = max(start, 0), min(start + int(length), int(limit))
        grid.append(slice(low, max(high, low)))
        window.append(slice(low - start, low - start + max(high - low, 0)))
    return tuple(grid), tuple(window)


def crop_plane(stack: np.ndarray, centre: tuple[int, int], size: tuple[int, int], fill: float) -> np.ndarray:
    """Crop ``(n, A, B)`` in-plane to ``size`` centred on ``centre``, padding with ``fill`` off the grid."""
    out = np.full((stack.shape[0], *size), fill, dtype=stack.dtype)
    grid, window = window_slices(centre, size, stack.shape[1:])
    out[:, window[0], window[1]] = stack[:, grid[0], grid[1]]
    return out


def round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def foreground_crop_size(subjects: Sequence[CachedSubject], axis: int, multiple: int = 16) -> tuple[int, int]:
    """The in-plane crop that holds every subject's foreground box, each side rounded up to ``multiple``."""
    in_plane = [a for a in (0, 1, 2) if a != axis]
    extents = np.array([[s.bbox[a].stop - s.bbox[a].start for a in in_plane] for s in subjects])
    return round_up(int(extents[:, 0].max()), multiple), round_up(int(extents[:, 1].max()), multiple)


class SliceDataset(Dataset):
    """2D (``context=1``) or 2.5D (``context`` odd > 1) slices of cached subjects.

    Items are dicts: ``source`` (C, H, W) float32 with ``C = len(sources) * context`` (source-major:
    all context slices of the first source, then the next), ``target`` (1, H, W) when a target is set,
    ``mask`` (1, H, W) float32, ``subject`` and ``slice`` (index along ``axis``). Context slices past a
    volume end repeat the end slice. In unified mode ``source`` follows :mod:`medsynth.model.layout` and items
    also carry ``target_index`` and ``available`` (M,).

    ``augmentation`` (``data.augment``, :mod:`medsynth.data.augment`) changes each sample's source after
    the gather, drawn per ``(seed, epoch, index)``; targets and masks are never touched.

    ``axis`` is the canonical slicing axis: 2 axial (default, the cache's storage order), 0 sagittal,
    1 coronal (transposed once per subject at load). ``crop_size=None`` takes the largest in-plane
    foreground box over these subjects, rounded up to ``size_multiple``; each subject is cropped around
    its own box centre and padded with -1.
    """

    def __init__(
        self,
        cohort: Cohort,
        subject_ids: Sequence[str],
        sources: Sequence[str],
        target: str | None,
        *,
        context: int = 1,
        crop_size: tuple[int, int] | None = None,
        size_multiple: int = 16,
        foreground_only: bool = True,
        min_foreground: int = 1,
        unified_modalities: Sequence[str] | None = None,
        axis: int = 2,
        seed: int = 0,
        unified_subsets: str = "uniform",
        target_stack: bool = False,
        augmentation: SourceAugmentation | None = None,
    ) -> None:
        if context < 1 or context % 2 == 0:
            raise ConfigError(f"context must be an odd number of slices (1, 3, 5, ...), got {context}")
        if axis not in _STORAGE_AXIS:
            raise ConfigError(f"slicing axis must be 0 (sagittal), 1 (coronal) or 2 (axial), got {axis}")
        if size_multiple < 1:
            raise ConfigError(f"size_multiple must be >= 1, got {size_multiple}")
        if not subject_ids:
            raise MedsynthError("no subjects to draw slices from; check the split")
        self.unified = unified_modalities is not None
        if unified_subsets not in UNIFIED_SUBSETS:
            raise ConfigError(
                f"unified_subsets must be one of {', '.join(UNIFIED_SUBSETS)}, got {unified_subsets!r}"
            )
        #: How unified mode draws each sample's available inputs (:func:`draw_unified`).
        self.unified_subsets = unified_subsets
        if augmentation is not None and self.unified:
            raise ConfigError("data.augment changes fixed sources; unified mode is not augmented (yet)")
        #: Per-sample changes of the source (``data.augment``; :mod:`medsynth.data.augment`), or None.
        self.augmentation = augmentation
        if self.unified:
            self.modalities = tuple(unified_modalities or ())
            if len(self.modalities) < 2:
                raise ConfigError("unified mode needs at least two modalities")
            self.sources, self.target = self.modalities, None
        else:
            if not sources:
                raise ConfigError("a slice dataset needs at least one source modality")
            self.sources, self.target = tuple(sources), target
            self.modalities = self.sources + ((target,) if target is not None else ())
        self.context, self.axis, self.seed, self.epoch = context, axis, seed, 0
        #: Also return ``target_stack`` (B, context, H, W): the target's own 2.5D neighbourhood, for
        #: objectives that run a generator on target images (a cycle through a reverse generator).
        self.target_stack = bool(target_stack) and self.target is not None and context > 1
        subjects = [cohort.subject(s) for s in subject_ids]
        self.crop_size = self._crop_size(subjects, crop_size, size_multiple)
        self._load(subjects)
        counts = self._masks.reshape(len(self._masks), -1).sum(axis=1, dtype=np.int64)
        keep = counts >= min_foreground if foreground_only else np.ones(len(counts), bool)
        self._selected = np.flatnonzero(keep)
        if not len(self._selected):
            raise MedsynthError(
                f"no slice has {min_foreground} foreground voxels; check the masks or lower it"
            )
        # Global indices of each selected slice's context neighbours, clamped to its own subject.
        half = np.arange(context) - context // 2
        local = self._slice_index[self._selected]
        first = self._selected - local
        last = first + self._depth[self._selected] - 1
        self._neighbours = np.clip(self._selected[:, None] + half, first[:, None], last[:, None])
        #: Where batches are gathered: host numpy (default), or torch on ``device`` after :meth:`to_device`.
        self.device, self.pin_memory = torch.device("cpu"), False
        self._resident: tuple[torch.Tensor, torch.Tensor] | None = None

    def _crop_size(
        self, subjects: list[CachedSubject], crop_size: tuple[int, int] | None, multiple: int
    ) -> tuple[int, int]:
        in_plane = [a for a in (0, 1, 2) if a != self.axis]
        self._centres = [tuple((s.bbox[a].start + s.bbox[a].stop) // 2 for a in in_plane) for s in subjects]
        if crop_size is not None:
            if len(crop_size) != 2 or min(crop_size) < 1:
                raise ConfigError(f"crop_size must be two positive sizes (H, W), got {crop_size}")
            return int(crop_size[0]), int(crop_size[1])
        return foreground_crop_size(subjects, self.axis, multiple)

    def _load(self, subjects: list[CachedSubject]) -> None:
        images, masks, ids, index = [], [], [], []
        for number, (subject, centre) in enumerate(zip(subjects, self._centres, strict=True)):
            planes = [crop_plane(_oriented(subject.image(m), self.axis), centre, self.crop_size, BACKGROUND)
                      for m in self.modalities]  # fmt: skip
            images.append(np.stack(planes, axis=1))
            masks.append(crop_plane(_oriented(subject.mask, self.axis), centre, self.crop_size, 0))
            ids.append(np.full(len(planes[0]), number))
            index.append(np.arange(len(planes[0])))
        self._images = np.concatenate(images)  # (slices, modalities, H, W) float32
        self._masks = np.concatenate(masks)  # (slices, H, W) uint8
        self._subject_number = np.concatenate(ids)
        self._slice_index = np.concatenate(index)
        self._depth = np.concatenate([np.full(len(i), len(i)) for i in index])
        self.subject_ids = tuple(s.id for s in subjects)
        log.debug("slice dataset holds %.1f MB in RAM", (self._images.nbytes + self._masks.nbytes) / 2**20)

    @property
    def in_channels(self) -> int:
        """Channels of ``source``: what the generator's ``in_channels`` must be."""
        count = len(self.modalities) if self.unified else len(self.sources)
        return count * self.context + (2 * count if self.unified else 0)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch's random draws (unified-mode subsets); :func:`make_loader` calls it."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self._selected)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {key: value[0] for key, value in self.__getitems__([index]).items()}

    # ------------------------------------------------------------------ where batches are gathered
    def to_device(self, device: torch.device | str) -> None:
        """Hold the slice arrays on ``device`` and gather batches there with torch indexing.

        On a GPU the step then never waits for a host copy: per batch only the indices (a few hundred
        bytes, pinned, copied non-blocking) cross the bus. The batches equal the numpy path's exactly
        (same order, same unified-mode draws, drawn on the host as before). ``"cpu"`` selects the torch
        gather on the host, which is how tests check that equality without a GPU.
        """
        device = torch.device(device)
        self._resident = (torch.from_numpy(self._images).to(device), torch.from_numpy(self._masks).to(device))
        self.device, self.pin_memory = device, False

    @property
    def resident_bytes(self) -> int:
        """Bytes :meth:`to_device` moves: the cropped slices and their masks."""
        return int(self._images.nbytes + self._masks.nbytes)

    def _indices_on_device(self, *arrays: np.ndarray) -> list[torch.Tensor]:
        """Host index arrays -> device tensors in one pinned, non-blocking copy (no host wait on CUDA)."""
        flat = torch.from_numpy(np.concatenate([np.asarray(a, dtype=np.int64).ravel() for a in arrays]))
        if self.device.type == "cuda":
            flat = flat.pin_memory().to(self.device, non_blocking=True)
        parts = flat.split([int(np.size(a)) for a in arrays])
        return [part.view(np.shape(a)) for part, a in zip(parts, arrays, strict=True)]

    def _gather_resident(
        self, index: np.ndarray, centre: np.ndarray, neighbours: np.ndarray
    ) -> dict[str, Any]:
        """:meth:`__getitems__` with the arrays on ``self.device``: the same values, gathered by torch."""
        images, masks = self._resident
        batch: dict[str, Any] = {
            "subject": [self.subject_ids[n] for n in self._subject_number[centre]],
            "slice": torch.from_numpy(self._slice_index[centre]),
        }
        size, height, width = len(index), *self.crop_size
        if self.unified:
            available, target_index = self._draw_unified(index)
            centre_d, neighbours_d, available_d, target_d = self._indices_on_device(
                centre, neighbours, available, target_index
            )
            available_f = available_d.to(torch.float32)
            count = len(self.modalities)
            stack = images[neighbours_d].transpose(1, 2)  # (B, M, context, H, W)
            planes = (stack * available_f[:, :, None, None, None]).reshape(
                size, count * self.context, height, width
            )
            one_hot = torch.eye(count, dtype=torch.float32, device=self.device)[target_d]
            batch["source"] = torch.cat(
                [planes, available_f[:, :, None, None].expand(size, count, height, width),
                 one_hot[:, :, None, None].expand(size, count, height, width)], dim=1,
            )  # fmt: skip
            batch["target"] = images[centre_d, target_d][:, None]
            batch["target_index"], batch["available"] = target_d, available_f
        else:
            centre_d, neighbours_d = self._indices_on_device(centre, neighbours)
            count = len(self.sources)
            stack = images[neighbours_d, :count].transpose(1, 2)  # (B, S, context, H, W)
            batch["source"] = stack.reshape(size, count * self.context, height, width).contiguous()
            if self.target is not None:
                batch["target"] = images[centre_d, count][:, None]
            if self.target_stack:
                batch["target_stack"] = images[neighbours_d, count].contiguous()
        batch["mask"] = masks[centre_d][:, None].to(torch.float32)
        return batch

    def __getitems__(self, indices: Sequence[int]) -> dict[str, Any]:
        """A whole batch with one gather per array: ``source`` (B, C, H, W), ``target`` (B, 1, H, W), ..."""
        index = np.asarray(indices, dtype=np.int64)
        centre = self._selected[index]
        neighbours = self._neighbours[index]  # (B, context)
        if self._resident is not None:
            batch = self._gather_resident(index, centre, neighbours)
        else:
            batch = self._gather(index, centre, neighbours)
        if self.augmentation is not None:
            size, _, height, width = batch["source"].shape
            stack = batch["source"].reshape(size, len(self.sources), self.context, height, width)
            changed = self.augmentation(stack, seed=self.seed, epoch=self.epoch, index=index)
            batch["source"] = changed.reshape(batch["source"].shape)
        return _pinned(batch) if self.pin_memory else batch

    def _gather(self, index: np.ndarray, centre: np.ndarray, neighbours: np.ndarray) -> dict[str, Any]:
        """The numpy gather from host RAM (the default, and the reference of the device path)."""
        batch: dict[str, Any] = {
            "mask": torch.from_numpy(self._masks[centre][:, None].astype(np.float32)),
            "subject": [self.subject_ids[n] for n in self._subject_number[centre]],
            "slice": torch.from_numpy(self._slice_index[centre]),
        }
        if self.unified:
            stack = self._images[neighbours].transpose(0, 2, 1, 3, 4)  # (B, M, context, H, W)
            available, target_index = self._draw_unified(index)
            batch["source"] = torch.from_numpy(assemble_unified(stack, available, target_index))
            batch["target"] = torch.from_numpy(self._images[centre, target_index][:, None])
            batch["target_index"] = torch.from_numpy(target_index)
            batch["available"] = torch.from_numpy(available)
            return batch
        count = len(self.sources)
        source = self._images[neighbours, :count].transpose(0, 2, 1, 3, 4)  # (B, S, context, H, W)
        batch["source"] = torch.from_numpy(assemble_fixed(source))
        if self.target is not None:
            batch["target"] = torch.from_numpy(self._images[centre, count][:, None])
        if self.target_stack:
            batch["target_stack"] = torch.from_numpy(np.ascontiguousarray(self._images[neighbours, count]))
        return batch

    def _draw_unified(self, index: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Per sample: a uniform target, then a subset of the others (:func:`draw_unified`)."""
        return draw_unified(self.seed, self.epoch, index, len(self.modalities), self.unified_subsets)


class BatchLoader:
    """Iterates whole batches from a dataset's ``__getitems__``, in an order fixed by seed and epoch.

    With ``world_size > 1`` (one loader per training process) each ``rank`` takes a disjoint share of
    the same ``(seed, epoch)`` permutation: global step ``s`` is the samples
    ``order[s * B * W : (s + 1) * B * W]`` and rank ``r`` takes its ``r``-th block of ``B``. Every rank
    makes the same number of steps (``drop_last`` is required), and one process (``world_size=1``)
    iterates exactly as before. Resuming at step ``s`` of an epoch skips the same samples whatever
    rank reads them.

    Example:
        >>> class Items:
        ...     def __len__(self): return 10
        ...     def set_epoch(self, epoch): pass
        ...     def __getitems__(self, index): return [int(i) for i in index]
        >>> shares = [list(BatchLoader(Items(), 2, shuffle=False, seed=0, drop_last=True, rank=r, world_size=2))
        ...           for r in (0, 1)]
        >>> shares
        [[[0, 1], [4, 5]], [[2, 3], [6, 7]]]
    """

    def __init__(
        self,
        dataset: Any,
        batch_size: int,
        *,
        shuffle: bool,
        seed: int,
        drop_last: bool,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if batch_size < 1:
            raise ConfigError(f"batch size must be >= 1, got {batch_size}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ConfigError(f"rank must be in [0, world_size), got rank {rank} of {world_size}")
        if world_size > 1 and not drop_last:
            raise ConfigError("a loader shared by several processes needs drop_last=True (equal steps)")
        per_step = batch_size * world_size
        if drop_last and len(dataset) < per_step:
            shared = f" ({batch_size} per process x {world_size} processes)" if world_size > 1 else ""
            raise MedsynthError(
                f"only {len(dataset)} samples for a batch of {per_step}{shared}; "
                "lower the batch size or add subjects"
            )
        self.dataset, self.batch_size = dataset, batch_size
        self.shuffle, self.seed, self.drop_last, self.epoch = shuffle, seed, drop_last, 0
        self.rank, self.world_size = rank, world_size

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)
        self.dataset.set_epoch(epoch)

    def __len__(self) -> int:
        full, rest = divmod(len(self.dataset), self.batch_size * self.world_size)
        return full if self.drop_last or not rest else full + 1

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return self.batches()

    def batches(self, start: int = 0) -> Iterator[dict[str, Any]]:
        """This epoch's batches from step ``start`` on: a run resumed mid-epoch gathers none of the
        batches it trained before it stopped (``list(loader)[start:]``, without building them)."""
        total = len(self.dataset)
        order = (
            np.random.default_rng([self.seed, self.epoch]).permutation(total)
            if self.shuffle
            else np.arange(total)
        )
        step = self.batch_size * self.world_size
        for begin in range(start * step, len(self) * step, step):
            first = begin + self.rank * self.batch_size
            yield self.dataset.__getitems__(order[first : first + self.batch_size])


def make_loader(
    dataset: SliceDataset | PatchDataset,
    batch_size: int,
    *,
    shuffle: bool = True,
    seed: int = 0,
    drop_last: bool = False,
    rank: int = 0,
    world_size: int = 1,
) -> BatchLoader:
    """Batches of a slice or patch dataset; call ``loader.set_epoch(e)`` before each epoch.

    No worker processes: slices are gathered from RAM faster than workers could ship them, and
    patch fetches are memory-mapped reads. ``rank``/``world_size``: this process's share in a
    distributed run (see :class:`BatchLoader`).
    """
    return BatchLoader(
        dataset, batch_size, shuffle=shuffle, seed=seed, drop_last=drop_last, rank=rank, world_size=world_size
    )


def _pinned(batch: dict[str, Any]) -> dict[str, Any]:
    """The batch's tensors in page-locked memory, so that ``.to(cuda, non_blocking=True)`` is truly async."""
    return {k: v.pin_memory() if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


#: Share of the device's free memory the training slices may take when they are moved there.
RESIDENT_SHARE = 0.5


def place_on_device(
    dataset: SliceDataset | PatchDataset,
    device: torch.device,
    *,
    resident: bool,
    memory: tuple[int, int] | None = None,
) -> str:
    """Decide where a CUDA run's batches come from; returns the one-line decision (also logged).

    * ``resident`` and a slice dataset that takes at most :data:`RESIDENT_SHARE` of the free device
      memory: its arrays move to the GPU once and batches are gathered there (:meth:`SliceDataset.to_device`);
    * otherwise batches are gathered on the host into pinned memory and copied non-blocking.

    Free memory is the driver's figure (``torch.cuda.mem_get_info``, in
    :func:`~medsynth.model.memory.device_memory`): what another process holds on a shared card counts as
    used. When that process grows between the check and the copy, the copy's out-of-memory falls back to
    pinned host batches too. ``memory``: ``(free, total)`` bytes instead of asking the device (tests pass
    a card another job fills).

    A CPU device changes nothing (the numpy gather is what a CPU step wants).
    """
    if device.type != "cuda":
        return "training batches gathered on the host"
    if resident and hasattr(dataset, "to_device"):
        free, total = memory or device_memory(device) or (0, 0)
        size = dataset.resident_bytes
        card = f"{free / GIB:.1f} of {total / GIB:.1f} GiB free on {device}"
        fitted = False
        if size <= RESIDENT_SHARE * free:
            try:
                dataset.to_device(device)
                fitted = True
            except torch.OutOfMemoryError:
                fitted = False
            if fitted:
                message = f"training slices resident on {device} ({size / 2**20:.0f} MB; {card})"
                log.info(message)
                return message
            release_memory(device)  # outside the except block: the partial copy is gone by now
            log.warning(
                "out of memory copying the training slices (%.0f MB) to %s (another process took the "
                "memory?); pinned host batches instead", size / 2**20, device,
            )  # fmt: skip
        else:
            log.info(
                "training slices (%.0f MB) exceed %.0f %% of the free GPU memory (%s); "
                "pinned host batches instead", size / 2**20, 100 * RESIDENT_SHARE, card,
            )  # fmt: skip
    dataset.pin_memory = True
    return "training batches gathered on the host into pinned memory, copied non-blocking"


class PatchDataset(Dataset):
    """Random 3D patches (``patch_size`` in canonical ``(i, j, k)`` order) for 3D networks.

    ``samples_per_epoch`` patches per epoch; each picks a subject uniformly, then a centre: with
    probability ``foreground_fraction`` a uniform foreground voxel (so air is not most of the training
    signal), else a uniform voxel of the volume (nnU-Net mixes forced-foreground and random patches the
    same way, so the head's boundary and the background are seen too). ``foreground_weighted=False``
    means ``foreground_fraction=0``. Patches are shifted to stay inside the volume. Items hold ``source`` (S, *patch),
    ``target`` (1, *patch), ``mask`` (1, *patch) and ``subject``.
    """

    def __init__(
        self,
        cohort: Cohort,
        subject_ids: Sequence[str],
        sources: Sequence[str],
        target: str,
        *,
        patch_size: tuple[int, int, int] = (64, 64, 64),
        samples_per_epoch: int,
        foreground_weighted: bool = True,
        seed: int = 0,
        foreground_fraction: float = 1.0,
        augmentation: SourceAugmentation | None = None,
    ) -> None:
        if not subject_ids:
            raise MedsynthError("no subjects to draw patches from; check the split")
        if not 0.0 <= foreground_fraction <= 1.0:
            raise ConfigError(f"foreground_fraction must be in [0, 1], got {foreground_fraction}")
        #: Share of patch centres drawn on the foreground (the rest uniform over the volume).
        self.foreground_fraction = float(foreground_fraction) if foreground_weighted else 0.0
        if not sources:
            raise ConfigError("a patch dataset needs at least one source modality")
        if len(patch_size) != 3 or min(patch_size) < 1:
            raise ConfigError(f"patch_size must be three positive sizes, got {patch_size}")
        if samples_per_epoch < 1:
            raise ConfigError(f"samples_per_epoch must be >= 1, got {samples_per_epoch}")
        self.sources, self.target = tuple(sources), target
        self.patch_size = tuple(int(p) for p in patch_size)
        self.samples_per_epoch, self.weighted, self.seed, self.epoch = (
            samples_per_epoch,
            foreground_weighted,
            seed,
            0,
        )
        self._subjects = [cohort.subject(s) for s in subject_ids]
        shapes = np.array([s.meta["shape"] for s in self._subjects])
        fits = shapes.min(axis=0)
        if np.any(np.array(self.patch_size) > fits):
            raise ConfigError(
                f"patch_size {self.patch_size} does not fit the smallest volume; the largest patch that fits "
                f"every subject is {tuple(int(f) for f in fits)}"
            )
        self._shapes = shapes
        self._images = [{m: s.image(m) for m in (*self.sources, target)} for s in self._subjects]
        self._masks = [s.mask for s in self._subjects]
        # Cumulative foreground counts per storage slice k: a weighted centre is drawn slice first.
        self._cumulative = [np.cumsum(m.reshape(len(m), -1).sum(axis=1, dtype=np.int64)) for m in self._masks]
        #: Return batches in page-locked memory (set by :func:`place_on_device` for a CUDA run).
        self.pin_memory = False
        #: Per-sample changes of the source patches (``data.augment``), or None.
        self.augmentation = augmentation

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.samples_per_epoch

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {key: value[0] for key, value in self.__getitems__([index]).items()}

    def _centre(self, number: int, draws: np.ndarray, on_foreground: bool = True) -> np.ndarray:
        """Centre ``(i, j, k)`` of one patch from three uniform draws."""
        shape = self._shapes[number]
        cumulative = self._cumulative[number]
        if not self.weighted or not on_foreground or cumulative[-1] == 0:
            return (draws * shape).astype(np.int64)
        k = int(np.searchsorted(cumulative, draws[0] * cumulative[-1], side="right"))
        voxels = np.flatnonzero(self._masks[number][k])
        i, j = np.unravel_index(voxels[int(draws[1] * len(voxels))], (shape[0], shape[1]))
        return np.array([i, j, k])

    def __getitems__(self, indices: Sequence[int]) -> dict[str, Any]:
        index = np.asarray(indices, dtype=np.int64)
        draws = uniform_draws(self.seed, self.epoch, index[:, None], np.arange(4))
        numbers = (draws[:, 0] * len(self._subjects)).astype(np.int64)
        # A fifth stream: streams 0-3 (and so a foreground_fraction of 1) draw exactly as before.
        foreground = uniform_draws(self.seed, self.epoch, index, 4) < self.foreground_fraction
        size = np.array(self.patch_size)
        sources, targets, masks = [], [], []
        for number, row, fg in zip(numbers, draws[:, 1:], foreground, strict=True):
            centre = self._centre(number, row, bool(fg))
            start = np.clip(centre - size // 2, 0, self._shapes[number] - size)
            box = (slice(start[2], start[2] + size[2]), slice(start[0], start[0] + size[0]),
                   slice(start[1], start[1] + size[1]))  # fmt: skip
            images = self._images[number]
            sources.append([images[m][box].transpose(1, 2, 0) for m in self.sources])
            targets.append(images[self.target][box].transpose(1, 2, 0)[None])
            masks.append(self._masks[number][box].transpose(1, 2, 0)[None])
        batch: dict[str, Any] = {
            "source": torch.from_numpy(np.asarray(sources, dtype=np.float32)),
            "target": torch.from_numpy(np.asarray(targets, dtype=np.float32)),
            "mask": torch.from_numpy(np.asarray(masks, dtype=np.float32)),
            "subject": [self._subjects[n].id for n in numbers],
        }
        if self.augmentation is not None:
            stack = batch["source"][:, :, None]  # one channel per source: (B, S, 1, *patch)
            changed = self.augmentation(stack, seed=self.seed, epoch=self.epoch, index=index)
            batch["source"] = changed[:, :, 0]
        return _pinned(batch) if self.pin_memory else batch
