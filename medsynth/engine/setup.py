"""From a data folder to a run's cohort: scan, split by subject, fingerprint, cache.

Shared by training (which creates splits and fingerprint) and evaluation (which reuses the run's).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ..config import Config
from ..data.cache import Cohort, prepare_cohort
from ..data.fingerprint import Fingerprint, NormalizationSpec, normalization_spec
from ..data.layouts import SubjectRecord, load_subject, scan_dataset
from ..data.pairing import complete_subjects, subject_role
from ..data.splits import load_or_create_splits
from ..errors import MedsynthError
from ..io.atomic import atomic_write_text
from ..modalities import DISPLAY_NAMES
from ..task import Task

if TYPE_CHECKING:  # augment.py imports torch, loaded only when a run needs appearance draws
    from ..data.augment import AppearanceDraws

log = logging.getLogger("medsynth")


@dataclass
class RunData:
    """The subjects of a run, its subject-level splits, its normalisation fingerprint and cache."""

    records: dict[str, SubjectRecord]
    splits: dict[str, list[str]]
    fingerprint: Fingerprint
    cohort: Cohort
    modalities: tuple[str, ...]


def usable_records(
    records: list[SubjectRecord], task: Task, root: str | Path, *, pairing: str = "paired"
) -> list[SubjectRecord]:
    """Subjects that hold every modality the task names; the rest are left out with a warning.

    Unpaired (:mod:`medsynth.data.pairing`): subjects with the source, the target or both.
    """
    wanted = set(task.required_modalities)
    present = set().union(*(r.paths for r in records)) if records else set()
    if pairing == "unpaired":
        return _unpaired_records(records, task, root, present)
    absent = [m for m in task.required_modalities if m not in present]
    if absent:
        found = ", ".join(sorted(present)) or "none"
        raise MedsynthError(
            f"no subject has {', '.join(DISPLAY_NAMES[m] for m in absent)} (modalities found: {found}); "
            f"choose a task among the modalities present",
            root,
        )
    kept = [r for r in records if wanted <= set(r.paths)]
    for record in records:
        if record not in kept:
            missing = ", ".join(sorted(wanted - set(record.paths)))
            log.warning("subject %s left out: it lacks %s", record.id, missing)
    return kept


def _unpaired_records(
    records: list[SubjectRecord], task: Task, root: str | Path, present: set[str]
) -> list[SubjectRecord]:
    source, target = task.sources[0], str(task.target)
    absent = [m for m in (source, target) if m not in present]
    if absent:
        raise MedsynthError(
            f"no subject has {', '.join(DISPLAY_NAMES[m] for m in absent)}; unpaired training needs subjects "
            f"with {DISPLAY_NAMES[source]} and subjects with {DISPLAY_NAMES[target]}",
            root,
        )
    kept = [r for r in records if subject_role(r.paths, source, target)]
    for record in records:
        if record not in kept:
            log.warning("subject %s left out: it has neither %s nor %s", record.id, source, target)
    return kept


def normalization_specs(config: Config, modalities: tuple[str, ...]) -> dict[str, NormalizationSpec]:
    """Per-modality normalisation: the config's choice, else the default (CT window, MR percentiles)."""
    specs = {}
    for modality in modalities:
        options = config.data.normalization.get(modality)
        if not options:
            specs[modality] = NormalizationSpec.for_modality(modality)
            continue
        specs[modality] = normalization_spec(modality, options)
    return specs


def screen_draws(config: Config, task: Task, specs: dict[str, NormalizationSpec]) -> AppearanceDraws | None:
    """The appearances beyond its training images that a run's out-of-distribution screen accepts.

    A run with ``data.augment``: what its augmentation showed it. A source normalised with ``histogram``
    (no augmentation): the protocol changes standardisation takes out, the ``robust`` preset's monotone
    intensity warps and bias fields; without them the screen, comparing the percentile view, would flag
    the SPGR and MPRAGE T1w the standardised model handles as well as its own (README "Another site's
    T1w"), while a T2w given as the T1w still lies beyond them.
    """
    standardised = tuple(m for m in task.sources if specs[m].scheme == "histogram")
    if not config.data.augment and not standardised:
        return None
    from ..data.augment import appearance_draws  # torch: only when the run needs draws

    value, modalities = (
        (config.data.augment, tuple(task.sources)) if config.data.augment else ("robust", standardised)
    )
    return appearance_draws(value, modalities, config.model.spatial_dims, config.data.axis)


def prepare_run_data(
    config: Config, task: Task, run_dir: Path, *, cache_dir: Path, progress: bool = True
) -> RunData:
    """Scan the data, fix the splits (once), fit the fingerprint on training subjects, fill the cache."""
    if not config.data.root:
        raise MedsynthError("no data folder: pass --data DIR (or set data.root in the recipe)")
    unpaired = config.data.pairing == "unpaired"
    records = usable_records(
        scan_dataset(config.data.root, config.data.manifest),
        task,
        config.data.root,
        pairing=config.data.pairing,
    )
    by_id = {r.id: r for r in records}
    splits_path = Path(config.data.splits_file) if config.data.splits_file else run_dir / "splits.json"
    # Unpaired: held-out subjects come from those with both images, which alone can be scored.
    preferred = complete_subjects(records, task.sources[0], str(task.target)) if unpaired else None
    splits = load_or_create_splits(
        splits_path, sorted(by_id), val=config.data.val, test=config.data.test, seed=config.data.split_seed,
        prefer_held_out=preferred,
    )  # fmt: skip
    if config.data.splits_file:
        atomic_write_text(run_dir / "splits.json", json.dumps(splits, indent=2))
    modalities = tuple(task.required_modalities)
    fingerprint_path = run_dir / "fingerprint.json"
    if fingerprint_path.is_file():
        fingerprint = Fingerprint.load(fingerprint_path)
    else:
        specs = normalization_specs(config, modalities)

        def training_subjects():
            for subject_id in splits["train"]:
                record = by_id[subject_id]
                available = [m for m in modalities if m in record.paths]
                yield subject_id, load_subject(record, available, volume_index=config.data.volume_index)

        augmented = screen_draws(config, task, specs)
        fingerprint = Fingerprint.compute(training_subjects, specs, partial=unpaired, augmented=augmented)
        fingerprint.save(fingerprint_path)
    used = [by_id[i] for part in ("train", "val", "test") for i in splits.get(part, []) if i in by_id]
    cohort = prepare_cohort(used, modalities, fingerprint, cache_dir, progress=progress, partial=unpaired)
    return RunData(
        records=by_id, splits=splits, fingerprint=fingerprint, cohort=cohort, modalities=modalities
    )
