"""The preprocessed cache: canonical, normalised, slice-first arrays; reused and invalidated by its key."""

from __future__ import annotations

import json
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medsynth.data import cache as cache_module
from medsynth.data.cache import prepare_cohort
from medsynth.data.fingerprint import Fingerprint, NormalizationSpec
from medsynth.data.layouts import SubjectRecord, load_subject
from medsynth.errors import DataError, MedsynthError

# LPS-like voxel axes (i runs right-to-left, j anterior-to-posterior), so reorientation is exercised.
AFFINE = np.array([[-2.0, 0, 0, 20.0], [0, -2.0, 0, 30.0], [0, 0, 3.0, -10.0], [0, 0, 0, 1]])
SHAPE = (18, 20, 10)


def _write_subject(root: Path, sid: str, seed: int) -> SubjectRecord:
    rng = np.random.default_rng(seed)
    grid = np.indices(SHAPE)
    head = (
        ((grid - np.array([9, 11, 5])[:, None, None, None]) / np.array([6, 7, 4])[:, None, None, None]) ** 2
    ).sum(0) <= 1
    paths = {}
    for modality, level in (("t1", 600.0), ("t2", 300.0)):
        array = rng.normal(5.0, 1.0, SHAPE)
        array[head] = level * (1 + 0.2 * rng.random(head.sum()))
        path = root / sid / f"{sid}_{modality}.nii.gz"
        path.parent.mkdir(parents=True, exist_ok=True)
        nib.save(nib.Nifti1Image(array.astype(np.float32), AFFINE), path)
        paths[modality] = path
    return SubjectRecord(sid, paths)


@pytest.fixture
def dataset(tmp_path) -> tuple[list[SubjectRecord], Fingerprint]:
    records = [_write_subject(tmp_path / "data", f"sub-{i}", i) for i in range(2)]
    specs = {"t1": NormalizationSpec(), "t2": NormalizationSpec()}
    fingerprint = Fingerprint.compute(((r.id, load_subject(r, ["t1", "t2"])) for r in records), specs)
    return records, fingerprint


def _mtimes(folder: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in sorted(folder.glob("*"))}


def test_cached_arrays_are_canonical_normalised_and_slice_first(tmp_path, dataset) -> None:
    records, fingerprint = dataset
    cohort = prepare_cohort(records, ["t1", "t2"], fingerprint, tmp_path / "cache", progress=False)
    subject = cohort.subject("sub-0")
    image = subject.image("t1")
    assert isinstance(image, np.memmap) and image.dtype == np.float32
    assert image.shape == (SHAPE[2], SHAPE[0], SHAPE[1])  # (k, i, j)
    original = nib.load(records[0].paths["t1"]).get_fdata(dtype=np.float32)
    canonical = original[::-1, ::-1, :]  # LPS -> RAS flips i and j
    expected = fingerprint.input_normalizer("t1", canonical).forward(canonical).transpose(2, 0, 1)
    np.testing.assert_array_equal(image, expected)
    assert image.min() >= -1.0 and image.max() <= 1.0
    assert subject.mask.dtype == np.uint8 and subject.mask.shape == image.shape
    assert nib.aff2axcodes(subject.affine) == ("R", "A", "S")
    np.testing.assert_allclose(subject.affine @ [SHAPE[0] - 1, SHAPE[1] - 1, 0, 1], AFFINE @ [0, 0, 0, 1])
    meta = json.loads((subject.folder / "meta.json").read_text())
    assert meta["original_shape"] == list(SHAPE) and meta["original_orientation"] == "LPS"
    assert meta["normalizers"]["t1"]["scheme"] == "percentile"
    box = subject.bbox
    mask_ijk = np.asarray(subject.mask).transpose(1, 2, 0)
    assert mask_ijk[box].sum() == mask_ijk.sum() > 0
    with pytest.raises(MedsynthError, match="no cached 'pd'"):
        subject.image("pd")


def test_cache_is_reused_without_decoding(tmp_path, dataset, monkeypatch) -> None:
    records, fingerprint = dataset
    first = prepare_cohort(records, ["t1", "t2"], fingerprint, tmp_path / "cache", progress=False)
    before = _mtimes(first.subject("sub-0").folder)

    def refuse(*args, **kwargs):
        raise AssertionError("a cached subject was decoded again")

    monkeypatch.setattr(cache_module, "load_subject", refuse)
    cohort = prepare_cohort(records, ["t1", "t2"], fingerprint, tmp_path / "cache", progress=False)
    assert _mtimes(cohort.subject("sub-0").folder) == before
    assert cohort.ids == ("sub-0", "sub-1")


def test_changed_input_file_rebuilds_only_that_subject(tmp_path, dataset) -> None:
    records, fingerprint = dataset
    first = prepare_cohort(records, ["t1", "t2"], fingerprint, tmp_path / "cache", progress=False)
    untouched = _mtimes(first.subject("sub-1").folder)
    old = np.array(first.subject("sub-0").image("t1"))
    _write_subject(tmp_path / "data", "sub-0", seed=7)  # new pixels, same paths
    stat = records[0].paths["t1"].stat()
    os.utime(records[0].paths["t1"], ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    cohort = prepare_cohort(records, ["t1", "t2"], fingerprint, tmp_path / "cache", progress=False)
    assert not np.array_equal(cohort.subject("sub-0").image("t1"), old)
    assert _mtimes(cohort.subject("sub-1").folder) == untouched
    # The first preparation still reads its own arrays: a run never validates on another run's data
    # for the same subject id, even when both share one cache folder.
    np.testing.assert_array_equal(first.subject("sub-0").image("t1"), old)


def test_changed_settings_rebuild(tmp_path, dataset) -> None:
    records, fingerprint = dataset
    first = prepare_cohort(records, ["t1", "t2"], fingerprint, tmp_path / "cache", progress=False)
    before = json.loads((first.subject("sub-0").folder / "meta.json").read_text())["key"]
    zscore = Fingerprint(
        specs={**fingerprint.specs, "t1": NormalizationSpec("zscore")}, cohort=fingerprint.cohort, subjects={}
    )
    cohort = prepare_cohort(records, ["t1", "t2"], zscore, tmp_path / "cache", progress=False)
    subject = cohort.subject("sub-0")
    assert subject.meta["key"] != before
    assert subject.meta["normalizers"]["t1"]["scheme"] == "zscore"
    assert subject.image("t1").min() < -1.0  # z-scores are not clipped to [-1, 1]


def test_missing_modality_and_unknown_subject(tmp_path, dataset) -> None:
    records, fingerprint = dataset
    with pytest.raises(DataError, match="sub-0 has no pd image"):
        prepare_cohort(records, ["t1", "pd"], fingerprint, tmp_path / "cache", progress=False)
    cohort = prepare_cohort(records[:1], ["t1"], fingerprint, tmp_path / "cache", progress=False)
    with pytest.raises(MedsynthError, match="'sub-1' is not in the prepared cohort"):
        cohort.subject("sub-1")
