"""Issue 31, model files: no file runs its own code (1, 2), no export loses a folder (3, 8, 16), foreign
or damaged exports are one line (5, 6), metadata is bound to its network (11), ``export --target`` (13).

Payload tests follow the issue: a crafted file whose loading would run ``touch MARKER`` (a pickle's
``__reduce__``, a pt2 guard, a shape expression), and the test asserts that no marker appears.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from medsynth.cli import main
from medsynth.errors import CheckpointError
from medsynth.model.bundle import INFERENCE, METADATA, MODEL_FILE, README
from medsynth.model.export import EXTRA_FILE, METADATA_KEY, load_exported
from medsynth.model.safe_load import network_digest, pickle_globals, read_archive

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

NAMES = {"onnx": "model.onnx", "pt2": "model.pt2", "torchscript": "model_ts.pt"}


class _Payload:
    """Unpickled, it runs ``touch MARKER``: what a crafted model file would do to whoever loads it."""

    def __init__(self, marker: Path) -> None:
        self.command = f"touch {marker}"

    def __reduce__(self) -> tuple[Callable[[str], int], tuple[str]]:
        return (os.system, (self.command,))


def _payload(marker: Path) -> bytes:
    return pickle.dumps(_Payload(marker), protocol=2)


def _guard_payload(marker: Path) -> str:
    """The same as Python source, as a pt2 input guard (which torch.export runs with exec)."""
    return f"__import__('os').system('touch {marker}') == 0"


def _expression_payload(marker: Path) -> str:
    """The same as a shape expression: reaches builtins through a sympy function (sympify evals it)."""
    return f"sympify.__globals__['__builtins__']['__import__']('os').system('touch {marker}')"


@pytest.fixture(scope="module")
def exports(tiny_run: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("model_files")
    for fmt, name in NAMES.items():
        assert (
            main(["export", "--checkpoint", str(tiny_run), "--format", fmt, "--out", str(folder / name)]) == 0
        )
    bundle = folder / "bundle"
    assert (
        main(["export", "--checkpoint", str(tiny_run), "--format", "monai-bundle", "--out", str(bundle)]) == 0
    )
    return {**{fmt: folder / name for fmt, name in NAMES.items()}, "bundle": bundle}


@pytest.fixture
def volume(tiny_run: Path, tiny_cohort: Path) -> Path:
    subject = json.loads((tiny_run / "splits.json").read_text())["test"][0]
    return tiny_cohort / subject / "anat" / f"{subject}_T1w.nii.gz"


def _infer(model: Path, volume: Path, out: Path, *extra: str) -> int:
    argv = ["infer", "--volume", str(volume), "--checkpoint", str(model), "--out", str(out), "--quiet"]
    return main([*argv, "--precision", "fp32", *extra])


def _one_error(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "\n" not in err and "Traceback" not in err, err
    return err


def _edit_archive(source: Path, target: Path, edits: dict[str, Callable[[bytes], bytes]]) -> Path:
    """A copy of a zip archive with some entries (named below its root folder) rewritten."""
    with zipfile.ZipFile(source) as archive, zipfile.ZipFile(target, "w") as out:
        for info in archive.infolist():
            data = archive.read(info)
            relative = info.filename.split("/", 1)[1]
            out.writestr(info, edits[relative](data) if relative in edits else data)
    return target


def _program(edit: Callable[[dict], None]) -> Callable[[bytes], bytes]:
    def rewrite(data: bytes) -> bytes:
        program = json.loads(data)
        edit(program)
        return json.dumps(program).encode()

    return rewrite


def _first_expression(program: dict, text: str) -> None:
    """Replace the first stored shape expression (``expr_str``) of a program."""
    stack: list = [program]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            if "expr_str" in node:
                node["expr_str"] = text
                return
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    raise AssertionError("the export has no shape expression")


def _file_operator(program: dict) -> None:
    """Make the first node call ``aten::save`` (which writes any path) instead of its operator."""
    program["graph_module"]["graph"]["nodes"][0]["target"] = "torch.ops.aten.save.default"


def _pickled_weight(source: Path, target: Path, marker: Path) -> Path:
    """The issue's file: medsynth's own pt2 with one weight switched to a pickled entry holding a payload."""
    config_name = "data/weights/model_weights_config.json"
    with zipfile.ZipFile(source) as archive:
        root = archive.namelist()[0].split("/")[0]
        config = json.loads(archive.read(f"{root}/{config_name}"))
    first = next(iter(config["config"].values()))
    first["use_pickle"] = True
    edits = {config_name: lambda _: json.dumps(config).encode(), f"data/weights/{first['path_name']}": lambda _: _payload(marker)}  # fmt: skip
    return _edit_archive(source, target, edits)


def _pt2_crafts(marker: Path) -> dict[str, dict[str, Callable[[bytes], bytes]]]:
    zipped = io.BytesIO()
    torch.save(_Payload(marker), zipped)
    return {
        "bare_sample_inputs": {"data/sample_inputs/model.pt": lambda _: _payload(marker)},
        "zipped_sample_inputs": {"data/sample_inputs/model.pt": lambda _: zipped.getvalue()},
        "guard": {"models/model.json": _program(lambda p: p["guards_code"].append(_guard_payload(marker)))},
        "shape_expression": {"models/model.json": _program(lambda p: _first_expression(p, _expression_payload(marker)))},
        "file_operator": {"models/model.json": _program(_file_operator)},
    }  # fmt: skip


# ------------------------------------------------------------ 1: no model file runs code
@pytest.mark.parametrize("name", ["evil.pt2", "evil.pt", "evil.onnx"])
def test_a_pt2_with_a_pickled_weight_never_runs_its_payload(
    name: str, exports: dict[str, Path], volume: Path, tmp_path: Path, capsys
) -> None:
    marker = tmp_path / "MARKER"
    evil = _pickled_weight(exports["pt2"], tmp_path / name, marker)
    assert _infer(evil, volume, tmp_path / "x.nii.gz") == 2
    assert "refused" in _one_error(capsys) and not marker.exists()
    batch = tmp_path / "batch"
    batch.mkdir()
    shutil.copy(volume, batch / "a_T1w.nii.gz")
    argv = ["infer", "--inputs", str(batch), "--checkpoint", str(evil), "--out", str(tmp_path / "out")]
    assert main(argv) == 2 and not marker.exists()
    assert not (tmp_path / "x.nii.gz").exists()


@pytest.mark.parametrize(
    "craft", ["bare_sample_inputs", "zipped_sample_inputs", "guard", "shape_expression", "file_operator"]
)
def test_a_crafted_pt2_never_runs_its_payload(
    craft: str, exports: dict[str, Path], volume: Path, tmp_path: Path, capsys
) -> None:
    marker = tmp_path / "MARKER"
    evil = _edit_archive(exports["pt2"], tmp_path / "evil.pt2", _pt2_crafts(marker)[craft])
    assert _infer(evil, volume, tmp_path / "x.nii.gz") == 2
    assert "refused" in _one_error(capsys)
    assert not marker.exists()


@pytest.mark.parametrize("entry", ["constants.pkl", "data.pkl"])
def test_a_crafted_torchscript_never_runs_its_payload(
    entry: str, exports: dict[str, Path], volume: Path, tmp_path: Path, capsys
) -> None:
    marker = tmp_path / "MARKER"
    evil = _edit_archive(exports["torchscript"], tmp_path / "evil.pt", {entry: lambda _: _payload(marker)})
    assert _infer(evil, volume, tmp_path / "x.nii.gz") == 2
    err = _one_error(capsys)
    assert "refused" in err and "posix.system" in err and not marker.exists()


class _Writer(torch.nn.Module):
    """A network that also writes a file (``aten::save``): a shell's start-up file, for a crafted one."""

    def __init__(self, channels: int, path: str) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(channels, 1, 3, padding=1)
        self.path = path

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        torch.save(x, self.path)
        return self.conv(x)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.jit
