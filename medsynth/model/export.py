"""Portable exports of a trained generator: ONNX and TorchScript, with the plan embedded.

``export_model(model, path, fmt)`` writes the generator alone (no critic, no optimiser) with everything
whole-volume synthesis needs stored inside the file as one JSON document (``medsynth_export``: the
:class:`~medsynth.model.plan.SynthesisPlan`, the normalisation fingerprint, the splits, the medsynth
version, the source checkpoint's SHA-256 and the exported input shape):

* ONNX: a ``metadata_props`` entry (read back with onnxruntime's ``custom_metadata_map``);
* TorchScript: an ``_extra_files`` entry ``medsynth.json``.

:func:`load_exported` rebuilds a :class:`~medsynth.model.synthesis.SynthesisModel` whose generator is
an adapter module around the onnxruntime session (or the TorchScript module), so ``medsynth infer``
runs an exported file through exactly the same slicing / sliding-window path as a checkpoint.

The batch axis is dynamic; the spatial size is the training window the plan frames slices (2D) or
tiles patches (3D) with, because the generators pad to a multiple of their stride in Python code that
tracing records as constants. A volume whose head needs a larger 2D frame is refused with a message.
Exports compute in fp32.
"""

from __future__ import annotations

import dataclasses
import json
import warnings
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import __version__
from ..data.fingerprint import Fingerprint
from ..errors import CheckpointError, MedsynthError
from ..io.atomic import atomic_path
from .plan import SynthesisPlan
from .synthesis import SynthesisModel

FORMATS = ("onnx", "torchscript")
METADATA_KEY = "medsynth_export"
EXTRA_FILE = "medsynth.json"
EXPORT_FORMAT = "medsynth-export"
EXPORT_VERSION = 1
#: Default ONNX opset (onnxruntime >= 1.16 runs it).
OPSET = 17


def input_shape(model: SynthesisModel) -> tuple[int, ...]:
    """``(channels, *window)`` of one generator input: the size the export is traced at."""
    plan = model.plan
    if not plan.window:
        raise MedsynthError("this checkpoint has no training window (plan.window); it cannot be exported")
    return (plan.layout.channels if plan.spatial_dims == 2 else len(plan.layout.modalities), *plan.window)


def export_metadata(model: SynthesisModel) -> dict[str, Any]:
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
    }


def export_model(model: SynthesisModel, path: str | Path, fmt: str, *, opset: int = OPSET) -> Path:
    """Write ``model``'s generator to ``path`` as ``fmt`` (``onnx`` | ``torchscript``), atomically."""
    if fmt not in FORMATS:
        raise MedsynthError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    generator = model.generator.float().eval().to("cpu", memory_format=torch.contiguous_format)
    example = torch.zeros((2, *input_shape(model)), dtype=torch.float32)
    metadata = json.dumps(export_metadata(model))
    path = Path(path)
    try:
        with atomic_path(path) as temp, torch.no_grad():
            if fmt == "torchscript":
                with warnings.catch_warnings():  # TorchScript is deprecated but still the portable format
                    warnings.simplefilter("ignore", DeprecationWarning)
                    traced = torch.jit.trace(generator, example, check_trace=False)
                    torch.jit.save(traced, str(temp), _extra_files={EXTRA_FILE: metadata})
            else:
                _export_onnx(generator, example, Path(temp), metadata, opset)
    finally:
        model.generator.to(model.device)
    return path


def _export_onnx(
    generator: torch.nn.Module, example: torch.Tensor, path: Path, metadata: str, opset: int
) -> None:
    try:
        import onnx
    except ImportError as exc:
        raise MedsynthError("ONNX export needs the onnx package: pip install 'medsynth[onnx]'") from exc
    axes = {"input": {0: "batch"}, "output": {0: "batch"}}
    torch.onnx.export(
        generator, (example,), str(path), input_names=["input"], output_names=["output"],
        dynamic_axes=axes, opset_version=opset, dynamo=False,
    )  # fmt: skip
    proto = onnx.load(str(path))
    entry = proto.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, metadata
    onnx.save(proto, str(path))


# ---------------------------------------------------------------------------------- loading
def is_torchscript(path: str | Path) -> bool:
    """A TorchScript archive (a zip with ``code/``), as opposed to a ``torch.save`` checkpoint."""
    path = Path(path)
    if not path.is_file() or not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any("/code/" in name for name in archive.namelist())


def is_exported(path: str | Path) -> bool:
    path = Path(path)
    return path.suffix.lower() == ".onnx" or is_torchscript(path)


