"""Issue 25: exports of any input size (2D slices, 3D patches), pt2, and one-line refusals of bad files."""

from __future__ import annotations

import dataclasses
import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from medsynth.cli import main
from medsynth.data.demo import make_demo_cohort
from medsynth.data.masks import bounding_box, foreground_mask
from medsynth.errors import MedsynthError
from medsynth.io.readers import read_volume
from medsynth.io.volume import to_canonical
from medsynth.model.export import EXTRA_FILE, export_model, is_exported, load_exported
from medsynth.model.ood import OODChecker
from medsynth.model.plan import NetworkSpec
from medsynth.model.synthesis import SynthesisModel
from medsynth.nets.registry import build_generator

FILE_FORMATS = ["onnx", "pt2", "torchscript"]
NAMES = {"onnx": "model.onnx", "pt2": "model.pt2", "torchscript": "model_ts.pt"}


def _has_onnx() -> bool:
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


def _needs(fmt: str) -> None:
    if fmt == "onnx":
        pytest.importorskip("onnx")
        pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def other_spacings(tmp_path_factory: pytest.TempPathFactory) -> dict[float, Path]:
    """One demo subject at 3 mm (twice the voxels across of the 6 mm training heads) and at 4.5 mm."""
    paths = {}
    for spacing in (3.0, 4.5):
        root = tmp_path_factory.mktemp(f"spacing{spacing}")
        make_demo_cohort(root, n_subjects=1, spacing_mm=spacing, seed=11, progress=False)
        paths[spacing] = next(root.glob("sub-*/anat/*_T1w.nii.gz"))
    return paths


