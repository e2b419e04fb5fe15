"""The preprocessed cache: each subject decoded, reoriented and normalised once, then memory-mapped.

Decoding DICOM/NIfTI, resampling and normalising cost far more than a training step, so
:func:`prepare_cohort` does it once per subject and stores, under ``cache_dir/<subject>/<key>/``:

* ``<modality>.npy``: float32, canonical RAS, normalised with the volume's own statistics
  (:meth:`Fingerprint.input_normalizer`), **stored slice-axis first** as ``(k, i, j)`` so that an axial
  slice ``[:, :, k]`` of the volume is one contiguous block of the file;
* ``mask.npy``: uint8 foreground of all modalities together, same ``(k, i, j)`` layout;
* ``meta.json`` (written last, so its presence means the subject is complete): the key, canonical
  affine and shape, original shape/affine/orientation, the normalisers' parameters and the foreground
  bounding box in volume order ``(i, j, k)``.

The key hashes every input file's path, size and ``mtime_ns`` (all files of a DICOM folder), the series
UIDs, the modalities, the preprocessing version and the fingerprint's digest. The key names the folder,
so runs that share a cache (one ``--runs-dir``) but differ in data or normalisation never read each
other's arrays, even while both are running; equal keys are reused without being decoded. Folders of
keys no run uses any more are left in place: delete ``<runs-dir>/.cache`` to reclaim the space.

Axial is the storage order and the fast path. Sagittal or coronal slicing transposes a subject's arrays
once when a dataset loads them (``SliceDataset(axis=0|1)``), which costs one copy per subject, not
per slice.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from tqdm import tqdm

from ..errors import DataError, MedsynthError
from ..io.atomic import atomic_path, atomic_write_text
from ..io.volume import to_canonical
from .fingerprint import Fingerprint
from .layouts import SubjectRecord, load_subject
from .masks import bounding_box, foreground_mask

_FORMAT = "medsynth-cache"
#: Bump when the preprocessing itself changes, so every cached subject is rebuilt.
PREPROCESSING_VERSION = 2  # 2: log-Otsu head masks (consistent across contrasts)


def _file_signature(path: Path) -> list[Any]:
    """Path, size and mtime of a file, or of every file inside a DICOM folder."""
    try:
        if path.is_dir():
            return [
                [str(f.relative_to(path)), f.stat().st_size, f.stat().st_mtime_ns]
                for f in sorted(path.rglob("*"))
                if f.is_file()
            ]
        stat = path.stat()
    except OSError as exc:
        raise DataError(f"cannot read the input ({exc.strerror}); check the path", path) from exc
    return [stat.st_size, stat.st_mtime_ns]


def subject_key(record: SubjectRecord, modalities: Sequence[str], fingerprint: Fingerprint) -> str:
    """Hash of everything a subject's cached arrays depend on."""
    inputs = {
        m: {
            "path": str(Path(record.paths[m]).resolve()),
            "series_uid": record.series_uids.get(m),
            "files": _file_signature(Path(record.paths[m])),
        }
        for m in modalities
    }
    settings = {
        "version": PREPROCESSING_VERSION,
        "modalities": list(modalities),
        "fingerprint": fingerprint.digest(),
        "inputs": inputs,
    }
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:20]


def _save_npy(path: Path, array: np.ndarray) -> None:
    with atomic_path(path) as temp:
        np.save(temp, array)


def _build_subject(
    record: SubjectRecord, modalities: Sequence[str], fingerprint: Fingerprint, folder: Path, key: str
) -> None:
    (folder / "meta.json").unlink(
        missing_ok=True
    )  # a crash mid-rebuild must not leave a valid-looking subject
    subject = load_subject(record, modalities)
    canonical = {m: to_canonical(subject[m])[0] for m in modalities}
    first = subject[modalities[0]]
    grid = canonical[modalities[0]]
    mask = foreground_mask([canonical[m].array for m in modalities])
    normalizers = {}
    for m in modalities:
        normalizer = fingerprint.input_normalizer(m, canonical[m].array)
        _save_npy(
            folder / f"{m}.npy",
            np.ascontiguousarray(normalizer.forward(canonical[m].array).transpose(2, 0, 1)),
        )
        normalizers[m] = normalizer.to_dict()
    _save_npy(folder / "mask.npy", np.ascontiguousarray(mask.transpose(2, 0, 1).astype(np.uint8)))
    meta = {
        "format": _FORMAT,
        "key": key,
        "subject": record.id,
        "modalities": list(modalities),
        "storage_axes": "kij",
        "shape": list(grid.shape),
        "affine": grid.affine.tolist(),
        "original_shape": list(first.shape),
        "original_affine": first.affine.tolist(),
        "original_orientation": "".join(nib.aff2axcodes(first.affine)),
        "normalizers": normalizers,
        "bbox": [[s.start, s.stop] for s in bounding_box(mask)],
        "foreground_voxels": int(mask.sum()),
    }
    atomic_write_text(folder / "meta.json", json.dumps(meta, indent=1) + "\n")