def test_a_torchscript_that_writes_files_is_refused(
    exports: dict[str, Path], volume: Path, tmp_path: Path, capsys
) -> None:
    marker = tmp_path / "MARKER"
    meta = _metadata(exports["torchscript"])
    scripted = torch.jit.script(_Writer(meta["input_shape"][0], str(marker)))
    evil = tmp_path / "evil.pt"
    torch.jit.save(scripted, str(evil), _extra_files={EXTRA_FILE: json.dumps(meta)})
    assert _infer(evil, volume, tmp_path / "x.nii.gz") == 2
    assert "reads or writes files" in _one_error(capsys) and not marker.exists()


@pytest.mark.parametrize("where", ["legacy", "zip"])
def test_a_checkpoint_with_a_payload_never_runs_it(where: str, volume: Path, tmp_path: Path, capsys) -> None:
    marker = tmp_path / "MARKER"
    evil = tmp_path / "evil.pt"
    if where == "legacy":
        evil.write_bytes(_payload(marker))
    else:
        torch.save({"format": "medsynth-checkpoint", "plan": _Payload(marker)}, evil)
    assert _infer(evil, volume, tmp_path / "x.nii.gz") == 2
    assert "refused to load" in _one_error(capsys) and not marker.exists()


def test_an_onnx_file_with_a_payload_never_runs_it(
    exports: dict[str, Path], volume: Path, tmp_path: Path, capsys
) -> None:
    marker = tmp_path / "MARKER"
    proto = onnx.load(str(exports["onnx"]))
    proto.graph.initializer[0].raw_data = _payload(marker)  # a pickle where weights belong
    for entry in proto.metadata_props:
        entry.value = _payload(marker).decode("latin-1")  # and where the metadata belongs
    evil = tmp_path / "evil.onnx"
    onnx.save(proto, str(evil))
    assert _infer(evil, volume, tmp_path / "x.nii.gz") == 2
    _one_error(capsys)
    assert not marker.exists()


