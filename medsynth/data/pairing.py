"""``data.pairing``: what a subject can serve, and training samples drawn without pairs.

**Paired** training (pix2pix) needs every subject's source and target voxel-aligned: one sample is the
same slice of both. **Unpaired** training (``data.pairing: unpaired``, for objectives that learn
without pairs) draws the source slice and the target slice of a sample independently, from any
training subjects at any positions, so it also uses subjects that have only the source or only the
target (MRs of some patients, CTs of others), and it is not hurt by pairs that do not line up.

What a subject can serve (:func:`subject_role`):

* ``both``: training on either side, validation and evaluation (the only subjects a synthetic image
  can be scored against);
* ``source`` / ``target``: one side of unpaired training, or a round-trip (cycle) check;
* nothing: it has neither modality.

Held-out subjects are drawn among the ``both`` subjects first (:func:`complete_subjects`), so that
validation and evaluation score against real targets wherever the data allow it.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ..errors import MedsynthError
from .cache import Cohort
from .datasets import SliceDataset, foreground_crop_size
from .draws import uniform_draws

if TYPE_CHECKING:
    from .augment import SourceAugmentation

#: Counter stream of the target draws (the slice datasets' own draws use streams below it).
_TARGET_STREAM = 101


def subject_role(modalities: Collection[str], source: str, target: str) -> str | None:
    """``both``, ``source``, ``target`` or None: what a subject with ``modalities`` can serve."""
    has_source, has_target = source in modalities, target in modalities
    if has_source and has_target:
        return "both"
    return "source" if has_source else ("target" if has_target else None)


def complete_subjects(records: Sequence[Any], source: str, target: str) -> set[str]:
    """Ids of the subject records (``.id``, ``.paths``) that have both images: held-out splits draw
    these first (:func:`medsynth.data.splits.make_splits`)."""
    return {r.id for r in records if subject_role(r.paths, source, target) == "both"}


class UnpairedSamples:
    """Batches whose source and target images come from independent draws.

    ``sources`` yields the run's source channels (its 2.5D stack) and the source slice's mask;
    ``targets`` yields target stacks the same way (a one-modality dataset whose "source" is the target).
    An epoch is one pass over the source samples in the loader's order; each sample's target is a
    uniform draw over all target samples, a pure function of ``(seed, epoch, index)`` like every other
    draw of the data layer, so a resumed run sees the same batches. Batches hold ``source``, ``mask``,
    ``target`` (the target's centre slice), ``target_stack`` (with 2.5D context), ``target_mask`` and
    the subjects of both sides.
    """

    def __init__(self, sources: Any, targets: Any, *, seed: int = 0, context: int = 1) -> None:
        self.sources, self.targets, self.seed, self.context, self.epoch = sources, targets, seed, context, 0

    def __len__(self) -> int:
        return len(self.sources)

    @property
    def crop_size(self) -> tuple[int, ...] | None:
        return getattr(self.sources, "crop_size", None)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)
        self.sources.set_epoch(epoch)
        self.targets.set_epoch(epoch)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {key: value[0] for key, value in self.__getitems__([index]).items()}

    def target_indices(self, index: np.ndarray) -> np.ndarray:
        draws = uniform_draws(self.seed, self.epoch, np.asarray(index, dtype=np.int64), _TARGET_STREAM)
        return np.minimum((draws * len(self.targets)).astype(np.int64), len(self.targets) - 1)

    def __getitems__(self, indices: Sequence[int]) -> dict[str, Any]:
        index = np.asarray(indices, dtype=np.int64)
        source = self.sources.__getitems__(index)
        target = self.targets.__getitems__(self.target_indices(index))
        centre = self.context // 2
        stack = target["source"]
        batch = {
            "source": source["source"],
            "mask": source["mask"],
            "target": stack[:, centre : centre + 1],
            "target_mask": target["mask"],
            "subject": source["subject"],
            "target_subject": target["subject"],
        }
        if self.context > 1:
            batch["target_stack"] = stack
        return batch

    # ------------------------------------------------------------ where batches are gathered (GPU)
    @property
    def pin_memory(self) -> bool:
        return bool(self.sources.pin_memory)

    @pin_memory.setter
    def pin_memory(self, value: bool) -> None:
        self.sources.pin_memory = self.targets.pin_memory = value

    @property
    def resident_bytes(self) -> int:
        return int(self.sources.resident_bytes + self.targets.resident_bytes)

    def to_device(self, device: torch.device | str) -> None:
        self.sources.to_device(device)
        self.targets.to_device(device)


def unpaired_slices(
    cohort: Cohort,
    subject_ids: Sequence[str],
    source: str,
    target: str,
    *,
    context: int = 1,
    crop_size: tuple[int, int] | None = None,
    axis: int = 2,
    min_foreground: int = 1,
    seed: int = 0,
    augmentation: SourceAugmentation | None = None,
) -> UnpairedSamples:
    """2D/2.5D unpaired samples of the training subjects: every subject with the source gives source
    slices, every subject with the target gives target slices, all framed by one crop. ``augmentation``
    changes the source slices only (the target side's dataset holds the target as its "source")."""
    subjects = {s: cohort.subject(s) for s in subject_ids}
    with_source = [s for s, c in subjects.items() if source in c.modalities]
    with_target = [s for s, c in subjects.items() if target in c.modalities]
    for side, ids in (("source", with_source), ("target", with_target)):
        if not ids:
            name = source if side == "source" else target
            raise MedsynthError(
                f"no training subject has the {side} ({name}); unpaired training needs both sides "
                f"among the training subjects (check the split and `medsynth data check`)"
            )
    if crop_size is None:  # one frame for both sides: the largest foreground box of all of them
        crop_size = foreground_crop_size(
            [subjects[s] for s in sorted(set(with_source) | set(with_target))], axis
        )
    common = {
        "context": context,
        "crop_size": crop_size,
        "axis": axis,
        "min_foreground": min_foreground,
        "seed": seed,
    }
    sources = SliceDataset(cohort, with_source, (source,), None, augmentation=augmentation, **common)
    targets = SliceDataset(cohort, with_target, (target,), None, **common)
    return UnpairedSamples(sources, targets, seed=seed, context=context)
