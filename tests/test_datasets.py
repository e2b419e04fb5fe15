"""Slice (2D/2.5D, unified) and patch datasets built on a real preprocessed cache."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from medsynth.data.cache import Cohort, prepare_cohort
from medsynth.data.datasets import PatchDataset, SliceDataset, make_loader
from medsynth.data.fingerprint import Fingerprint, NormalizationSpec
from medsynth.data.layouts import SubjectRecord, load_subject
from medsynth.errors import ConfigError, MedsynthError
from medsynth.model.layout import InputLayout

MODALITIES = ("t1", "t2", "pd")
SHAPE = (24, 20, 12)


def _write_subject(root: Path, sid: str, seed: int, centre: tuple[int, int, int]) -> SubjectRecord:
    rng = np.random.default_rng(seed)
    grid = np.indices(SHAPE)
    offsets = (grid - np.array(centre)[:, None, None, None]) / np.array([7, 6, 4])[:, None, None, None]
    head = (offsets**2).sum(0) <= 1
    paths = {}
    for number, modality in enumerate(MODALITIES):
        array = rng.normal(3.0, 1.0, SHAPE)
        array[head] = 100.0 * (number + 1) + 50.0 * grid[2][head] + rng.normal(0, 5, head.sum())
        path = root / f"{sid}_{modality}.nii.gz"
        nib.save(nib.Nifti1Image(array.astype(np.float32), np.diag([1.5, 1.5, 2.0, 1.0])), path)
        paths[modality] = path
    return SubjectRecord(sid, paths)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Cohort:
    root = tmp_path_factory.mktemp("data")
    records = [_write_subject(root, "a", 0, (8, 9, 5)), _write_subject(root, "b", 1, (14, 10, 6))]
    specs = {m: NormalizationSpec() for m in MODALITIES}
    fingerprint = Fingerprint.compute(((r.id, load_subject(r, MODALITIES)) for r in records), specs)
    return prepare_cohort(records, MODALITIES, fingerprint, root / "cache", progress=False)


def _expected_crop(plane: np.ndarray, centre: tuple[int, int], size: tuple[int, int]) -> np.ndarray:
    """The oracle: pad generously with the background value, then cut the window around ``centre``."""
    pad = max(size)
    padded = np.pad(plane, pad, constant_values=-1.0)
    top, left = centre[0] - size[0] // 2 + pad, centre[1] - size[1] // 2 + pad
    return padded[top : top + size[0], left : left + size[1]]


def _in_plane_extent(cohort: Cohort) -> tuple[int, int]:
    boxes = [cohort.subject(s).bbox for s in cohort.ids]
    return max(b[0].stop - b[0].start for b in boxes), max(b[1].stop - b[1].start for b in boxes)


def test_2d_items_crop_and_foreground_slices(cohort) -> None:
    dataset = SliceDataset(cohort, ["a", "b"], ["t1", "t2"], "pd")
    extent = _in_plane_extent(cohort)
    height, width = dataset.crop_size
    assert height % 16 == 0 and width % 16 == 0 and height >= extent[0] and width >= extent[1]
    batch = dataset.__getitems__(list(range(len(dataset))))
    assert (
        batch["source"].shape == (len(dataset), 2, height, width) and batch["source"].dtype == torch.float32
    )
    assert batch["target"].shape == batch["mask"].shape == (len(dataset), 1, height, width)
    assert (batch["mask"].sum(dim=(1, 2, 3)) >= 1).all()
    every = SliceDataset(cohort, ["a", "b"], ["t1", "t2"], "pd", foreground_only=False)
    assert len(every) == 2 * SHAPE[2] > len(dataset)
    # Item contents are the cached slice, cropped around the subject's in-plane box centre.
    item = dataset[0]
    subject = cohort.subject(item["subject"])
    box = subject.bbox
    centre = ((box[0].start + box[0].stop) // 2, (box[1].start + box[1].stop) // 2)
    expected = _expected_crop(np.asarray(subject.image("t1")[item["slice"]]), centre, (height, width))
    np.testing.assert_array_equal(item["source"][0].numpy(), expected)
    assert item["source"].shape == (2, height, width) and isinstance(item["subject"], str)


def test_padding_outside_the_grid(cohort) -> None:
    dataset = SliceDataset(cohort, ["a"], ["t1"], "t2", crop_size=(48, 40), foreground_only=False)
    item = dataset[3]
    assert item["source"].shape == (1, 48, 40)
    assert (item["source"][0, :5] == -1.0).all() and (item["mask"][0, :5] == 0).all()


def test_25d_context_channels_and_edge_replication(cohort) -> None:
    flat = SliceDataset(cohort, ["a"], ["t1", "t2"], "pd", foreground_only=False)
    deep = SliceDataset(cohort, ["a"], ["t1", "t2"], "pd", context=3, foreground_only=False)
    assert deep.in_channels == 6
    first, middle = deep[0], deep[5]
    assert first["source"].shape[0] == 6
    torch.testing.assert_close(middle["source"][1], flat[5]["source"][0])  # t1 centre
    torch.testing.assert_close(middle["source"][4], flat[5]["source"][1])  # t2 centre
    torch.testing.assert_close(middle["source"][0], flat[4]["source"][0])
    torch.testing.assert_close(first["source"][0], first["source"][1])  # slice -1 repeats slice 0
    last = deep[len(deep) - 1]
    torch.testing.assert_close(last["source"][5], last["source"][4])


def test_other_slicing_axes(cohort) -> None:
    sagittal = SliceDataset(cohort, ["a"], ["t1"], "t2", axis=0, foreground_only=False, crop_size=(20, 12))
    assert len(sagittal) == SHAPE[0]
    item = sagittal[10]
    subject = cohort.subject("a")
    plane = np.asarray(subject.image("t1")).transpose(1, 2, 0)[10]  # volume [i=10, :, :] -> (j, k)
    box = subject.bbox
    centre = ((box[1].start + box[1].stop) // 2, (box[2].start + box[2].stop) // 2)
    expected = _expected_crop(plane, centre, (20, 12))
    np.testing.assert_array_equal(item["source"][0].numpy(), expected)


def test_unified_target_never_an_input(cohort) -> None:
    dataset = SliceDataset(cohort, ["a", "b"], [], None, unified_modalities=MODALITIES, context=3)
    count, context = len(MODALITIES), 3
    assert dataset.in_channels == count * context + 2 * count
    batch = dataset.__getitems__(np.arange(len(dataset)))
    source, available, target_index = batch["source"], batch["available"], batch["target_index"]
    assert source.shape[1] == dataset.in_channels
    assert (available[torch.arange(len(dataset)), target_index] == 0).all()
    assert (available.sum(dim=1) >= 1).all()
    images = source[:, : count * context].reshape(len(dataset), count, context, *source.shape[2:])
    zero = images.abs().amax(dim=(2, 3, 4)) == 0
    assert torch.equal(zero, available == 0)
    planes = source[:, count * context : count * context + count, 0, 0]
    one_hot = source[:, count * context + count :, 0, 0]
    assert torch.equal(planes, available)
    assert torch.equal(one_hot.argmax(dim=1), target_index) and torch.equal(
        one_hot.sum(dim=1), torch.ones(len(dataset))
    )
    assert len({tuple(r) for r in available.tolist()}) > 2  # several subsets are drawn
    # The target is that modality's centre slice, and InputLayout.assemble rebuilds the sample exactly.
    fixed = SliceDataset(cohort, ["a", "b"], ["t1", "t2", "pd"], None, context=3)
    sample = fixed.__getitems__([4])["source"][0].reshape(count, context, *source.shape[2:]).numpy()
    given = {m: sample[i] for i, m in enumerate(MODALITIES) if available[4, i]}
    target = MODALITIES[int(target_index[4])]
    np.testing.assert_array_equal(
        InputLayout(MODALITIES, 3, unified=True).assemble(given, target), source[4].numpy()
    )
    torch.testing.assert_close(batch["target"][4, 0], torch.from_numpy(sample[int(target_index[4]), 1]))


def test_unified_draws_depend_on_seed_and_epoch_only(cohort) -> None:
    dataset = SliceDataset(cohort, ["a", "b"], [], None, unified_modalities=MODALITIES)
    whole = dataset.__getitems__(np.arange(len(dataset)))["available"]
    assert torch.equal(dataset.__getitems__([7, 2])["available"], whole[[7, 2]])
    dataset.set_epoch(1)
    assert not torch.equal(dataset.__getitems__(np.arange(len(dataset)))["available"], whole)


def test_unified_input_errors() -> None:
    with pytest.raises(MedsynthError, match="both an input and the target"):
        InputLayout(MODALITIES, unified=True).assemble({"t1": np.zeros((1, 4, 4))}, "t1")
    with pytest.raises(MedsynthError, match="does not know ct"):
        InputLayout(MODALITIES, unified=True).assemble({"ct": np.zeros((1, 4, 4))}, "t1")
    batched = InputLayout(MODALITIES, unified=True).assemble({"t1": np.ones((5, 1, 4, 4))}, "pd")
    assert batched.shape == (5, 9, 4, 4)


def test_loader_is_deterministic_per_seed_and_epoch(cohort) -> None:
    dataset = SliceDataset(cohort, ["a", "b"], ["t1"], "t2")
    loader = make_loader(dataset, 4, shuffle=True, seed=5, drop_last=False)

    def order() -> list[tuple[str, int]]:
        return [
            (s, int(k)) for batch in loader for s, k in zip(batch["subject"], batch["slice"], strict=True)
        ]

    first = order()
    assert len(first) == len(dataset) == len(set(first)) and len(loader) == -(-len(dataset) // 4)
    assert order() == first
    loader.set_epoch(1)
    assert order() != first and sorted(order()) == sorted(first)
    assert len(make_loader(dataset, 4, shuffle=False, drop_last=True)) == len(dataset) // 4
    with pytest.raises(MedsynthError, match="lower the batch size"):
        make_loader(dataset, 1000, drop_last=True)


def test_a_resumed_epoch_gathers_only_the_batches_it_has_not_trained() -> None:
    class Items:
        gathered: list[list[int]] = []

        def __len__(self) -> int:
            return 20

        def set_epoch(self, epoch: int) -> None:
            pass

        def __getitems__(self, index: np.ndarray) -> list[int]:
            self.gathered.append([int(i) for i in index])
            return self.gathered[-1]

    for rank in (0, 1):
        items = Items()
        loader = make_loader(items, 3, shuffle=True, seed=2, drop_last=True, rank=rank, world_size=2)
        loader.set_epoch(4)
        whole = list(loader)
        items.gathered.clear()
        assert list(loader.batches(2)) == whole[2:] and items.gathered == whole[2:]
        assert list(loader.batches(len(loader))) == []


def test_bad_slice_arguments(cohort) -> None:
    with pytest.raises(ConfigError, match="odd"):
        SliceDataset(cohort, ["a"], ["t1"], "t2", context=2)
    with pytest.raises(MedsynthError, match="no cached 'ct'"):
        SliceDataset(cohort, ["a"], ["ct"], "t2")
    with pytest.raises(MedsynthError, match="not in the prepared cohort"):
        SliceDataset(cohort, ["zz"], ["t1"], "t2")


def test_patch_dataset_shapes_and_foreground_centres(cohort) -> None:
    dataset = PatchDataset(cohort, ["a", "b"], ["t1", "t2"], "pd", patch_size=(8, 8, 4), samples_per_epoch=10)
    assert len(dataset) == 10
    batch = dataset.__getitems__(range(10))
    assert batch["source"].shape == (10, 2, 8, 8, 4)
    assert batch["target"].shape == batch["mask"].shape == (10, 1, 8, 8, 4)
    assert (batch["mask"].sum(dim=(1, 2, 3, 4)) > 0).all()
    assert set(batch["subject"]) <= {"a", "b"}
    torch.testing.assert_close(dataset[3]["source"], batch["source"][3])
    whole = PatchDataset(
        cohort, ["a"], ["t1"], "t2", patch_size=SHAPE, samples_per_epoch=1, foreground_weighted=False
    )
    expected = np.asarray(cohort.subject("a").image("t1")).transpose(1, 2, 0)
    np.testing.assert_array_equal(whole[0]["source"][0].numpy(), expected)


def test_patch_larger_than_volume_names_the_largest_that_fits(cohort) -> None:
    with pytest.raises(MedsynthError, match=r"largest patch that fits every subject is \(24, 20, 12\)"):
        PatchDataset(cohort, ["a", "b"], ["t1"], "t2", patch_size=(32, 16, 8), samples_per_epoch=4)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"sources": ["t1"], "target": "t2"},
        {"sources": ["t1", "pd"], "target": "t2", "context": 3},
        {"sources": [], "target": None, "unified_modalities": MODALITIES, "context": 3},
        {"sources": ["t1"], "target": "t2", "axis": 0},
    ],
)
def test_torch_gather_equals_numpy_gather(cohort, kwargs) -> None:
    """The GPU-resident path (here: torch indexing on the CPU) yields the numpy path's batches exactly."""
    kwargs = dict(kwargs)
    sources, target = kwargs.pop("sources"), kwargs.pop("target")
    host = SliceDataset(cohort, ["a", "b"], sources, target, seed=3, **kwargs)
    resident = SliceDataset(cohort, ["a", "b"], sources, target, seed=3, **kwargs)
    resident.to_device("cpu")
    for epoch in (0, 2):
        loaders = [make_loader(d, 5, shuffle=True, seed=1, drop_last=True) for d in (host, resident)]
        for loader in loaders:
            loader.set_epoch(epoch)
        for expected, got in zip(*loaders, strict=True):
            assert expected.keys() == got.keys()
            for key, value in expected.items():
                if isinstance(value, torch.Tensor):
                    assert got[key].dtype == value.dtype and got[key].shape == value.shape, key
                    assert torch.equal(got[key], value), key
                else:
                    assert got[key] == value


def test_place_on_device_leaves_a_cpu_run_alone(cohort) -> None:
    from medsynth.data.datasets import place_on_device

    dataset = SliceDataset(cohort, ["a", "b"], ["t1"], "t2")
    assert "host" in place_on_device(dataset, torch.device("cpu"), resident=True)
    assert dataset._resident is None and not dataset.pin_memory
    assert dataset.resident_bytes > 0
