"""Portable exports of a trained generator: ONNX, pt2 (``torch.export``) and TorchScript, plan embedded.

``export_model(model, path, fmt)`` writes the generator alone (no critic, no optimiser) with everything
whole-volume synthesis needs stored inside the file as one JSON document (``medsynth_export``: the
:class:`~medsynth.model.plan.SynthesisPlan`, the normalisation fingerprint, the splits, the medsynth
version, the source checkpoint's SHA-256, the training window, the size rule of the spatial axes and
``graph_sha256``, the digest of the network it describes, see :mod:`medsynth.model.safe_load`):

* ONNX: a ``metadata_props`` entry;
* pt2: an ``ExportedProgram`` (:func:`torch.export.export`) saved with :func:`torch.export.save`, the
  metadata in its extra file ``medsynth.json``;
* TorchScript: an ``_extra_files`` entry ``medsynth.json`` (kept because MONAI bundles and MONAI Deploy
  load TorchScript; PyTorch deprecates it, so its warnings are silenced here, and pt2 is its successor).

:func:`load_exported` rebuilds a :class:`~medsynth.model.synthesis.SynthesisModel` whose generator is
an adapter module around the onnxruntime session (or the pt2 / TorchScript module), so ``medsynth infer``
runs an exported file through exactly the same slicing / sliding-window path as a checkpoint. The file
is read once and inspected before any runtime sees it (:mod:`medsynth.model.safe_load`: nothing it
carries can run as code), and its metadata must match the network's digest, so metadata copied onto
another network is refused.

Batch and spatial axes are dynamic (export format 2). The generators pad their input to a multiple of
their stride (``2**depth`` for the U-Net) in Python; that padding is kept out of the exported graph, which
only ever sees sizes that are multiples of the stride, and the adapter pads (by edge replication, as the
network does) before calling it and crops after: the same numbers as the checkpoint, for any frame size.
Exports compute in fp32. Exports of formats 1 and 2 (before the digest) are refused with the fix: export
again from the checkpoint.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import json
import logging
import math
import os
import re
import warnings
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import __version__
from ..data.fingerprint import Fingerprint
from ..errors import CheckpointError, MedsynthError
from ..io.atomic import atomic_path
from ..modalities import canonical_modality
from ..nets.blocks import crop_to, pad_to_multiple
from .checkpoint import is_run_folder, model_file_kind
from .plan import SynthesisPlan
from .safe_load import (
    check_pt2,
    check_torchscript,
    network_digest,
    onnx_network_digest,
    read_archive,
    read_onnx,
)
from .synthesis import SynthesisModel

#: What ``medsynth export --format`` accepts; ``monai-bundle`` is a folder (:mod:`medsynth.model.bundle`).
FORMATS = ("onnx", "pt2", "torchscript", "monai-bundle")
#: The single-file formats :func:`export_model` writes.
FILE_FORMATS = ("onnx", "pt2", "torchscript")
METADATA_KEY = "medsynth_export"
EXTRA_FILE = "medsynth.json"
EXPORT_FORMAT = "medsynth-export"
#: 2: dynamic spatial axes (``dynamic`` block: the stride multiple and the smallest side); 3: ``graph_sha256``.
EXPORT_VERSION = 3
#: Default ONNX opset (onnxruntime >= 1.16 runs it).
OPSET = 17
#: Largest side (voxels) a dynamic export promises to take: 2048 covers 0.1 mm in-plane heads.
MAX_SIDE = 2048


def input_shape(model: SynthesisModel) -> tuple[int, ...]:
    """``(channels, *window)`` of one generator input at the training window."""
    plan = model.plan
    if not plan.window:
        raise MedsynthError("this checkpoint has no training window (plan.window); it cannot be exported")
    return (plan.layout.channels if plan.spatial_dims == 2 else len(plan.layout.modalities), *plan.window)


def size_rule(generator: torch.nn.Module) -> tuple[int, int]:
    """``(multiple, min_side)``: the exported graph takes sides that are multiples of ``multiple``, at
    least ``min_side`` voxels; the generator's own padding brings any size there (``pad_to_multiple``)."""
    from ..nets.resvit import ResViT
    from ..nets.unet import UNet

    if isinstance(generator, UNet):
        multiple = 2**generator.depth
        return multiple, multiple
    if isinstance(generator, ResViT):
        multiple = int(generator._multiple)
        return multiple, math.ceil(generator.min_input_size() / multiple) * multiple
    raise MedsynthError(
        f"cannot export a {type(generator).__name__} generator with dynamic sizes: "
        "medsynth knows the stride of UNet and ResViT only"
    )


