"""Subject-level splits: seeded, disjoint, saved once, user files validated."""

from __future__ import annotations

import json
import logging

import pytest

from medsynth.data.splits import load_or_create_splits, make_splits, validate_splits
from medsynth.errors import MedsynthError

IDS = [f"sub-{i:02d}" for i in range(20)]


def test_splits_are_deterministic_disjoint_and_independent_of_order() -> None:
    first = make_splits(IDS, seed=3)
    assert first == make_splits(list(reversed(IDS)), seed=3)
    assert first != make_splits(IDS, seed=4)
    members = first["train"] + first["val"] + first["test"]
    assert sorted(members) == IDS and len(set(members)) == len(IDS)
    assert (len(first["val"]), len(first["test"])) == (3, 3)


def test_counts_and_minimum_sizes() -> None:
    splits = make_splits(IDS[:3], val=1, test=1)
    assert [len(splits[k]) for k in ("train", "val", "test")] == [1, 1, 1]
    assert len(make_splits(IDS[:4], val=0.01, test=0.01)["val"]) == 1  # a fraction rounds up to one subject
    with pytest.raises(MedsynthError, match="at least 3 subjects are needed"):
        make_splits(IDS[:2])
    with pytest.raises(MedsynthError, match="not unique: sub-00"):
        make_splits(["sub-00", "sub-00", "sub-01", "sub-02"])
    with pytest.raises(MedsynthError, match="not a fraction"):
        make_splits(IDS, val=1.5)


def test_split_file_is_written_once_and_reused(tmp_path) -> None:
    path = tmp_path / "run" / "splits.json"
    created = load_or_create_splits(path, IDS, seed=1)
    assert json.loads(path.read_text()) == created
    mtime = path.stat().st_mtime_ns
    assert load_or_create_splits(path, IDS, seed=99) == created  # the file wins over new arguments
    assert path.stat().st_mtime_ns == mtime


def test_user_split_file_errors(tmp_path) -> None:
    path = tmp_path / "splits.json"
    path.write_text(json.dumps({"train": ["sub-00", "ghost"], "val": ["sub-01"], "test": []}))
    with pytest.raises(MedsynthError, match="unknown subject ids ghost") as info:
        load_or_create_splits(path, IDS)
    assert str(path) in str(info.value)
    path.write_text(json.dumps({"train": ["sub-00", "sub-01"], "val": ["sub-01"], "test": []}))
    with pytest.raises(MedsynthError, match="'sub-01' is listed twice \\(train and val\\)"):
        load_or_create_splits(path, IDS)
    path.write_text("{not json")
    with pytest.raises(MedsynthError, match="cannot read the split file"):
        load_or_create_splits(path, IDS)
    with pytest.raises(MedsynthError, match='lists "train", "val" and "test"'):
        validate_splits({"train": ["sub-00"]}, IDS)


def test_subjects_in_no_split_are_reported(tmp_path, caplog) -> None:
    path = tmp_path / "splits.json"
    path.write_text(json.dumps({"train": ["sub-00"], "val": ["sub-01"], "test": ["sub-02"]}))
    with caplog.at_level(logging.WARNING, logger="medsynth"):
        splits = load_or_create_splits(path, IDS[:4])
    assert splits["train"] == ["sub-00"]
    assert "sub-03" in caplog.text
    assert validate_splits(splits, IDS[:4]) == ["sub-03"]
