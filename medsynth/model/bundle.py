"""A trained model as a MONAI bundle: ``medsynth export --format monai-bundle --out DIR``.

The folder follows MONAI's bundle layout, so the Model Zoo's tools, MONAI Deploy and MONAI Label find
what they look for::

    DIR/configs/metadata.json    MONAI's metadata fields + a ``medsynth`` block (task, modalities,
                                 training spacing and intensity scale, file digests)
    DIR/configs/inference.json   runs medsynth's whole-volume synthesis on a folder of NIfTI files
    DIR/models/model.pt          the medsynth checkpoint (plan, fingerprint, generator weights)
    DIR/models/model.ts          the generator as TorchScript (plan embedded, any input size)
    DIR/docs/README.md           the run's model card

Run it with MONAI alone (medsynth installed)::

    python -m monai.bundle run --config_file DIR/configs/inference.json --meta_file DIR/configs/metadata.json \\
        --bundle_root DIR --dataset_dir NIFTI_FOLDER --output_dir OUT_FOLDER

or with ``medsynth infer --checkpoint DIR``, which runs :func:`load_bundle`: every file of the folder
must be one ``configs/metadata.json`` lists, with the SHA-256 it records, and the metadata must still
describe the model (task, window, fingerprint); an added, removed or changed file is refused with one
line. ``configs/inference.json`` is code by MONAI's design: ``monai.bundle run`` evaluates its
expressions before medsynth is called, so these checks protect ``medsynth infer`` only, and a bundle
from an untrusted source must never be run with MONAI's runner.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from .. import __version__
from ..errors import CheckpointError, MedsynthError
from ..io.atomic import partial_name, remove_stale_partials
from .checkpoint import BEST, file_digest, is_run_folder
from .synthesis import SynthesisModel

MODEL_FILE = "models/model.pt"
EXPORT_FILE = "models/model.ts"
METADATA = "configs/metadata.json"
INFERENCE = "configs/inference.json"
README = "docs/README.md"
#: Every file a bundle export writes; a folder of these files and nothing else is an earlier bundle.
BUNDLE_FILES = (METADATA, INFERENCE, MODEL_FILE, EXPORT_FILE, README)
#: The JSON schema MONAI's ``verify_metadata`` would download (not reachable offline; recorded as zoo bundles do).
SCHEMA = (
    "https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/meta_schema_20240725.json"
)
#: Fields MONAI's bundle specification (docs/source/mb_specification.rst) requires in metadata.json.
REQUIRED_FIELDS = (
    "version",
    "monai_version",
    "pytorch_version",
    "numpy_version",
    "optional_packages_version",
    "task",
    "description",
    "authors",
    "copyright",
    "network_data_format",
)
#: Fields each ``network_data_format`` input / output entry carries in the specification.
TENSOR_FIELDS = (
    "type", "format", "modality", "num_channels", "spatial_shape", "dtype", "value_range", "is_patch_data",
    "channel_def",
)  # fmt: skip
CT_MODALITIES = ("ct",)


def is_bundle(path: str | Path) -> bool:
    """A folder with a bundle's metadata and medsynth's model file (what :func:`load_bundle` reads)."""
    path = Path(path)
    return path.is_dir() and (path / METADATA).is_file() and (path / MODEL_FILE).is_file()


# ---------------------------------------------------------------------------------- writing
def check_bundle_target(out: Path) -> None:
    """A new or empty folder, or one an earlier medsynth bundle export wrote (replaced whole); nothing else.

    Replacing a folder removes all it holds, so no flag widens this: a run folder, a cohort, a folder of
    volumes, another tool's bundle or a bundle someone added a file to is refused, and the refusal
    suggests no flag that would destroy it. The current folder (or one holding it) is refused too: it
    cannot be renamed from under the shell that stands in it.
    """
    if not (out.exists() or out.is_symlink()):
        return
    if not out.is_dir():
        raise MedsynthError(
            "--out exists and is a file; a MONAI bundle is a folder: give a new folder name", out
        )
    real, here = Path(os.path.realpath(out)), Path.cwd().resolve()
    if real == here or real in here.parents:
        raise MedsynthError(
            "--out is the current folder or holds it; give the bundle a folder of its own (e.g. ./bundle)",
            out,
        )
    if is_run_folder(out) or any(is_run_folder(p) for p in real.parents):
        raise MedsynthError("--out is inside a training run folder; give the bundle a folder elsewhere", out)
    foreign = _foreign_entry(out)
    if foreign is not None:
        raise MedsynthError(
            f"--out is not a medsynth bundle: it holds {foreign}, which no bundle export wrote; "
            "give the bundle a new or empty folder",
            out,
        )


def _foreign_entry(folder: Path) -> str | None:
    """The first entry of ``folder`` an earlier bundle export did not write (a link counts), or None."""
    allowed = {*BUNDLE_FILES, *(str(Path(name).parent) for name in BUNDLE_FILES)}
    for root, dirs, files in os.walk(folder):  # a linked folder is listed, not entered
        for name in sorted(dirs + files):
            entry = Path(root, name)
            relative = entry.relative_to(folder).as_posix()
            if entry.is_symlink() or relative not in allowed:
                return relative
    if any(folder.iterdir()) and _medsynth_block(folder) is None:
        return f"{METADATA} of a bundle medsynth did not write"
    return None


def _medsynth_block(folder: Path) -> dict[str, Any] | None:
    try:
        meta = json.loads((folder / METADATA).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    block = meta.get("medsynth") if isinstance(meta, dict) else None
    return block if isinstance(block, dict) else None


def write_bundle(model: SynthesisModel, checkpoint: str | Path, out: str | Path) -> Path:
    """Write the bundle of ``model`` (loaded from ``checkpoint``) to the folder ``out``.

    The folder is built beside ``out`` and renamed into place, so ``out`` is a complete bundle or
    untouched (an earlier bundle there is replaced whole; see :func:`check_bundle_target`).
    """
    from .export import export_model

    out, checkpoint = Path(out), Path(checkpoint)
    check_bundle_target(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_partials(out.parent)  # what killed exports left (partial_name folders, like this one)
    temp = out.parent / partial_name(out.name, keep_suffixes=False)
    try:
        for sub in ("configs", "models", "docs"):
            (temp / sub).mkdir(parents=True)
        shutil.copyfile(checkpoint, temp / MODEL_FILE)
        export_model(model, temp / EXPORT_FILE, "torchscript")
        card_md, card = _model_card(checkpoint)
        (temp / INFERENCE).write_text(json.dumps(inference_config(), indent=2) + "\n", encoding="utf-8")
        (temp / README).write_text(card_md or _minimal_card(model), encoding="utf-8")
        digests = {name: file_digest(temp / name) for name in BUNDLE_FILES if name != METADATA}
        metadata = bundle_metadata(model, card, digests)
        (temp / METADATA).write_text(json.dumps(metadata, indent=2) + "\n", encoding="utf-8")
        _move_into_place(temp, out)
    finally:
        shutil.rmtree(temp, ignore_errors=True)
    return out


def _move_into_place(built: Path, out: Path) -> None:
    """Rename ``built`` to ``out``; what ``out`` was (an earlier bundle, an empty folder, a link to a
    folder) is set aside first and removed after, or put back if the rename fails. A link is removed as a
    link: the folder it points to stays as it is."""
    old = out.parent / partial_name(out.name, keep_suffixes=False)
    moved = out.exists() or out.is_symlink()
    if moved:
        os.replace(out, old)
    try:
        os.replace(built, out)
    except OSError:
        if moved:
            os.replace(old, out)
        raise
    if old.is_symlink():
        old.unlink()
    else:
        shutil.rmtree(old, ignore_errors=True)


def _model_card(checkpoint: Path) -> tuple[str | None, dict[str, Any] | None]:
    """The run's model card (Markdown, JSON) when the checkpoint sits in a run folder that has one."""
    run_dir = checkpoint.parent
    try:
        markdown = (run_dir / "model_card.md").read_text(encoding="utf-8")
        card = json.loads((run_dir / "model_card.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None, None
    if checkpoint.name != BEST or not isinstance(card, dict):
        return None, None  # the card describes checkpoint_best.pt, not another checkpoint
    return markdown, card


def _minimal_card(model: SynthesisModel) -> str:
    return (
        f"# medsynth model: {model.task}\n\n"
        f"Exported by medsynth {__version__} from `{Path(model.source).name}` (epoch {model.epoch}). "
        "No model card was found beside the checkpoint (a run folder's `model_card.md`); the training "
        "data and evaluation are summarised in `configs/metadata.json`.\n"
    )


def _modality_kind(name: str) -> str:
    return "CT" if name.lower() in CT_MODALITIES else "MR"


def bundle_metadata(
    model: SynthesisModel, card: dict[str, Any] | None, digests: dict[str, str]
) -> dict[str, Any]:
    """``configs/metadata.json``: MONAI's fields and the ``medsynth`` block :func:`load_bundle` checks."""
    import monai
    import nibabel
    import torch

    from ..metrics import json_safe
    from ..model_card import INTENDED_USE, _data_summary
    from .export import size_rule

    plan, task = model.plan, model.task
    target = str(task.target) if task.target else "any missing modality"
    channels = plan.layout.channels if plan.spatial_dims == 2 else len(plan.layout.modalities)
    patch = plan.spatial_dims == 3
    # 2D: whole slices framed by medsynth, any side that is a multiple of the stride; 3D: training patches.
    multiple = size_rule(model.generator)[0]
    sides = [w for w in plan.window or ()] if patch else [f"{multiple}*n"] * 2
    channel_def = _channel_def(plan)
    data = _data_summary(model.fingerprint.to_dict(), model.checkpoint_splits)
    evaluation = (card or {}).get("evaluation")
    return json_safe({
        "schema": SCHEMA,
        "version": "0.1.0",
        "changelog": {"0.1.0": f"exported by medsynth {__version__} (epoch {model.epoch})"},
        "monai_version": monai.__version__,
        "pytorch_version": torch.__version__.split("+")[0],
        "numpy_version": np.__version__,
        "optional_packages_version": {"nibabel": nibabel.__version__},
        "required_packages_version": {"medsynth": __version__},
        "name": f"medsynth {task} synthesis",
        "task": f"Contrast synthesis {task}",
        "description": (
            f"A {plan.generator.name} generator ({plan.spatial_dims}D"
            f"{', slice axis ' + str(plan.axis) if plan.spatial_dims == 2 else ''}) trained with medsynth to "
            f"synthesise {target} from {', '.join(plan.layout.modalities)}. configs/inference.json runs "
            "medsynth's whole-volume synthesis (normalisation, slices or sliding windows, inverse "
            "normalisation, the input's grid) on every NIfTI file of dataset_dir."
        ),
        "authors": "the authors of the training run (medsynth export)",
        "copyright": "Copyright (c) the authors of the training run",
        "data_source": "the training run's data set (see medsynth.training_data)",
        "data_type": "nibabel",
        "image_classes": f"{channels} channels: {', '.join(channel_def.values())}, normalised to [-1, 1]",
        "pred_classes": f"1 channel: synthetic {target}, normalised to [-1, 1] (medsynth rescales it)",
        # Held-out metrics of `medsynth evaluate` (eval/summary.json via the model card): per method/target
        # group, with the split, the intensity space and the mask they were computed in.
        "eval_metrics": {
            key: evaluation[key] for key in ("split", "space", "mask", "groups") if key in evaluation
        }
        if isinstance(evaluation, dict)
        else {},
        "intended_use": INTENDED_USE,
        "references": ["Isola et al., Image-to-Image Translation with Conditional Adversarial Networks, CVPR 2017"],
        "network_data_format": {
            "inputs": {
                "image": {
                    "type": "image", "format": "magnitude",
                    "modality": "/".join(sorted({_modality_kind(m) for m in plan.layout.modalities})),
                    "num_channels": channels, "spatial_shape": sides, "dtype": "float32",
                    "value_range": [-1, 1], "is_patch_data": patch, "channel_def": channel_def,
                }
            },
            "outputs": {
                "pred": {
                    "type": "image", "format": "magnitude",
                    "modality": _modality_kind(target), "num_channels": 2 if plan.scale_channel else 1,
                    "spatial_shape": sides, "dtype": "float32", "value_range": [-1, 1],
                    "is_patch_data": patch,
                    "channel_def": {"0": target, **({"1": "log Laplace scale"} if plan.scale_channel else {})},
                }
            },
        },
        "medsynth": {
            "task": str(task),
            "sources": list(plan.layout.modalities),
            "target": task.target,
            "spatial_dims": plan.spatial_dims,
            "window": list(plan.window) if plan.window else None,
            "generator": plan.generator.name,
            "epoch": model.epoch,
            "medsynth_version": __version__,
            "training_data": data["modalities"],
            "splits": data["splits"],
            "intensity": model.fingerprint.cohort,
            "fingerprint_sha256": model.fingerprint.digest(),
            "held_out_evaluation": evaluation,
            "files": digests,
        },
    })  # fmt: skip


def _channel_def(plan: Any) -> dict[str, str]:
    layout = plan.layout
    names: list[str] = []
    if plan.spatial_dims == 3:
        names = list(layout.modalities)
    else:
        half = layout.context // 2
        for modality in layout.modalities:
            names += [modality if k == 0 else f"{modality} slice {k:+d}" for k in range(-half, half + 1)]
        if layout.unified:
            names += [f"{m} given" for m in layout.modalities] + [f"{m} wanted" for m in layout.modalities]
    return {str(i): name for i, name in enumerate(names)}


def inference_config() -> dict[str, Any]:
    """``configs/inference.json``: one expression, run by ``monai.bundle`` (``run`` id).

    Its default folders (``data``, ``eval``) are those of the folder MONAI runs in, not of the bundle:
    a file written into the bundle would make :func:`load_bundle` refuse it (every file is hashed).
    """
    return {
        "imports": ["$import glob", "$import os"],
        "bundle_root": ".",
        "device": "cpu",
        "precision": "fp32",  # the same bytes for the same input; "auto" times the machine
        "dataset_dir": "data",
        "output_dir": "eval",
        "datalist": "$sorted(glob.glob(os.path.join(@dataset_dir, '*.nii.gz')) + glob.glob(os.path.join(@dataset_dir, '*.nii')))",
        "synthesis": {
            "_target_": "medsynth.model.bundle.BundleInference",
            "bundle_root": "@bundle_root",
            "device": "@device",
            "precision": "@precision",
        },
        "run": ["$@synthesis(@datalist, @output_dir)"],
    }


# ---------------------------------------------------------------------------------- reading
def load_bundle(folder: str | Path, device: str = "cpu", precision: str = "fp32") -> SynthesisModel:
    """The bundle's model, after checking that ``configs/metadata.json`` still describes it."""
    folder = Path(folder)
    meta_path = folder / METADATA
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise CheckpointError("no configs/metadata.json: not a MONAI bundle", folder) from exc
    except ValueError as exc:
        raise CheckpointError("the bundle's metadata is not valid JSON", meta_path) from exc
    if not isinstance(meta, dict):
        raise CheckpointError("the bundle's metadata is not a JSON object", meta_path)
    missing = [name for name in REQUIRED_FIELDS if name not in meta]
    if missing:
        raise CheckpointError(
            f"the bundle's metadata lacks MONAI's required field(s) {', '.join(missing)}", meta_path
        )
    block = meta.get("medsynth")
    if not isinstance(block, dict) or not isinstance(block.get("files"), dict):
        raise CheckpointError("not a medsynth bundle (no medsynth block in its metadata)", meta_path)
    _check_files(folder, block["files"], meta_path)
    # The checkpoint may hold several directions (a forward and a reverse generator): the bundle serves the one it describes.
    target = block.get("target") if isinstance(block.get("target"), str) else None
    model = SynthesisModel.from_checkpoint(
        folder / MODEL_FILE, device=device, precision=precision, target=target
    )
    plan = model.plan
    found = {
        "task": str(model.task),
        "sources": list(plan.layout.modalities),
        "target": model.task.target,
        "spatial_dims": plan.spatial_dims,
        "window": list(plan.window) if plan.window else None,
        "fingerprint_sha256": model.fingerprint.digest(),
    }
    for key, value in found.items():
        if block.get(key) != value:
            raise CheckpointError(
                f"the bundle's metadata was edited: medsynth.{key} is {block.get(key)!r} but the model's is "
                f"{value!r}; export the bundle again",
                meta_path,
            )
    model.source = str(folder)
    return model


def _check_files(folder: Path, listed: dict[str, Any], meta_path: Path) -> None:
    """The bundle's files are exactly those its metadata lists (``configs/metadata.json`` aside, which
    holds the list), each with the SHA-256 recorded: nothing added, removed or changed since export."""
    found = _bundle_files(folder, meta_path)
    added, missing = sorted(found - set(listed)), sorted(set(listed) - found)
    if added or missing:
        what = f"holds {added[0]}, which its metadata does not list" if added else f"lacks {missing[0]}"
        raise CheckpointError(
            f"the bundle {what}: it was altered (or exported by a medsynth that listed fewer files); "
            "export it again",
            meta_path,
        )
    for name in sorted(found):
        if file_digest(folder / name) != listed[name]:
            raise CheckpointError(
                f"{name} is not the file the metadata describes (SHA-256 differs): the bundle was altered; "
                "export it again",
                meta_path,
            )


def _bundle_files(folder: Path, meta_path: Path) -> set[str]:
    """Every file below ``folder`` but the metadata, as relative names; a symbolic link is refused."""
    found: set[str] = set()
    for root, dirs, files in os.walk(folder):
        for name in dirs + files:
            entry = Path(root, name)
            if entry.is_symlink():
                raise CheckpointError(
                    f"the bundle holds a symbolic link ({entry.relative_to(folder).as_posix()}); a bundle is "
                    "plain files: export it again",
                    meta_path,
                )
        found.update(Path(root, name).relative_to(folder).as_posix() for name in files)
    return found - {METADATA}


class BundleInference:
    """What ``configs/inference.json`` calls: each NIfTI file of a list -> ``<output_dir>/<name>_<target>``.

    One file is one case for a single-source model; a multi-source model takes files named
    ``<case>_<modality>.nii[.gz]`` and groups them by case. Outputs are those of ``medsynth infer``
    (same model, same whole-volume path, float32 on the input's grid).
    """

    def __init__(self, bundle_root: str | Path, device: str = "cpu", precision: str = "fp32") -> None:
        from .ood import OODChecker

        self.model = load_bundle(bundle_root, device=str(device), precision=str(precision))
        self.checker = OODChecker(self.model.fingerprint)

    def cases(self, files: list[str]) -> dict[str, dict[str, Path]]:
        """Files -> ``{case: {modality: path}}`` (``sub-01_T1w.nii.gz`` is case ``sub-01``, ``t1``)."""
        from ..modalities import canonical_modality, is_modality

        sources = self.model.required_modalities
        if len(sources) == 1:
            return {_stem(Path(f)): {sources[0]: Path(f)} for f in files}
        grouped: dict[str, dict[str, Path]] = {}
        for name in files:
            case, _, modality = _stem(Path(name)).rpartition("_")
            if case and is_modality(modality) and canonical_modality(modality) in sources:
                grouped.setdefault(case, {})[canonical_modality(modality)] = Path(name)
        return grouped

    def __call__(self, files: list[str], output_dir: str | Path) -> list[Path]:
        from ..io.readers import read_volume
        from ..io.writers import write_volume
        from .ood import enforce

        if not files:
            raise MedsynthError("no NIfTI files to synthesise from (dataset_dir holds no *.nii / *.nii.gz)")
        out_dir = Path(output_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        written = []
        for case, paths in sorted(self.cases(list(files)).items()):
            missing = [m for m in self.model.required_modalities if m not in paths]
            if missing:
                raise MedsynthError(
                    f"case {case!r} has no {', '.join(missing)} file (<case>_<modality>.nii.gz)"
                )
            inputs = {m: read_volume(p) for m, p in paths.items()}
            enforce(self.checker.check(inputs), strict=False)  # warns, as medsynth infer does
            prediction = self.model.predict(inputs)
            out = out_dir / f"{case}_{prediction.target}.nii.gz"
            write_volume(prediction.volume.array, prediction.volume, out)
            written.append(out)
        return written


def _stem(path: Path) -> str:
    name = path.name
    for suffix in (".nii.gz", ".nii"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return path.stem
