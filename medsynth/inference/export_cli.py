"""``medsynth export``: a checkpoint's generator as ONNX, pt2 or TorchScript (plan embedded), or a MONAI bundle."""

from __future__ import annotations

import argparse
import os

from ..errors import MedsynthError
from ..io.atomic import remove_stale_partials
from ..model.checkpoint import resolve_checkpoint
from ..model.export import check_export_direction, check_export_target, export_model, input_shape
from ..model.synthesis import SynthesisModel


def export_from_args(args: argparse.Namespace) -> int:
    """The format is checked by the parser (``choices``) and again by :func:`export_model`."""
    bundle = args.format == "monai-bundle"
    overwrite = bool(getattr(args, "overwrite", False))
    if args.out.is_dir() and not bundle:
        raise MedsynthError("--out is a folder; give a file name such as model.onnx", args.out)
    checkpoint = resolve_checkpoint(args.checkpoint)
    if args.out.exists() and checkpoint.exists() and os.path.samefile(args.out, checkpoint):
        raise MedsynthError("--out is the checkpoint being exported; give another file name", args.out)
    if bundle:
        from ..model.bundle import check_bundle_target, write_bundle

        check_bundle_target(args.out)  # a folder: --overwrite never widens what may be replaced
    else:
        check_export_target(args.out, args.format, overwrite=overwrite)
    remove_stale_partials(args.out.parent)  # what a killed export left beside its output
    target = getattr(args, "target", None)
    model = SynthesisModel.from_checkpoint(args.checkpoint, device="cpu", target=target)
    check_export_direction(model, target)
    if bundle:
        path = write_bundle(model, checkpoint, args.out)
        print(
            f"{path}: MONAI bundle of the {model.task} model (configs/, models/model.pt and model.ts, "
            f"docs/README.md); run it with medsynth infer --checkpoint {path} or python -m monai.bundle run "
            f"--config_file {path}/configs/inference.json --meta_file {path}/configs/metadata.json "
            f"--bundle_root {path} --dataset_dir NIFTI_FOLDER --output_dir OUT_FOLDER"
        )
        return 0
    path = export_model(model, args.out, args.format)
    channels, *_ = input_shape(model)
    print(
        f"{path}: {args.format}, {model.task} generator, input (batch, {channels}, any size), "
        f"plan and fingerprint embedded; run it with medsynth infer --checkpoint {path}"
    )
    return 0
