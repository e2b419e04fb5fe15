"""``medsynth export``: a checkpoint's generator as ONNX or TorchScript, its plan embedded."""

from __future__ import annotations

import argparse
import os

from ..errors import MedsynthError
from ..model.checkpoint import resolve_checkpoint
from ..model.export import check_export_target, export_model, input_shape
from ..model.synthesis import SynthesisModel


def export_from_args(args: argparse.Namespace) -> int:
    """The format is checked by the parser (``choices``) and again by :func:`export_model`."""
    if args.out.is_dir():
        raise MedsynthError("--out is a folder; give a file name such as model.onnx", args.out)
    checkpoint = resolve_checkpoint(args.checkpoint)
    if args.out.exists() and checkpoint.exists() and os.path.samefile(args.out, checkpoint):
        raise MedsynthError("--out is the checkpoint being exported; give another file name", args.out)
    check_export_target(args.out, args.format, overwrite=bool(getattr(args, "overwrite", False)))
    model = SynthesisModel.from_checkpoint(args.checkpoint, device="cpu")
    path = export_model(model, args.out, args.format)
    print(
        f"{path}: {args.format}, {model.task} generator, input (batch, {', '.join(map(str, input_shape(model)))}), "
        f"plan and fingerprint embedded; run it with medsynth infer --checkpoint {path}"
    )
    return 0