@pytest.fixture(scope="module")
def exports(tiny_run: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("exports")
    made = {}
    for fmt in FILE_FORMATS:
        if fmt == "onnx" and not _has_onnx():
            continue
        path = folder / NAMES[fmt]
        assert main(["export", "--checkpoint", str(tiny_run), "--format", fmt, "--out", str(path)]) == 0
        made[fmt] = path
    return made


@pytest.mark.parametrize("fmt", FILE_FORMATS)
def test_exports_run_a_larger_head_and_another_spacing_as_the_checkpoint(
    fmt: str, tiny_run: Path, exports: dict[str, Path], other_spacings: dict[float, Path]
) -> None:
    _needs(fmt)
    reference = SynthesisModel.from_checkpoint(tiny_run, precision="fp32")
    exported = load_exported(exports[fmt])
    window = reference.plan.window
    assert window is not None
    for spacing, path in other_spacings.items():
        inputs = {"t1": read_volume(path)}
        if spacing == 3.0:  # the head's in-plane box is at least 1.3x the training window
            canonical = to_canonical(inputs["t1"])[0].array
            box = bounding_box(foreground_mask([canonical]))
            plane = [b for axis, b in enumerate(box) if axis != reference.plan.axis]
            assert all(b.stop - b.start >= 1.3 * w for b, w in zip(plane, window, strict=True))
        want, got = reference.predict(inputs), exported.predict(inputs)
        assert np.abs(got.normalised - want.normalised).max() <= 1e-4
        assert np.abs(got.volume.array - want.volume.array).max() <= 1e-4 * max(
            1.0, float(np.abs(want.volume.array).max())
        )
        assert (want.normalised[want.mask] > -1).mean() > 0.5
        # The out-of-distribution screen reads the same fingerprint: 3 mm is off the 6 mm training data.
        report = OODChecker(exported.fingerprint).check(inputs).to_dict()
        assert report == OODChecker(reference.fingerprint).check(inputs).to_dict()
        if spacing == 3.0:  # outside [6 / 1.5, 6 x 1.5] mm
            assert report["status"] == "out_of_distribution" and "spacing" in json.dumps(report)


@pytest.mark.parametrize("fmt", FILE_FORMATS)
def test_the_exported_graph_takes_any_slice_size(fmt: str, tiny_run: Path, exports: dict[str, Path]) -> None:
    _needs(fmt)
    reference = SynthesisModel.from_checkpoint(tiny_run, precision="fp32")
    exported = load_exported(exports[fmt])
    channels = reference.plan.layout.channels
    generator = reference.generator.float().eval().to(memory_format=torch.contiguous_format)
    for size in ((37, 53), (64, 48), (90, 17)):  # not multiples of the stride, larger and smaller
        x = torch.rand((3, channels, *size)) * 2 - 1
        with torch.no_grad():
            assert torch.allclose(exported.generator(x), generator(x), atol=1e-4, rtol=0)


def _model_3d(reference: SynthesisModel, window: tuple[int, int, int] = (20, 20, 20)) -> SynthesisModel:
    """A 3D U-Net (random weights) with the tiny run's task and fingerprint: no 3D training needed."""
    args = {"spatial_dims": 3, "in_channels": 1, "out_channels": 1, "base_channels": 4, "depth": 2,
            "norm": "instance", "dropout": 0.0}  # fmt: skip
    plan = dataclasses.replace(
        reference.plan, spatial_dims=3, context=1, window=window, generator=NetworkSpec("unet", args)
    )
    torch.manual_seed(0)
    generator = build_generator("unet", **args).eval()
    return SynthesisModel(plan, generator, reference.fingerprint, precision="fp32", digest="0" * 64)


@pytest.mark.parametrize("fmt", FILE_FORMATS)
def test_3d_exports_take_any_patch_size_and_tile_volumes_as_the_model(
    fmt: str, tiny_run: Path, tmp_path: Path, other_spacings: dict[float, Path]
) -> None:
    _needs(fmt)
    model = _model_3d(SynthesisModel.from_checkpoint(tiny_run, precision="fp32"))
    path = export_model(model, tmp_path / NAMES[fmt], fmt)
    exported = load_exported(path)
    assert exported.plan.spatial_dims == 3
    for size in ((26, 26, 26), (21, 32, 17)):  # 1.3x the 20^3 patch, and odd sizes
        x = torch.rand((2, 1, *size)) * 2 - 1
        with torch.no_grad():
            assert torch.allclose(exported.generator(x), model.generator(x), atol=1e-4, rtol=0)
    inputs = {"t1": read_volume(other_spacings[4.5])}
    want, got = model.predict(inputs), exported.predict(inputs)
    assert np.abs(got.normalised - want.normalised).max() <= 1e-4


def test_no_torchscript_or_exporter_warnings_reach_the_user(tiny_run: Path, tmp_path: Path) -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for fmt in ("torchscript", "pt2"):
            path = tmp_path / NAMES[fmt]
            assert main(["export", "--checkpoint", str(tiny_run), "--format", fmt, "--out", str(path)]) == 0
            load_exported(path)
    noisy = [
        str(w.message)[:120] for w in caught if issubclass(w.category, (DeprecationWarning, FutureWarning))
    ]
    assert not [m for m in noisy if "jit" in m.lower() or "torchscript" in m.lower()], noisy


def _one_error(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "\n" not in err and "Traceback" not in err, err
    return err


def _infer(model: Path, volume: Path, out: Path) -> int:
    argv = ["infer", "--volume", str(volume), "--checkpoint", str(model), "--out", str(out)]
    return main([*argv, "--quiet", "--precision", "fp32"])


@pytest.mark.parametrize("fmt", FILE_FORMATS)
def test_a_truncated_export_is_one_line(
    fmt: str, exports: dict[str, Path], other_spacings: dict[float, Path], tmp_path: Path, capsys
) -> None:
    _needs(fmt)
    data = exports[fmt].read_bytes()
    cut = tmp_path / NAMES[fmt]
    cut.write_bytes(data[: len(data) // 2])
    assert _infer(cut, other_spacings[4.5], tmp_path / "syn.nii.gz") == 2
    assert "complete" in _one_error(capsys)
    assert not (tmp_path / "syn.nii.gz").exists()


def test_an_export_of_another_tool_is_one_line(
    other_spacings: dict[float, Path], tmp_path: Path, capsys
) -> None:
    program = torch.export.export(torch.nn.Conv2d(3, 1, 1).eval(), (torch.zeros(2, 3, 8, 8),))
    foreign = tmp_path / "foreign.pt2"
    torch.export.save(program, str(foreign))
    assert is_exported(foreign)
    assert _infer(foreign, other_spacings[4.5], tmp_path / "syn.nii.gz") == 2
    assert "not a medsynth export" in _one_error(capsys)
    # ... and one whose extra file is someone else's JSON
    torch.export.save(program, str(foreign), extra_files={EXTRA_FILE: json.dumps({"model": "x"})})
    assert _infer(foreign, other_spacings[4.5], tmp_path / "syn.nii.gz") == 2
    assert "not a medsynth export" in _one_error(capsys)


def test_infer_runs_a_pt2_export(
    tiny_run: Path, exports: dict[str, Path], other_spacings: dict[float, Path], tmp_path: Path
) -> None:
    volume = other_spacings[3.0]
    assert _infer(exports["pt2"], volume, tmp_path / "pt2.nii.gz") == 0
    assert _infer(tiny_run, volume, tmp_path / "ref.nii.gz") == 0
    got, want = read_volume(tmp_path / "pt2.nii.gz"), read_volume(tmp_path / "ref.nii.gz")
    np.testing.assert_allclose(got.array, want.array, atol=1e-4 * max(1.0, float(np.abs(want.array).max())))
    np.testing.assert_array_equal(got.affine, want.affine)
    sidecar = json.loads((tmp_path / "pt2.json").read_text())
    assert sidecar["checkpoint"]["source_checkpoint_sha256"]


@pytest.mark.parametrize("style", ["compact", "paper"])
@pytest.mark.parametrize("fmt", FILE_FORMATS)
def test_resvit_exports_take_any_slice_size(fmt: str, style: str, tiny_run: Path, tmp_path: Path) -> None:
    """ResViT resizes its positional embedding to the token grid; traced or exported it always does
    (an identity at the training grid), so pt2 and TorchScript follow the input size."""
    _needs(fmt)
    reference = SynthesisModel.from_checkpoint(tiny_run, precision="fp32")
    args = {"spatial_dims": 2, "in_channels": reference.plan.layout.channels, "out_channels": 1,
            "base_channels": 4, "n_downsampling": 2, "n_art_blocks": 2, "transformer_blocks": [1],
            "patch_size": 2, "embed_dim": 16, "n_heads": 2, "n_transformer_layers": 1, "img_size": [32, 32],
            "art_style": style, "token_downsampling": 1}  # fmt: skip
    plan = dataclasses.replace(reference.plan, window=(32, 32), generator=NetworkSpec("resvit", args))
    torch.manual_seed(0)
    model = SynthesisModel(
        plan,
        build_generator("resvit", **args).eval(),
        reference.fingerprint,
        precision="fp32",
        digest="0" * 64,
    )
    exported = load_exported(export_model(model, tmp_path / NAMES[fmt], fmt))
    for size in ((32, 32), (42, 42), (50, 37)):  # the window, 1.3x it, odd
        x = torch.rand((2, args["in_channels"], *size)) * 2 - 1
        if fmt == "onnx" and size != (32, 32):
            # The TorchScript-based ONNX exporter fixes attention's token count: window only, one line.
            with pytest.raises(MedsynthError, match="takes inputs of shape .* only"):
                exported.generator(x)
            continue
        with torch.no_grad():
            assert torch.allclose(exported.generator(x), model.generator(x), atol=1e-4, rtol=0), size