def test_an_onnx_file_pointing_at_external_data_is_refused(
    exports: dict[str, Path], volume: Path, tmp_path: Path, capsys
) -> None:
    proto = onnx.load(str(exports["onnx"]))
    tensor = proto.graph.initializer[0]
    tensor.ClearField("raw_data")
    tensor.data_location = onnx.TensorProto.EXTERNAL
    entry = tensor.external_data.add()
    entry.key, entry.value = "location", "/etc/hostname"
    evil = tmp_path / "evil.onnx"
    onnx.save(proto, str(evil))
    assert _infer(evil, volume, tmp_path / "x.nii.gz") == 2
    assert "external" in _one_error(capsys)


def _rehash(bundle: Path, *names: str) -> None:
    """Record the new SHA-256 of edited files in the metadata, as whoever crafts a bundle can."""
    from medsynth.model.checkpoint import file_digest

    meta = json.loads((bundle / METADATA).read_text())
    meta["medsynth"]["files"].update({name: file_digest(bundle / name) for name in names})
    (bundle / METADATA).write_text(json.dumps(meta))


def test_a_bundle_never_runs_a_payload(
    exports: dict[str, Path], volume: Path, tmp_path: Path, capsys
) -> None:
    marker = tmp_path / "MARKER"
    bundle = Path(shutil.copytree(exports["bundle"], tmp_path / "bundle"))
    # MONAI's runner would evaluate this config; medsynth infer never does.
    config = json.loads((bundle / INFERENCE).read_text())
    config["imports"].append(f"$__import__('os').system('touch {marker}')")
    (bundle / INFERENCE).write_text(json.dumps(config))
    _rehash(bundle, INFERENCE)
    assert _infer(bundle, volume, tmp_path / "x.nii.gz") == 0
    assert not marker.exists()
    # A pickled payload as the model, its digest recorded: the safe unpickler refuses it.
    torch.save({"format": "medsynth-checkpoint", "plan": _Payload(marker)}, bundle / MODEL_FILE)
    _rehash(bundle, MODEL_FILE)
    capsys.readouterr()
    assert _infer(bundle, volume, tmp_path / "y.nii.gz") == 2
    assert "refused to load" in _one_error(capsys) and not marker.exists()