class _ExportedGenerator(torch.nn.Module):
    """Checks the input size an export was traced at, then calls it."""

    def __init__(self, shape: tuple[int, ...], source: str) -> None:
        super().__init__()
        self.shape, self.source = tuple(shape), source

    def _check(self, x: torch.Tensor) -> None:
        if tuple(x.shape[1:]) != self.shape:
            raise MedsynthError(
                f"this exported model takes inputs of shape {list(self.shape)}, got {list(x.shape[1:])} "
                "(the head is larger than the training window); run the medsynth checkpoint instead",
                self.source,
            )


class OnnxGenerator(_ExportedGenerator):
    """An onnxruntime session behind a ``torch.nn.Module`` interface (CPU or CUDA provider)."""

    def __init__(self, session: Any, shape: tuple[int, ...], source: str) -> None:
        super().__init__(shape, source)
        self.session = session
        self.input_name = session.get_inputs()[0].name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check(x)
        array = np.ascontiguousarray(x.detach().float().cpu().numpy())
        (output,) = self.session.run(None, {self.input_name: array})
        return torch.from_numpy(output).to(x.device)


class TorchScriptGenerator(_ExportedGenerator):
    def __init__(self, module: torch.nn.Module, shape: tuple[int, ...], source: str) -> None:
        super().__init__(shape, source)
        self.module = module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check(x)
        return self.module(x.float().contiguous())


def load_exported(path: str | Path, device: str = "cpu") -> SynthesisModel:
    """A :class:`SynthesisModel` running an exported ONNX or TorchScript file."""
    from .checkpoint import file_digest
    from .device import pick_device

    path = Path(path)
    if not path.is_file():
        raise CheckpointError("no such exported model", path)
    torch_device = pick_device(device)
    if path.suffix.lower() == ".onnx":
        try:
            import onnxruntime
        except ImportError as exc:
            raise CheckpointError(
                "running an ONNX model needs onnxruntime: pip install 'medsynth[onnx]'", path
            ) from exc
        providers = ["CPUExecutionProvider"]
        if torch_device.type == "cuda" and "CUDAExecutionProvider" in onnxruntime.get_available_providers():
            providers.insert(0, "CUDAExecutionProvider")
        try:
            session = onnxruntime.InferenceSession(str(path), providers=providers)
        except Exception as exc:  # onnxruntime raises its own exception types for bad files
            raise CheckpointError(f"not a readable ONNX model ({exc.__class__.__name__})", path) from exc
        text = session.get_modelmeta().custom_metadata_map.get(METADATA_KEY)
        meta = _parse_metadata(text, path)
        generator: torch.nn.Module = OnnxGenerator(session, tuple(meta["input_shape"]), str(path))
    else:
        extra = {EXTRA_FILE: ""}
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                module = torch.jit.load(str(path), map_location=torch_device, _extra_files=extra)
        except Exception as exc:  # torch raises RuntimeError and others for bad archives
            raise CheckpointError(
                f"not a readable TorchScript model ({exc.__class__.__name__})", path
            ) from exc
        meta = _parse_metadata(extra[EXTRA_FILE] or None, path)
        generator = TorchScriptGenerator(module, tuple(meta["input_shape"]), str(path))
    try:
        plan = dataclasses.replace(SynthesisPlan.from_dict(meta["plan"]), precision="fp32")
        fingerprint = Fingerprint.from_dict(meta["fingerprint"])
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"incomplete medsynth export metadata ({exc})", path) from exc
    model = SynthesisModel(
        plan, generator.eval(), fingerprint, device=device, source=str(path), digest=file_digest(path),
        epoch=meta.get("epoch"), splits=meta.get("splits") or {},
        precision="fp32",  # an export is a traced fp32 graph; autocast cannot reach inside it
    )  # fmt: skip
    model.exported_from = meta.get("source_sha256")  # type: ignore[attr-defined]
    return model


def _parse_metadata(text: str | bytes | None, path: Path) -> dict[str, Any]:
    if not text:
        raise CheckpointError(
            "not a medsynth export (no embedded plan); export it with medsynth export", path
        )
    try:
        meta = json.loads(text)
    except ValueError as exc:
        raise CheckpointError("the embedded medsynth metadata is not valid JSON", path) from exc
    if meta.get("format") != EXPORT_FORMAT:
        raise CheckpointError("not a medsynth export (unknown metadata format)", path)
    if int(meta.get("version", 0)) > EXPORT_VERSION:
        raise CheckpointError(f"exported by a newer medsynth ({meta.get('medsynth_version')}); upgrade", path)
    return meta
