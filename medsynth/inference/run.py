"""``medsynth infer``: map ``--volume`` arguments to the checkpoint's inputs, predict, write.

Every output is a float32 volume on the grid of its first input, written atomically, with a JSON
sidecar (arguments, checkpoint hash, medsynth version, runtime) beside it, as nnU-Net does for its
predictions. Several inputs in one call (``--inputs`` folder or list) reuse the loaded model.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from .. import __version__
from ..errors import MedsynthError
from ..io.atomic import atomic_write_text
from ..io.readers import read_volume
from ..io.volume import Volume
from ..io.writers import write_volume
from ..modalities import canonical_modality
from ..model.synthesis import SynthesisModel
from .trust import load_model, screen_inputs, trust_outputs

log = logging.getLogger("medsynth")
VOLUME_SUFFIXES = (".nii.gz", ".nii", ".mha", ".mhd", ".nrrd", ".nhdr")


def parse_volume_arguments(values: list[str], model: SynthesisModel) -> dict[str, str]:
    """``[t1=]path`` arguments -> {modality: path}; unnamed ones follow the checkpoint's input order."""
    named: dict[str, str] = {}
    unnamed: list[str] = []
    for value in values:
        key, sep, path = value.partition("=")
        if sep and not Path(value).exists():
            modality = canonical_modality(key)  # "t7=a.nii.gz" -> unknown modality, listing the known ones
            if modality in named:
                raise MedsynthError(f"--volume {modality}= given twice")
            named[modality] = path
        else:
            unnamed.append(value)
    if unnamed:
        if model.task.is_unified:
            raise MedsynthError(
                "a unified model needs named inputs, e.g. --volume t1=a.nii.gz --volume t2=b.nii.gz"
            )
        free = [m for m in model.sources if m not in named]
        if len(unnamed) > len(free):
            raise MedsynthError(
                f"{len(unnamed) + len(named)} volumes given; the checkpoint takes {len(model.sources)} "
                f"({', '.join(model.sources)})"
            )
        named.update(zip(free, unnamed, strict=False))
    return named


def output_path_for(out: Path, stem: str, target: str, batch: bool) -> Path:
    """``--out`` as a file for one volume; as a folder (``<stem>_<target>.nii.gz``) otherwise."""
    if not batch and out.name.endswith(VOLUME_SUFFIXES):
        return out
    return out / f"{stem}_{target}.nii.gz"


def volume_stem(path: str | Path) -> str:
    name = Path(path).name
    for suffix in VOLUME_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def list_batch_inputs(source: Path) -> list[Path]:
    """A folder's volumes (files and DICOM series folders), or the lines of a text file."""
    if source.is_dir():
        items = sorted(p for p in source.iterdir() if p.name.endswith(VOLUME_SUFFIXES) or p.is_dir())
    elif source.is_file():
        base = source.parent
        lines = [line.strip() for line in source.read_text(encoding="utf-8").splitlines()]
        items = [
            (base / line) if not Path(line).is_absolute() else Path(line)
            for line in lines
            if line and not line.startswith("#")
        ]
    else:
        raise MedsynthError("no such folder or list file", source)
    if not items:
        raise MedsynthError(
            "no volumes found (looked for .nii.gz, .nii, .mha, .nrrd and DICOM folders)", source
        )
    return items


def check_writable(path: Path) -> None:
    """Fail before computing anything when the output cannot be written."""
    folder = path.parent
    probe = folder
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not os.access(probe, os.W_OK):
        raise MedsynthError("output folder is not writable; choose another --out", folder)


def infer_from_args(args: argparse.Namespace) -> int:
    model = load_model(args.checkpoint, device=args.device)  # a checkpoint, or an ONNX/TorchScript export
    read = lambda p: read_volume(p, series_uid=args.series_uid, volume_index=args.volume_index)  # noqa: E731
    jobs: list[tuple[dict[str, str], str]] = []
    if args.inputs:
        if len(model.required_modalities) != 1 or model.task.is_unified:
            raise MedsynthError(
                "--inputs works with one-source checkpoints; use --volume for several sources"
            )
        jobs = [({model.sources[0]: str(p)}, volume_stem(p)) for p in list_batch_inputs(args.inputs)]
    elif args.volume:
        paths = parse_volume_arguments(args.volume, model)
        jobs = [(paths, volume_stem(next(iter(paths.values()))))]
    else:
        raise MedsynthError("give --volume PATH (repeat for several sources) or --inputs DIR")
    batch = len(jobs) > 1
    for paths, stem in tqdm(jobs, desc="volumes", disable=True if args.quiet or not batch else None):
        inputs = {modality: read(path) for modality, path in paths.items()}
        ood = screen_inputs(model, inputs, args)  # warns, or refuses with --strict
        targets = targets_for(model, inputs, args.target)
        for target in targets:
            name = target or str(model.target)
            out = output_path_for(args.out, stem, name, batch or len(targets) > 1)
            check_writable(out)
            prediction = model.predict(
                inputs, target, batch_size=args.batch_size, flip_tta=args.tta, progress=not args.quiet
            )
            extras = trust_outputs(model, inputs, prediction, out, args, batch_size=args.batch_size)
            write_prediction(
                prediction.volume, out, model, paths, prediction.seconds, vars(args), {"ood": ood, **extras}
            )
            if not args.quiet:
                print(f"{out}  ({prediction.target}, {prediction.seconds:.1f} s)")
    return 0


def targets_for(model: SynthesisModel, inputs: dict[str, Volume], requested: str | None) -> list[str | None]:
    """``--target missing`` on a unified model means every modality the inputs lack."""
    if requested == "missing":
        if not model.task.is_unified:
            return [model.target]
        return [m for m in model.task.modalities if m not in inputs]
    return [requested]


def write_prediction(
    volume: Volume,
    out: Path,
    model: SynthesisModel,
    inputs: dict[str, str],
    seconds: float,
    arguments: dict[str, Any],
    extra: Mapping[str, Any] | None = None,
) -> None:
    """The volume on its input's grid, then the sidecar (written last: its presence means complete).

    ``extra`` adds blocks to the sidecar (``ood``, ``uncertainty``: :mod:`.trust`).
    """
    write_volume(volume.array, volume, out)
    sidecar = {
        "medsynth_version": __version__,
        "output": str(out),
        "target": volume.meta.get("modality"),
        "inputs": inputs,
        "checkpoint": model.describe(),
        "arguments": {
            k: str(v) if isinstance(v, Path) else v for k, v in arguments.items() if k != "handler"
        },
        "seconds": round(seconds, 3),
        "intensity_space": "target modality scale (inverse of the cohort-level normalisation)",
        **(extra or {}),
    }
    atomic_write_text(sidecar_path(out), json.dumps(sidecar, indent=2, default=str))


def sidecar_path(out: Path) -> Path:
    return out.with_name(volume_stem(out) + ".json")