def test_pickle_globals_refuses_what_it_cannot_tell_without_running() -> None:
    assert pickle_globals(_payload(Path("m"))) == {"posix.system"}
    assert "posix.system" in pickle_globals(pickle.dumps(_Payload(Path("m")), protocol=4))  # STACK_GLOBAL
    computed = b"\x80\x04\x8c\x02os\x8c\x06system\x93."  # names pushed, then a computed pair (no memo)
    assert pickle_globals(computed) == {"os.system"}
    with pytest.raises(ValueError):
        pickle_globals(b"\x80\x04\x8c\x02os\x8c\x06system0\x93.")  # a POP between: not the two strings
    with pytest.raises(ValueError):
        pickle_globals(b"\x80\x02\x82\x01.")  # EXT1: a global from the copyreg registry


# --------------------------------------------------------- 2: every file of a bundle
@pytest.mark.parametrize("change", ["added", "removed", "changed config", "changed card", "linked"])
def test_infer_refuses_a_bundle_with_a_file_added_removed_or_changed(
    change: str, exports: dict[str, Path], volume: Path, tmp_path: Path, capsys
) -> None:
    bundle = Path(shutil.copytree(exports["bundle"], tmp_path / "bundle"))
    if change == "added":
        (bundle / "configs" / "evaluate.json").write_text("{}")
    elif change == "removed":
        (bundle / README).unlink()
    elif change == "changed config":
        (bundle / INFERENCE).write_text((bundle / INFERENCE).read_text().replace("cpu", "cuda"))
    elif change == "changed card":
        (bundle / README).write_text("# someone else's model\n")
    else:
        (bundle / README).unlink()
        (bundle / README).symlink_to(exports["bundle"] / README)
    assert _infer(bundle, volume, tmp_path / "x.nii.gz") == 2
    err = _one_error(capsys)
    assert "bundle" in err and not (tmp_path / "x.nii.gz").exists()


# ------------------------------------------------ 3, 8, 16: export never loses a folder
def _bundle_export(run: Path, out: Path | str, *extra: str) -> int:
    return main(["export", "--checkpoint", str(run), "--format", "monai-bundle", "--out", str(out), *extra])


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("holding", ["run", "cohort", "volumes", "altered bundle", "zoo bundle"])
@pytest.mark.parametrize("overwrite", [False, True])
def test_a_bundle_export_never_replaces_a_folder_it_did_not_write(
    holding: str, overwrite: bool, tiny_run: Path, tiny_cohort: Path, exports: dict[str, Path], tmp_path: Path,
    volume: Path, capsys,
) -> None:  # fmt: skip
    run = Path(shutil.copytree(tiny_run, tmp_path / "run"))
    if holding == "run":
        out = run  # the run being exported
    elif holding == "cohort":
        out = Path(shutil.copytree(tiny_cohort, tmp_path / "cohort"))
    elif holding == "volumes":
        out = tmp_path / "volumes"
        out.mkdir()
        shutil.copy(volume, out / "case01.nii.gz")
    else:
        out = Path(shutil.copytree(exports["bundle"], tmp_path / "bundle"))
        if holding == "altered bundle":
            shutil.copy(volume, out / "case01.nii.gz")
        else:  # another tool's bundle: the same file names, no medsynth block
            meta = json.loads((out / METADATA).read_text())
            del meta["medsynth"]
            (out / METADATA).write_text(json.dumps(meta))
    before = _snapshot(out)
    assert _bundle_export(run, out, *(["--overwrite"] if overwrite else [])) == 2
    err = _one_error(capsys)
    assert "--overwrite" not in err
    assert _snapshot(out) == before