def example_shape(model: SynthesisModel, multiple: int) -> tuple[int, ...]:
    """``(2, channels, *sides)``: the input an export is traced with.

    Batch 2, so the batch axis is not specialised to 1 (torch.export would). Each side is the window
    rounded up to the multiple, plus one multiple: never the training size itself, so a ResViT's
    positional embedding is traced through its resize (an identity at the training size) and the
    graph does not fix the token grid.
    """
    channels, *window = input_shape(model)
    return (2, channels, *(max(math.ceil(w / multiple), 1) * multiple + multiple for w in window))


def export_metadata(model: SynthesisModel, *, dynamic: bool = True) -> dict[str, Any]:
    """The embedded JSON; ``dynamic=False``: the graph takes the training window only (``dynamic`` null)."""
    multiple, min_side = size_rule(model.generator)
    return {
        "format": EXPORT_FORMAT,
        "version": EXPORT_VERSION,
        "medsynth_version": __version__,
        "plan": model.plan.to_dict(),
        "fingerprint": model.fingerprint.to_dict(),
        "splits": model.checkpoint_splits,
        "source_checkpoint": model.source,
        "source_sha256": model.digest,
        "epoch": model.epoch,
        "input_shape": list(input_shape(model)),
        "dynamic": {"multiple": multiple, "min_side": min_side, "max_side": MAX_SIDE} if dynamic else None,
        # This file's direction among those its checkpoint trained, and how the training data was paired.
        "directions": list(model.directions),
        "pairing": model.pairing,
    }


@contextlib.contextmanager
def plain_attention() -> Iterator[None]:
    """Transformer layers (ResViT) on their plain path: their fused inference kernel has no ONNX form."""
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)


@contextlib.contextmanager
def padding_outside_graph() -> Iterator[None]:
    """Trace the generators without their pad-to-stride / crop steps (see the module docstring).

    The exported graph is then free of shape arithmetic (no sizes baked in by tracing, no guards for
    ``torch.export``); the loader's adapter pads and crops with the same functions instead. The
    output layers' ``full_precision`` (leave autocast) is a no-op too: an export computes in fp32.
    """
    from ..nets import resvit, unet

    names = ("pad_to_multiple", "crop_to", "full_precision")
    saved = [(module, {name: getattr(module, name) for name in names}) for module in (unet, resvit)]

    def no_pad(x: torch.Tensor, multiple: int) -> tuple[torch.Tensor, tuple[int, ...]]:
        return x, tuple(x.shape[2:])

    def no_crop(x: torch.Tensor, size: Any) -> torch.Tensor:
        return x

    def fp32(tensor: torch.Tensor) -> contextlib.nullcontext[None]:
        return contextlib.nullcontext()

    try:
        for module, _ in saved:
            module.pad_to_multiple, module.crop_to, module.full_precision = no_pad, no_crop, fp32  # type: ignore[assignment]
        yield
    finally:
        for module, originals in saved:
            for name, value in originals.items():
                setattr(module, name, value)