def _read_meta(folder: Path) -> dict[str, Any] | None:
    try:
        return json.loads((folder / "meta.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None


def _is_current(folder: Path, key: str, modalities: Sequence[str]) -> bool:
    meta = _read_meta(folder)
    if meta is None or meta.get("key") != key:
        return False
    return all((folder / f"{name}.npy").is_file() for name in (*modalities, "mask"))


@dataclass(frozen=True)
class CachedSubject:
    """One subject's preprocessed arrays (memory-mapped, read-only) and metadata.

    ``image()`` and ``mask`` are in storage order ``(k, i, j)``; ``bbox`` and ``affine`` describe the
    canonical volume in ``(i, j, k)`` order, as every ``Volume`` does.
    """

    id: str
    folder: Path
    meta: dict[str, Any]

    @property
    def modalities(self) -> tuple[str, ...]:
        return tuple(self.meta["modalities"])

    def image(self, modality: str) -> np.ndarray:
        """Normalised float32 image, shape ``(k, i, j)``, memory-mapped read-only."""
        if modality not in self.modalities:
            raise MedsynthError(
                f"subject {self.id} has no cached {modality!r} (it has {', '.join(self.modalities)}); "
                "prepare the cache with that modality",
                self.folder,
            )
        return np.load(self.folder / f"{modality}.npy", mmap_mode="r")

    @property
    def mask(self) -> np.ndarray:
        """Foreground mask (uint8 0/1), shape ``(k, i, j)``, memory-mapped read-only."""
        return np.load(self.folder / "mask.npy", mmap_mode="r")

    @property
    def bbox(self) -> tuple[slice, slice, slice]:
        """Foreground bounding box in canonical volume order ``(i, j, k)``."""
        return tuple(slice(start, stop) for start, stop in self.meta["bbox"])  # type: ignore[return-value]

    @property
    def affine(self) -> np.ndarray:
        """Voxel ``(i, j, k)`` to RAS mm of the canonical grid."""
        return np.asarray(self.meta["affine"], dtype=np.float64)


class Cohort:
    """The cached subjects of one preparation, opened lazily by id, each under its own key."""

    def __init__(self, cache_dir: str | Path, keys: dict[str, str], modalities: Sequence[str]) -> None:
        self.cache_dir = Path(cache_dir)
        self.keys = dict(keys)
        self.ids = tuple(keys)
        self.modalities = tuple(modalities)

    def subject(self, subject_id: str) -> CachedSubject:
        if subject_id not in self.keys:
            raise MedsynthError(f"subject {subject_id!r} is not in the prepared cohort", self.cache_dir)
        folder = _subject_folder(self.cache_dir, subject_id) / self.keys[subject_id]
        meta = _read_meta(folder)
        if meta is None or meta.get("key") != self.keys[subject_id]:
            raise DataError("cached subject is missing or damaged; run the preparation again", folder)
        return CachedSubject(subject_id, folder, meta)


def _subject_folder(cache_dir: Path, subject_id: str) -> Path:
    if not subject_id or subject_id in (".", "..") or "/" in subject_id or "\\" in subject_id:
        raise MedsynthError(f"subject id {subject_id!r} cannot name a cache folder; rename the subject")
    return cache_dir / subject_id


def prepare_cohort(
    records: Sequence[SubjectRecord],
    modalities: Sequence[str],
    fingerprint: Fingerprint,
    cache_dir: str | Path,
    *,
    progress: bool = True,
    partial: bool = False,
) -> Cohort:
    """Bring every record's ``modalities`` into the cache, rebuilding only subjects whose key changed.

    ``partial``: a subject may lack some of them and caches those it has (unpaired training,
    :mod:`.pairing`); its foreground mask is then that of its own images.
    """
    cache_dir = Path(cache_dir)
    modalities = list(modalities)
    if not modalities:
        raise MedsynthError("no modality to prepare; name at least one, e.g. t1")
    keys = {}
    for record in tqdm(records, desc="preparing cache", unit="subject", disable=None if progress else True):
        missing = [m for m in modalities if m not in record.paths]
        own = [m for m in modalities if m in record.paths] if partial else modalities
        if (missing and not partial) or not own:
            raise DataError(
                f"subject {record.id} has no {', '.join(missing)} image; add it or leave the subject out"
            )
        key = subject_key(record, own, fingerprint)
        folder = _subject_folder(cache_dir, record.id) / key
        if not _is_current(folder, key, own):
            _build_subject(record, own, fingerprint, folder, key)
        keys[record.id] = key
    return Cohort(cache_dir, keys, modalities)