def test_a_bundle_export_replaces_its_own_earlier_bundle(exports: dict[str, Path], tiny_run: Path, tmp_path: Path) -> None:  # fmt: skip
    out = Path(shutil.copytree(exports["bundle"], tmp_path / "bundle"))
    (out / README).write_text("# edited card\n")  # the bundle's own file, edited: still the bundle
    assert _bundle_export(tiny_run, out) == 0
    assert (out / README).read_text() != "# edited card\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]


@pytest.mark.parametrize("content", ["files", "empty", "bundle"])
def test_a_bundle_export_into_the_current_folder_is_one_line(
    content: str, exports: dict[str, Path], tiny_run: Path, tmp_path: Path, monkeypatch, capsys
) -> None:
    here = tmp_path / "here"
    if content == "bundle":
        shutil.copytree(exports["bundle"], here)
    else:
        here.mkdir()
        if content == "files":
            (here / "notes.txt").write_text("keep")
    monkeypatch.chdir(here)
    before = _snapshot(here)
    assert _bundle_export(tiny_run, ".", "--overwrite") == 2
    assert "current folder" in _one_error(capsys)
    assert _snapshot(here) == before and Path.cwd() == here


def test_a_bundle_export_onto_a_link_leaves_no_partial(tiny_run: Path, tmp_path: Path) -> None:
    target = tmp_path / "real"
    target.mkdir()
    link = tmp_path / "link"
    link.symlink_to(target)
    assert _bundle_export(tiny_run, link) == 0
    assert link.is_dir() and not link.is_symlink() and (link / METADATA).is_file()
    assert target.is_dir() and not any(target.iterdir())  # the folder the link named is untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link", "real"]


# --------------------------------------------- 5, 11: foreign networks, copied metadata
def _metadata(path: Path) -> dict:
    with zipfile.ZipFile(path) as archive:
        name = next(n for n in archive.namelist() if n.endswith(f"extra/{EXTRA_FILE}"))
        return json.loads(archive.read(name))


def _foreign_pt2(shape: tuple[int, ...], path: Path, meta: dict, *, bind: bool) -> Path:
    """A one-channel convolution exported by torch at the training window, carrying medsynth's metadata."""
    conv = torch.nn.Conv2d(shape[0], 1, 3, padding=1).eval()
    program = torch.export.export(conv, (torch.zeros((2, *shape)),))
    if bind:  # a forger who computes the digest of the foreign network (a digest is no signature)
        buffer = io.BytesIO()
        torch.export.save(program, buffer)
        meta = {**meta, "graph_sha256": network_digest(read_archive(buffer.getvalue(), "pt2", "<memory>"))}
    torch.export.save(program, str(path), extra_files={EXTRA_FILE: json.dumps(meta)})
    return path