def export_model(model: SynthesisModel, path: str | Path, fmt: str, *, opset: int = OPSET) -> Path:
    """Write ``model``'s generator to ``path`` as ``fmt`` (``onnx`` | ``pt2`` | ``torchscript``), atomically."""
    if fmt not in FILE_FORMATS:
        raise MedsynthError(f"unknown export file format {fmt!r}; choose one of {', '.join(FILE_FORMATS)}")
    generator = model.generator.float().eval().to("cpu", memory_format=torch.contiguous_format)
    # The TorchScript-based ONNX exporter bakes attention's token count into its reshapes: a
    # transformer generator (ResViT) goes to ONNX at the training window only, padding inside the graph.
    static = fmt == "onnx" and any(isinstance(m, torch.nn.MultiheadAttention) for m in generator.modules())
    metadata = export_metadata(model, dynamic=not static)
    if static:
        example = torch.zeros((2, *input_shape(model)), dtype=torch.float32)
    else:
        example = torch.zeros(example_shape(model, metadata["dynamic"]["multiple"]), dtype=torch.float32)
    path = Path(path)
    graph = contextlib.nullcontext() if static else padding_outside_graph()
    try:
        with atomic_path(path) as temp, torch.no_grad(), graph, plain_attention():
            if fmt == "torchscript":
                _export_torchscript(generator, example, Path(temp), metadata)
            elif fmt == "pt2":
                _export_pt2(generator, example, Path(temp), metadata)
            else:
                _export_onnx(generator, example, Path(temp), metadata, opset, dynamic_sides=not static)
    finally:
        model.generator.to(model.device)
    return path


def _bound(metadata: dict[str, Any], digest: str) -> str:
    """The metadata as stored: with the digest of the network it describes (checked by the loader)."""
    return json.dumps({**metadata, "graph_sha256": digest})


def _archive_digest(save: Callable[[io.BytesIO], object]) -> str:
    """:func:`~medsynth.model.safe_load.network_digest` of what ``save(buffer)`` writes (without metadata).

    torch writes the same entries for the same network each time, except its per-save id, which the
    digest leaves out; so the digest of this save is that of the file saved next with the metadata.
    """
    buffer = io.BytesIO()
    save(buffer)
    return network_digest(read_archive(buffer.getvalue(), "export", "<memory>"))


def _export_torchscript(
    generator: torch.nn.Module, example: torch.Tensor, path: Path, metadata: dict[str, Any]
) -> None:
    # torch.jit is deprecated (pt2 replaces it) but MONAI bundles and MONAI Deploy load TorchScript;
    # its DeprecationWarnings and the tracer's notes are not the user's business.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        traced = torch.jit.trace(generator, example, check_trace=False)
        text = _bound(metadata, _archive_digest(lambda buffer: torch.jit.save(traced, buffer)))
        torch.jit.save(traced, str(path), _extra_files={EXTRA_FILE: text})


