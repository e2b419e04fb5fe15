"""``medsynth export``: a checkpoint's generator as ONNX or TorchScript, its plan embedded."""

from __future__ import annotations

import argparse

from ..errors import MedsynthError
from ..model.export import FORMATS, export_model, input_shape
from ..model.synthesis import SynthesisModel


def export_from_args(args: argparse.Namespace) -> int:
    if args.format not in FORMATS:
        raise MedsynthError(f"unknown export format {args.format!r}; choose one of {', '.join(FORMATS)}")
    if args.out.is_dir():
        raise MedsynthError("--out is a folder; give a file name such as model.onnx", args.out)
    model = SynthesisModel.from_checkpoint(args.checkpoint, device="cpu")
    path = export_model(model, args.out, args.format)
    print(
        f"{path}: {args.format}, {model.task} generator, input (batch, {', '.join(map(str, input_shape(model)))}), "
        f"plan and fingerprint embedded; run it with medsynth infer --checkpoint {path}"
    )
    return 0
