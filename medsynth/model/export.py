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
import os
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
from .checkpoint import is_run_folder, model_file_kind
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
    return model_file_kind(path) == "torchscript"


def is_exported(path: str | Path) -> bool:
    """An exported model, told by its content (an ONNX export named ``x.pt`` is one too).

    A file whose content is none of medsynth's kinds but whose name ends in ``.onnx`` counts, so the
    ONNX loader names what is wrong with it.
    """
    path = Path(path)
    if path.is_dir():
        return False
    kind = model_file_kind(path)
    return kind in ("onnx", "torchscript") or (kind == "unknown" and path.suffix.lower() == ".onnx")


def medsynth_export_kind(path: str | Path) -> str | None:
    """``"onnx"`` / ``"torchscript"`` for a file ``medsynth export`` wrote (its metadata present), else None."""
    path = Path(path)
    kind = model_file_kind(path)
    if kind == "torchscript":
        with zipfile.ZipFile(path) as archive:
            found = any(name.split("/", 1)[-1] == f"extra/{EXTRA_FILE}" for name in archive.namelist())
        return kind if found else None
    if kind == "onnx":
        try:
            import onnx

            proto = onnx.load(str(path), load_external_data=False)
        except Exception:  # noqa: BLE001 - onnx raises its own types for a damaged file: not ours then
            return None
        return kind if any(entry.key == METADATA_KEY for entry in proto.metadata_props) else None
    return None


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
    """Checks the input size an export was traced at, calls it, and checks its output against the plan."""

    def __init__(self, shape: tuple[int, ...], source: str, out_channels: int = 1) -> None:
        super().__init__()
        self.shape, self.source, self.out_channels = tuple(shape), source, int(out_channels)

    def _check(self, x: torch.Tensor) -> None:
        if tuple(x.shape[1:]) != self.shape:
            raise MedsynthError(
                f"this exported model takes inputs of shape {list(self.shape)}, got {list(x.shape[1:])} "
                "(the head is larger than the training window); run the medsynth checkpoint instead",
                self.source,
            )

    def _checked(self, x: torch.Tensor, y: Any) -> torch.Tensor:
        """The output must be ``(batch, out_channels, *window)``, as the embedded plan says."""
        want = (int(x.shape[0]), self.out_channels, *self.shape[1:])
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

    def __init__(self, session: Any, shape: tuple[int, ...], source: str, out_channels: int = 1) -> None:
        super().__init__(shape, source, out_channels)
        self.session = session
        self.input_name = session.get_inputs()[0].name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check(x)
        array = np.ascontiguousarray(x.detach().float().cpu().numpy())
        output = self.session.run(None, {self.input_name: array})[0]
        return torch.from_numpy(self._checked(x, output)).to(x.device)


class TorchScriptGenerator(_ExportedGenerator):
    def __init__(
        self, module: torch.nn.Module, shape: tuple[int, ...], source: str, out_channels: int = 1
    ) -> None:
        super().__init__(shape, source, out_channels)
        self.module = module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check(x)
        return self._checked(x, self.module(x.float().contiguous()))


def load_exported(path: str | Path, device: str = "cpu") -> SynthesisModel:
    """A :class:`SynthesisModel` running an exported ONNX or TorchScript file (told apart by content).

    The embedded metadata is checked before use (a forged or damaged one is a one-line
    :class:`CheckpointError`), and the network is run once on a blank input of the exported shape: its
    output must have the shape the embedded plan promises, so a foreign network carrying a copied plan
    is refused before it sees a volume.
    """
    from .checkpoint import file_digest
    from .device import pick_device

    path = Path(path)
    if not path.is_file():
        raise CheckpointError("no such exported model", path)
    torch_device = pick_device(device)
    if model_file_kind(path) != "torchscript":  # ONNX, or a file that claims to be one by its name
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
        meta, plan, fingerprint = _parse_metadata(text, path)
        generator: _ExportedGenerator = OnnxGenerator(
            session, meta["input_shape"], str(path), _out_channels(plan)
        )
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
        meta, plan, fingerprint = _parse_metadata(extra[EXTRA_FILE] or None, path)
        generator = TorchScriptGenerator(module, meta["input_shape"], str(path), _out_channels(plan))
    _probe(generator, torch_device, path)
    model = SynthesisModel(
        plan, generator.eval(), fingerprint, device=device, source=str(path), digest=file_digest(path),
        epoch=meta.get("epoch"), splits=meta.get("splits") or {},
        precision="fp32",  # an export is a traced fp32 graph; autocast cannot reach inside it
    )  # fmt: skip
    model.exported_from = meta.get("source_sha256")  # type: ignore[attr-defined]
    return model


def _out_channels(plan: SynthesisPlan) -> int:
    """Channels the plan's generator outputs: the image, and ``log b`` with a scale channel."""
    default = 2 if plan.scale_channel else 1
    value = plan.generator.init_args.get("out_channels", default)
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else default


def _probe(generator: _ExportedGenerator, device: torch.device, path: Path) -> None:
    """One blank batch through the network: it must accept the exported shape and answer the plan's."""
    blank = torch.full((1, *generator.shape), -1.0, dtype=torch.float32, device=device)
    try:
        with torch.no_grad():
            generator(blank)
    except MedsynthError:
        raise
    except Exception as exc:  # onnxruntime / TorchScript raise their own types for a wrong input
        first = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else ""
        raise CheckpointError(
            f"the exported network does not run on the input shape its plan records "
            f"({list(generator.shape)}): {exc.__class__.__name__} {first}".rstrip(),
            path,
        ) from exc


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
    shape = meta.get("input_shape")
    if not (
        isinstance(shape, list)
        and len(shape) in (3, 4)
        and all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in shape)
    ):
        raise CheckpointError(
            f"damaged medsynth export metadata: input_shape {shape!r} is not a list of positive sizes", path
        )
    if not isinstance(meta.get("splits") or {}, dict) or not isinstance(meta.get("epoch"), (int, type(None))):
        raise CheckpointError("damaged medsynth export metadata: splits or epoch of the wrong type", path)
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