def _export_pt2(
    generator: torch.nn.Module, example: torch.Tensor, path: Path, metadata: dict[str, Any]
) -> None:
    from torch.export import Dim

    rule = metadata["dynamic"]
    multiple, min_side = rule["multiple"], rule["min_side"]
    sides = {
        axis: multiple * Dim(f"side{axis}", min=min_side // multiple, max=rule["max_side"] // multiple)
        for axis in range(2, example.dim())
    }
    shapes = {"x": {0: Dim("batch", min=1, max=1024), **sides}}
    try:
        program = torch.export.export(generator, (example,), dynamic_shapes=shapes)
    except Exception as exc:  # torch.export raises many types for what it cannot trace
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
        raise MedsynthError(
            f"torch.export could not export this generator ({exc.__class__.__name__}: {first}); "
            "use --format onnx or torchscript"
        ) from exc
    text = _bound(metadata, _archive_digest(lambda buffer: torch.export.save(program, buffer)))
    torch.export.save(program, str(path), extra_files={EXTRA_FILE: text})


def _export_onnx(
    generator: torch.nn.Module,
    example: torch.Tensor,
    path: Path,
    metadata: dict[str, Any],
    opset: int,
    *,
    dynamic_sides: bool = True,
) -> None:
    try:
        import onnx
    except ImportError as exc:
        raise MedsynthError("ONNX export needs the onnx package: pip install 'medsynth[onnx]'") from exc
    names = ["batch", "channels", *("side0", "side1", "side2")[: example.dim() - 2]]
    dynamic = {i: names[i] for i in range(example.dim()) if i == 0 or (i > 1 and dynamic_sides)}
    # The TorchScript-based exporter (dynamo=False): torch.onnx.export(dynamo=True) translates through
    # the onnxscript package, which neither medsynth's onnx extra nor onnxruntime brings, so it fails
    # where only onnx + onnxruntime are installed. With the padding kept out of the graph the traced
    # graph has no baked sizes, and dynamic_axes make batch and sides free.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", message="Constant folding")  # the exporter's own notes
        torch.onnx.export(
            generator, (example,), str(path), input_names=["input"], output_names=["output"],
            dynamic_axes={"input": dynamic, "output": dynamic}, opset_version=opset, dynamo=False,
        )  # fmt: skip
    proto = onnx.load(str(path))
    entry = proto.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, _bound(metadata, onnx_network_digest(proto))
    onnx.save(proto, str(path))


# ---------------------------------------------------------------------------------- loading
EXPORT_KINDS = ("onnx", "pt2", "torchscript")


def is_torchscript(path: str | Path) -> bool:
    """A TorchScript archive (a zip with ``code/``), as opposed to a ``torch.save`` checkpoint."""
    return model_file_kind(path) == "torchscript"


def is_exported(path: str | Path) -> bool:
    """An exported model, told by its content (an ONNX export named ``x.pt`` is one too).

    A file whose content is none of medsynth's kinds but whose name ends in ``.onnx`` or ``.pt2``
    counts, so the loader of that format names what is wrong with it (a truncated file, say).
    """
    path = Path(path)
    if path.is_dir():
        return False
    kind = model_file_kind(path)
    return kind in EXPORT_KINDS or (kind == "unknown" and path.suffix.lower() in (".onnx", ".pt2"))


def medsynth_export_kind(path: str | Path) -> str | None:
    """The format of a file ``medsynth export`` wrote (its metadata present), else None."""
    path = Path(path)
    kind = model_file_kind(path)
    if kind in ("torchscript", "pt2"):
        with zipfile.ZipFile(path) as archive:
            found = any(name.endswith(f"extra/{EXTRA_FILE}") for name in archive.namelist())
        return kind if found else None
    if kind == "onnx":
        try:
            import onnx

            proto = onnx.load(str(path), load_external_data=False)
        except Exception:  # noqa: BLE001 - onnx raises its own types for a damaged file: not ours then
            return None
        return kind if any(entry.key == METADATA_KEY for entry in proto.metadata_props) else None
    return None


def check_export_direction(model: SynthesisModel, target: str | None) -> None:
    """Refuse an ``export --target`` the model does not synthesise, as ``infer --target`` refuses it.

    A checkpoint of several directions has already been turned to the one asked for; one of a single
    direction is left as it is, so without this check ``--target t1`` of a t1->t2 run would quietly
    export t1->t2. A unified model is exported whole; its target need only be one of its modalities.
    """
    task = model.task
    if target is None or (task.is_unified and target == "missing"):
        return
    if not task.is_unified:
        model.plan.resolve_target(task.sources, target)
    elif canonical_modality(target) not in task.modalities:
        raise MedsynthError(
            f"target {target!r} is outside this unified model's set: {', '.join(task.modalities)}"
        )


def check_export_target(path: str | Path, fmt: str, *, overwrite: bool = False) -> None:
    """Refuse an ``--out`` whose existing file is not ours to replace.

    A new file is fine, and so is the file of an earlier export in the same format. A file of a run
    folder or of its subfolders (``checkpoint_latest.pt``, ``config.yaml``, ``samples/*.png`` ...) and
    any checkpoint are always refused; any other existing file only with ``overwrite`` (``--overwrite``).
    """
    path = Path(path)
    if not (path.exists() or path.is_symlink()):
        return
    if path.is_dir():
        raise MedsynthError("--out is a folder; give a file name such as model.onnx", path)
    previous = medsynth_export_kind(path)
    if previous == fmt:
        return
    if model_file_kind(path) == "checkpoint":
        raise MedsynthError("--out is a model checkpoint; give the export another file name", path)
    folder = Path(os.path.realpath(path.parent))
    if previous is None and any(is_run_folder(p) for p in (folder, *folder.parents)):
        raise MedsynthError(
            "--out is a file of a training run (its resume state, settings or records); "
            "give the export another file name",
            path,
        )
    if not overwrite:
        what = f"a {previous} export, not {fmt}" if previous else "a file medsynth export did not write"
        raise MedsynthError(
            f"--out exists and is {what}; give another file name, or --overwrite to replace it", path
        )


class _ExportedGenerator(torch.nn.Module):
    """Pads an input to the export's size rule, calls the exported graph, checks and crops its output.

    ``shape`` is ``(channels, *window)``; ``rule`` the export's ``dynamic`` block, or None for an ONNX
    export of a transformer, which takes the training window only.
    """

    def __init__(
        self, shape: tuple[int, ...], source: str, out_channels: int = 1, rule: dict[str, int] | None = None
    ) -> None:
        super().__init__()
        self.shape, self.source, self.out_channels = tuple(shape), source, int(out_channels)
        self.rule = dict(rule) if rule else None

    def _check(self, x: torch.Tensor) -> None:
        sides = tuple(x.shape[2:])
        if self.rule is None:
            if tuple(x.shape[1:]) != self.shape:
                raise MedsynthError(
                    f"this exported model takes inputs of shape {list(self.shape)} only, got "
                    f"{list(x.shape[1:])} (the head is larger than the training window); run the checkpoint "
                    "or a pt2 / TorchScript export (this ONNX file is of a transformer network: fixed to "
                    "the window)",
                    self.source,
                )
            return
        if x.shape[1] != self.shape[0] or len(sides) != len(self.shape) - 1:
            raise MedsynthError(
                f"this exported model takes {self.shape[0]} channels of {len(self.shape) - 1}D input, "
                f"got shape {list(x.shape[1:])}",
                self.source,
            )
        low, high, multiple = self.rule["min_side"], self.rule["max_side"], self.rule["multiple"]
        padded = [math.ceil(side / multiple) * multiple for side in sides]  # what the graph will see
        if min(padded) < low or max(padded) > high:
            raise MedsynthError(
                f"this exported model takes sides of {low} to {high} voxels, got {list(sides)}", self.source
            )

    def _run(self, x: torch.Tensor) -> Any:
        raise NotImplementedError

    def _graph(self, x: torch.Tensor) -> Any:
        """The exported graph on ``x``; its own failures (a pt2 guard, an onnxruntime shape error) are one
        line naming the file: the plan promised this input, so the network is not the one it describes."""
        try:
            return self._run(x)
        except torch.OutOfMemoryError:
            raise
        except Exception as exc:  # onnxruntime / TorchScript / pt2 raise their own types for a wrong input
            first = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else ""
            raise CheckpointError(
                f"the exported network does not run on an input of shape {list(x.shape)}, which its plan "
                f"allows: {exc.__class__.__name__} {first}".rstrip(),
                self.source,
            ) from exc

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check(x)
        multiple = self.rule["multiple"] if self.rule else 1
        padded, size = pad_to_multiple(x.float().contiguous(), multiple)
        output = self._checked(padded, self._graph(padded))
        if isinstance(output, np.ndarray):
            output = torch.from_numpy(output)
        return crop_to(output.to(x.device), size)

    def _checked(self, x: torch.Tensor, y: Any) -> Any:
        """The output must be ``(batch, out_channels, *input sides)``, as the embedded plan says."""
        want = (int(x.shape[0]), self.out_channels, *(int(s) for s in x.shape[2:]))
        got = tuple(y.shape) if isinstance(y, (torch.Tensor, np.ndarray)) else None
        if got != want:
            raise CheckpointError(
                f"the exported network's output has shape {list(got) if got else type(y).__name__}, but its "
                f"embedded plan promises {list(want)}: this network is not the one the plan describes",
                self.source,
            )
        return y


class OnnxGenerator(_ExportedGenerator):
    """An onnxruntime session behind a ``torch.nn.Module`` interface (CPU or CUDA provider)."""

    def __init__(self, session: Any, shape: tuple[int, ...], source: str, out_channels: int = 1,
                 rule: dict[str, int] | None = None) -> None:  # fmt: skip
        super().__init__(shape, source, out_channels, rule)
        self.session = session
        self.input_name = session.get_inputs()[0].name

    def _run(self, x: torch.Tensor) -> Any:
        array = np.ascontiguousarray(x.detach().cpu().numpy())
        return self.session.run(None, {self.input_name: array})[0]


class TorchScriptGenerator(_ExportedGenerator):
    """A TorchScript module, or a pt2 ``ExportedProgram``'s module (both are called the same way)."""

    def __init__(self, module: torch.nn.Module, shape: tuple[int, ...], source: str, out_channels: int = 1,
                 rule: dict[str, int] | None = None) -> None:  # fmt: skip
        super().__init__(shape, source, out_channels, rule)
        self.module = module

    def _run(self, x: torch.Tensor) -> Any:
        return self.module(x)


class Pt2Generator(TorchScriptGenerator):
    """An ``ExportedProgram``'s module: held outside the module tree, because its mode was fixed at
    export (eval) and ``train()`` / ``eval()`` on it raise; :meth:`SynthesisModel` calls ``eval()``."""

    def __init__(self, module: torch.nn.Module, shape: tuple[int, ...], source: str, out_channels: int = 1,
                 rule: dict[str, int] | None = None) -> None:  # fmt: skip
        _ExportedGenerator.__init__(self, shape, source, out_channels, rule)
        self.__dict__["module"] = module  # not a submodule: see the class docstring

    def _run(self, x: torch.Tensor) -> Any:
        if x.shape[0] > 1:
            return self.module(x)
        # torch.export traces attention (ResViT) at batch 2 and keeps a guard that the batch is not 1;
        # samples are independent (instance norm, or batch norm in eval), so run a pair and keep one.
        return self.module(torch.cat([x, x]))[:1]


def export_kind(path: str | Path) -> str:
    """Which loader reads ``path``: by content, then (for a damaged file) by its ending."""
    path = Path(path)
    kind = model_file_kind(path)
    if kind in EXPORT_KINDS:
        return kind
    return "pt2" if path.suffix.lower() == ".pt2" else "onnx"


def load_exported(path: str | Path, device: str = "cpu") -> SynthesisModel:
    """A :class:`SynthesisModel` running an exported ONNX, pt2 or TorchScript file (told apart by content).

    The file is read once; its structure is inspected (nothing it carries can run as code, see
    :mod:`medsynth.model.safe_load`) and its embedded metadata checked field by field and against the
    digest of the network it sits in, all before onnxruntime or torch reads it: a forged, foreign or
    damaged file is a one-line :class:`CheckpointError`. The network then runs once on a blank input of
    the training window, and its output must have the shape the embedded plan promises.
    """
    from .device import pick_device

    path = Path(path)
    if not path.is_file():
        raise CheckpointError("no such exported model", path)
    torch_device = pick_device(device)
    kind = export_kind(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise CheckpointError(f"cannot read the exported model ({exc.strerror})", path) from exc
    text, digest = _inspect(kind, data, path)
    meta, plan, fingerprint = _parse_metadata(text, path)
    if meta["graph_sha256"] != digest:
        raise CheckpointError(
            "the embedded medsynth metadata does not describe this network (its graph SHA-256 differs): "
            "metadata copied onto another or an edited network; export it again from its checkpoint",
            path,
        )
    generator = _generator(kind, data, meta, plan, path, torch_device)
    _probe(generator, torch_device)
    model = SynthesisModel(
        plan, generator.eval(), fingerprint, device=device, source=str(path),
        digest=hashlib.sha256(data).hexdigest(), epoch=meta.get("epoch"), splits=meta.get("splits") or {},
        precision="fp32",  # an export is a traced fp32 graph; autocast cannot reach inside it
    )  # fmt: skip
    model.exported_from = meta.get("source_sha256")  # type: ignore[attr-defined]
    model.directions = [str(d) for d in meta.get("directions") or [str(plan.task)]]
    model.pairing = str(meta.get("pairing", "paired"))
    return model


_ARCHIVE_NAMES = {"pt2": "pt2 (torch.export) model", "torchscript": "TorchScript model"}


def _inspect(kind: str, data: bytes, path: Path) -> tuple[bytes | str | None, str]:
    """The embedded metadata and the digest of the network, read without running anything in the file."""
    if kind == "onnx":
        proto = read_onnx(data, path)
        text = next((entry.value for entry in proto.metadata_props if entry.key == METADATA_KEY), None)
        return text, onnx_network_digest(proto)
    entries = read_archive(data, _ARCHIVE_NAMES[kind], path)
    (check_pt2 if kind == "pt2" else check_torchscript)(entries, path)
    return entries.get(f"extra/{EXTRA_FILE}"), network_digest(entries)


def _generator(
    kind: str, data: bytes, meta: dict[str, Any], plan: SynthesisPlan, path: Path, device: torch.device
) -> _ExportedGenerator:
    """The adapter around the runtime that runs ``data`` (inspected and bound to ``meta`` already)."""
    args = (meta["input_shape"], str(path), _out_channels(plan), meta.get("dynamic"))
    if kind == "onnx":
        return OnnxGenerator(_onnx_session(data, path, device), *args)
    if kind == "pt2":
        return Pt2Generator(_load_pt2(data, path, device), *args)
    return TorchScriptGenerator(_load_torchscript(data, path, device), *args)


def _onnx_session(data: bytes, path: Path, device: torch.device) -> Any:
    try:
        import onnxruntime
    except ImportError as exc:
        raise CheckpointError(
            "running an ONNX model needs onnxruntime: pip install 'medsynth[onnx]'", path
        ) from exc
    providers = ["CPUExecutionProvider"]
    if device.type == "cuda" and "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        providers.insert(0, "CUDAExecutionProvider")
    try:
        return onnxruntime.InferenceSession(data, providers=providers)
    except Exception as exc:  # onnxruntime raises its own exception types for bad files
        raise CheckpointError(
            f"not a readable ONNX model ({exc.__class__.__name__}); is the file complete?", path
        ) from exc


def _load_torchscript(data: bytes, path: Path, device: torch.device) -> torch.nn.Module:
    """``torch.jit.load`` of bytes :func:`_inspect` has checked (called only from :func:`_generator`, on the
    very bytes read once by :func:`load_exported`: no second read of the file could swap them)."""
    try:
        with warnings.catch_warnings():  # torch.jit is deprecated; see _export_torchscript
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.simplefilter("ignore", FutureWarning)
            return torch.jit.load(io.BytesIO(data), map_location=device)
    except Exception as exc:  # torch raises RuntimeError and others for bad archives
        raise CheckpointError(
            f"not a readable TorchScript model ({exc.__class__.__name__}); is the file complete?", path
        ) from exc


@contextlib.contextmanager
def _torch_export_quiet() -> Iterator[None]:
    """torch.export logs a failed read with its traceback (a warning on stderr) before raising; the
    user gets medsynth's one line instead (``--debug`` shows the traceback of the raised error)."""
    loggers = [logging.getLogger(name) for name in ("torch.export", "torch._export")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.CRITICAL + 1)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def _load_pt2(data: bytes, path: Path, device: torch.device) -> torch.nn.Module:
    """``torch.export.load`` of bytes :func:`_inspect` has checked (see :func:`_load_torchscript`)."""
    try:
        with _torch_export_quiet():
            module = torch.export.load(io.BytesIO(data)).module()
        if device.type != "cpu":
            module = module.to(device)
    except Exception as exc:  # torch raises many types for a damaged or foreign archive
        raise CheckpointError(
            f"not a readable pt2 (torch.export) model ({exc.__class__.__name__}); is the file complete?", path
        ) from exc
    return module


def _out_channels(plan: SynthesisPlan) -> int:
    """Channels the plan's generator outputs: the image, and ``log b`` with a scale channel."""
    default = 2 if plan.scale_channel else 1
    value = plan.generator.init_args.get("out_channels", default)
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else default


def _probe(generator: _ExportedGenerator, device: torch.device) -> None:
    """One blank batch through the network: it must accept the training window and answer the plan's."""
    blank = torch.full((1, *generator.shape), -1.0, dtype=torch.float32, device=device)
    with torch.no_grad():
        generator(blank)


def _parse_metadata(
    text: str | bytes | None, path: Path
) -> tuple[dict[str, Any], SynthesisPlan, Fingerprint]:
    """The embedded metadata, checked: any forged or damaged field is one :class:`CheckpointError` line."""
    if not text:
        raise CheckpointError(
            "not a medsynth export (no embedded plan); export it with medsynth export", path
        )
    try:
        meta = json.loads(text)
    except ValueError as exc:
        raise CheckpointError("the embedded medsynth metadata is not valid JSON", path) from exc
    if not isinstance(meta, dict):
        raise CheckpointError(
            f"the embedded medsynth metadata is a JSON {type(meta).__name__}, not an object", path
        )
    if meta.get("format") != EXPORT_FORMAT:
        raise CheckpointError("not a medsynth export (unknown metadata format)", path)
    version = meta.get("version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise CheckpointError(
            f"damaged medsynth export metadata: version {version!r} is not a positive integer", path
        )
    if version > EXPORT_VERSION:
        raise CheckpointError(f"exported by a newer medsynth ({meta.get('medsynth_version')}); upgrade", path)
    if version < EXPORT_VERSION:
        raise CheckpointError(
            f"exported by medsynth {meta.get('medsynth_version')} (export format {version}), whose metadata is "
            "not bound to its network; export it again from its checkpoint",
            path,
        )
    if not (
        isinstance(meta.get("graph_sha256"), str) and re.fullmatch(r"[0-9a-f]{64}", meta["graph_sha256"])
    ):
        raise CheckpointError("damaged medsynth export metadata: graph_sha256 is not a SHA-256", path)
    shape = meta.get("input_shape")
    if not (isinstance(shape, list) and len(shape) in (3, 4) and all(_positive_int(s) for s in shape)):
        raise CheckpointError(
            f"damaged medsynth export metadata: input_shape {shape!r} is not a list of positive sizes", path
        )
    if not isinstance(meta.get("splits") or {}, dict) or not isinstance(meta.get("epoch"), (int, type(None))):
        raise CheckpointError("damaged medsynth export metadata: splits or epoch of the wrong type", path)
    meta["dynamic"] = _parse_rule(meta.get("dynamic"), path)
    try:
        plan = dataclasses.replace(SynthesisPlan.from_dict(meta["plan"]), precision="fp32")
        fingerprint = Fingerprint.from_dict(meta["fingerprint"])
    except (KeyError, TypeError, ValueError, AttributeError, MedsynthError) as exc:
        raise CheckpointError(f"incomplete medsynth export metadata ({exc})", path) from exc
    meta["input_shape"] = tuple(shape)
    channels = plan.layout.channels if plan.spatial_dims == 2 else len(plan.layout.modalities)
    if plan.window is None or meta["input_shape"] != (channels, *plan.window):
        raise CheckpointError(
            f"damaged medsynth export metadata: input_shape {shape} contradicts the plan "
            f"({channels} channels, window {list(plan.window) if plan.window else None})",
            path,
        )
    return meta, plan, fingerprint


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _parse_rule(rule: Any, path: Path) -> dict[str, int] | None:
    """The ``dynamic`` block of the metadata (None: an ONNX export of a transformer, window only)."""
    if rule is None:
        return None
    keys = ("multiple", "min_side", "max_side")
    if not (isinstance(rule, dict) and all(_positive_int(rule.get(key)) for key in keys)) or not (
        rule["min_side"] % rule["multiple"] == 0 and rule["min_side"] <= rule["max_side"]
    ):
        raise CheckpointError(
            f"damaged medsynth export metadata: dynamic {rule!r} is not a size rule "
            "(positive multiple, min_side, max_side)",
            path,
        )
    return {key: int(rule[key]) for key in keys}