def _foreign(fmt: str, exports: dict[str, Path], tmp_path: Path) -> Path:
    """A foreign one-channel network carrying a copy of medsynth's export metadata (digest included)."""
    if fmt == "onnx":
        proto = onnx.load(str(exports["onnx"]))
        meta = next(entry.value for entry in proto.metadata_props if entry.key == METADATA_KEY)
        shape = tuple(json.loads(meta)["input_shape"])
        path = tmp_path / "foreign.onnx"
        conv = torch.nn.Conv2d(shape[0], 1, 3, padding=1).eval()
        torch.onnx.export(conv, (torch.zeros((1, *shape)),), str(path), input_names=["input"], output_names=["output"],
                          dynamic_axes={"input": {0: "b", 2: "h", 3: "w"}, "output": {0: "b", 2: "h", 3: "w"}}, dynamo=False)  # fmt: skip
        foreign = onnx.load(str(path))
        entry = foreign.metadata_props.add()
        entry.key, entry.value = METADATA_KEY, meta
        onnx.save(foreign, str(path))
        return path
    meta = _metadata(exports[fmt])
    shape = tuple(meta["input_shape"])
    if fmt == "pt2":
        return _foreign_pt2(shape, tmp_path / "foreign.pt2", meta, bind=False)
    traced = torch.jit.trace(torch.nn.Conv2d(shape[0], 1, 3, padding=1).eval(), torch.zeros((1, *shape)))
    path = tmp_path / "foreign.pt"
    torch.jit.save(traced, str(path), _extra_files={EXTRA_FILE: json.dumps(meta)})
    return path


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.jit and the legacy ONNX exporter
@pytest.mark.parametrize("fmt", ["onnx", "pt2", "torchscript"])
def test_a_foreign_network_with_copied_metadata_is_refused(
    fmt: str, exports: dict[str, Path], volume: Path, tmp_path: Path, capfd
) -> None:
    foreign = _foreign(fmt, exports, tmp_path)
    out = tmp_path / "x.nii.gz"
    capfd.readouterr()
    assert _infer(foreign, volume, out) == 2
    err = capfd.readouterr().err.strip()
    assert err.startswith("error:") and "\n" not in err, err
    assert "does not describe this network" in err
    assert not out.exists() and not (tmp_path / "x.json").exists()


def test_a_bound_foreign_pt2_that_fails_its_guards_is_one_line(
    exports: dict[str, Path], tmp_path: Path
) -> None:
    meta = _metadata(exports["pt2"])
    shape = tuple(meta["input_shape"])
    model = load_exported(_foreign_pt2(shape, tmp_path / "foreign.pt2", meta, bind=True))
    multiple = meta["dynamic"]["multiple"]
    larger = torch.zeros((1, shape[0], *(side + multiple for side in shape[1:])))
    with pytest.raises(CheckpointError, match="does not run on an input of shape") as caught:
        model.generator(larger)
    assert "\n" not in str(caught.value)


def test_an_export_of_an_earlier_format_is_refused_with_the_fix(
    exports: dict[str, Path], volume: Path, tmp_path: Path, capsys
) -> None:
    meta = _metadata(exports["pt2"])
    meta["version"] = 2
    del meta["graph_sha256"]
    old = _edit_archive(exports["pt2"], tmp_path / "old.pt2", {f"extra/{EXTRA_FILE}": lambda _: json.dumps(meta).encode()})  # fmt: skip
    assert _infer(old, volume, tmp_path / "x.nii.gz") == 2
    assert "export it again" in _one_error(capsys)


# ------------------------------------------------------ 6: an empty or truncated pt2
@pytest.mark.parametrize("damage", ["empty", "truncated"])
def test_an_empty_or_truncated_pt2_is_one_line_on_stderr(
    damage: str, exports: dict[str, Path], volume: Path, tmp_path: Path
) -> None:
    data = exports["pt2"].read_bytes()
    bad = tmp_path / "bad.pt2"
    bad.write_bytes(b"" if damage == "empty" else data[: len(data) // 2])
    command = [sys.executable, "-m", "medsynth", "infer", "--volume", str(volume), "--checkpoint", str(bad)]
    done = subprocess.run([*command, "--out", str(tmp_path / "x.nii.gz")], capture_output=True, text=True, check=False)  # fmt: skip
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), done.stderr


# ------------------------------------------------------------- 13: export --target
@pytest.mark.parametrize("fmt", ["onnx", "monai-bundle"])
def test_export_refuses_a_target_the_model_does_not_synthesise(
    fmt: str, tiny_run: Path, tmp_path: Path, capsys
) -> None:
    out = tmp_path / ("model.onnx" if fmt == "onnx" else "bundle")
    argv = ["export", "--checkpoint", str(tiny_run), "--format", fmt, "--out", str(out), "--target", "t1"]
    assert main(argv) == 2
    assert "synthesises T2w only" in _one_error(capsys)
    assert not out.exists()
    assert main([*argv[:-1], "t2"]) == 0  # its own target is fine
