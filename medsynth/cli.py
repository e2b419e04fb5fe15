"""The ``medsynth`` command: parse arguments, then delegate to the library.

User mistakes (:class:`~medsynth.errors.MedsynthError`) end as one ``error:`` line and exit code 2;
``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from . import __version__
from .convert.cli import PRECISION_HELP, add_convert_arguments, convert_command
from .errors import MedsynthError
from .model.device import PRECISION_WISHES

log = logging.getLogger("medsynth")
#: ``medsynth export`` formats (= medsynth.model.export.FORMATS, which imports torch).
EXPORT_FORMATS = ("onnx", "pt2", "torchscript", "monai-bundle")
#: 128 + SIGPIPE: the status a shell reports for a command whose reader went away.
SIGPIPE_EXIT = 141


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; its exit status.

    A reader that leaves early (``medsynth info --json | head -c 10``) ends any command quietly, as ``cat``
    would: Python would print a BrokenPipeError traceback, then another when it flushes stdout at exit.
    """
    try:
        try:
            return _run(argv)
        finally:
            sys.stdout.flush()  # what is still buffered fails here, not in the interpreter's exit
    except BrokenPipeError:
        return _reader_gone()


def _reader_gone() -> int:
    """Point stdout at /dev/null, so nothing is left to fail, and exit as a command SIGPIPE ended."""
    with contextlib.suppress(OSError, ValueError):  # no file descriptor (stdout replaced in-process)
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    return SIGPIPE_EXIT


def _run(argv: Sequence[str] | None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _configure_logging(args.debug)
    if not hasattr(args, "handler"):
        parser.print_help()
        return 2
    try:
        return int(args.handler(args) or 0)
    except MedsynthError as exc:
        if args.debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="medsynth", description="Medical image contrast synthesis.")
    parser.add_argument("--version", action="version", version=f"medsynth {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    commands = parser.add_subparsers(title="commands", metavar="COMMAND")

    data = commands.add_parser("data", help="build the demo cohort or check a data folder")
    data_commands = data.add_subparsers(title="data commands", metavar="ACTION")
    demo = data_commands.add_parser("demo", help="build the synthetic multi-contrast demo cohort")
    demo.add_argument("--out", required=True, type=Path, help="output folder (BIDS-like layout)")
    demo.add_argument("--subjects", type=int, default=12)
    demo.add_argument("--spacing", type=float, default=1.0, help="voxel size in mm (2 for the fast demo)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--dicom", action="store_true", help="also write DICOM series under OUT/dicom")
    demo.add_argument(
        "--misregister",
        metavar="MM,DEG",
        help="move every modality but the reference per subject by a random rigid transform of MM * U(0.5, 1) "
        "translation and DEG * U(0.5, 1) rotation, keeping the shared header (unaligned pairs, e.g. 4,4)",
    )
    demo.add_argument(
        "--misregister-reference",
        metavar="MODALITY",
        help="with --misregister: the modality left in place (t1, t2, pd, flair or ct; default t1)",
    )
    demo.add_argument(
        "--misregister-plane",
        # data.demo.MISREGISTER_PLANES, spelled out: the parsers import nothing heavy
        choices=("axial", "coronal", "sagittal"),
        help="with --misregister: keep each motion in this plane (same lengths and angles), e.g. axial for "
        "what a 2D model slicing axially can see in its slices",
    )
    demo.add_argument(
        "--protocol",
        default="se",
        metavar="NAME",
        help="how the T1w is acquired, as at another site: se (default), spgr, mprage or 1.5t; the other "
        "contrasts and the CT stay the default cohort's (docs/demo_cohort.md)",
    )
    demo.set_defaults(handler=_data_demo)
    check = data_commands.add_parser("check", help="list subjects, modalities, geometry and problems")
    check.add_argument("root", type=Path)
    check.add_argument("--manifest", type=Path, help="CSV manifest subject,modality,path")
    check.add_argument("--modalities", help="modalities training will need, e.g. t1,t2")
    check.add_argument("--pairing", default="paired", choices=["paired", "unpaired"],
                       help="unpaired: --modalities SOURCE,TARGET, and say what each subject serves (data.pairing)")  # fmt: skip
    check.add_argument("--json", action="store_true", help="print the report as JSON")
    check.set_defaults(handler=_data_check)
    register = data_commands.add_parser(
        "register", help="registered copy of a data folder: each subject's images moved onto its reference"
    )
    register.add_argument("root", type=Path, help="data folder (any supported layout)")
    register.add_argument("--out", required=True, type=Path, help="new folder for the copy (resumable)")
    register.add_argument("--manifest", type=Path, help="CSV manifest subject,modality,path")
    register.add_argument("--modalities", help="modalities to register and write, e.g. t1,t2 (default: all)")
    register.add_argument("--reference", help="the modality the others are moved onto (default: the first of --modalities, else t1); for training pairs, the target: it keeps its own voxels, while a resampled target teaches the interpolation's blur")  # fmt: skip
    register.add_argument("--template", help="instead of --reference: every image, each on its own, moved onto this template (an image file, or mni152: nilearn's MNI152 2009 T1), on its field of view at the subject's finest voxel size; one pose for unpaired training, no pair used")  # fmt: skip
    register.add_argument("--transform", default="rigid", choices=["rigid", "affine", "bspline"],
                          help="rigid (default); affine or bspline refine the rigid result")  # fmt: skip
    register.add_argument("--interpolation", default="linear", choices=["linear", "bspline"],
                          help="resampling of the moved images (a CT stays within its HU range either way)")  # fmt: skip
    register.add_argument("--quiet", action="store_true", help="no line per subject, only the QC table")
    register.set_defaults(handler=_data_register)

    train = commands.add_parser(
        "train", help="train a synthesis model, e.g. medsynth train 't1->t2' --data DIR"
    )
    train.add_argument("task", nargs="?", help="'t1->t2', t1:t2, 't1,t2,pd->flair' or unified")
    train.add_argument("--source", help="source modality (or comma list), instead of TASK")
    train.add_argument("--target", help="target modality, instead of TASK")
    train.add_argument("--modalities", help="modality set of a unified task, e.g. t1,t2,pd,flair")
    train.add_argument("--data", help="data folder (any supported layout)")
    train.add_argument("--config", help="recipe: a YAML path or a name in configs/ (default t1_to_t2_unet2d)")
    train.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override a recipe value, e.g. --set train.epochs=5 (repeatable)")  # fmt: skip
    train.add_argument("--name", help="run name (default from task and generator)")
    train.add_argument("--runs-dir", type=Path, default=Path("runs"))
    train.add_argument("--resume", type=Path, metavar="RUN", help="continue the run in this folder")
    train.add_argument("--epochs", type=int, help="epochs at the initial learning rate")
    train.add_argument("--decay-epochs", type=int, help="epochs of linear learning-rate decay")
    train.add_argument("--device", choices=["auto", "cpu", "cuda"])
    train.add_argument("--quiet", action="store_true", help="no progress bars or per-epoch lines")
    train.set_defaults(handler=_train)

    infer = commands.add_parser("infer", help="synthesise a volume with a trained checkpoint")
    infer.add_argument("--volume", action="append", default=[], metavar="[MOD=]PATH",
                       help="input volume (NIfTI, MHA/NRRD or a DICOM folder); repeat for several sources")  # fmt: skip
    infer.add_argument("--inputs", type=Path, metavar="DIR_OR_LIST",
                       help="batch: a folder of volumes or a text file with one path per line (one-source models)")  # fmt: skip
    infer.add_argument("--checkpoint", required=True, type=Path, help="checkpoint .pt or run folder")
    infer.add_argument("--out", required=True, type=Path, help="output file (.nii.gz, .mha, .nrrd) or folder")
    infer.add_argument(
        "--target",
        help="modality to synthesise (unified models, 'missing' = all absent ones; of a model trained in both directions, the direction)",
    )
    infer.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    infer.add_argument("--out-dtype", default="float32", choices=["float32", "int16"],
                       help="data type of the written volume: float32 (default), or int16 (rounded; HU of a synthetic CT)")  # fmt: skip
    infer.add_argument("--precision", default="fp32", choices=PRECISION_WISHES, help=PRECISION_HELP)
    infer.add_argument("--batch-size", type=int, default=None,
                       help="slices per forward pass (default: 64 on cuda, 16 on cpu)")  # fmt: skip
    infer.add_argument("--tta", action="store_true", help="average with the left-right flipped prediction")
    infer.add_argument("--series-uid", help="pick this series when a DICOM folder holds several")
    infer.add_argument("--volume-index", type=int, help="pick this volume of a 4D input")
    infer.add_argument("--quiet", action="store_true")
    add_trust_arguments(infer)
    infer.set_defaults(handler=_infer)

    evaluate = commands.add_parser("evaluate", help="score a run on its held-out subjects")
    evaluate.add_argument("--run", type=Path, help="run folder (uses its splits and best checkpoint)")
    evaluate.add_argument("--checkpoint", type=Path, help="checkpoint, with --data")
    evaluate.add_argument("--data", type=Path, help="data folder (default: the run's)")
    evaluate.add_argument("--split", default="test", choices=["train", "val", "test", "all"])
    evaluate.add_argument("--space", default="normalised", choices=["normalised", "native"])
    evaluate.add_argument("--out", type=Path, help="output folder (default RUN/eval)")
    evaluate.add_argument(
        "--baselines", action="store_true", help="also score the identity and LUT baselines"
    )
    evaluate.add_argument(
        "--uncertainty",
        action="store_true",
        help="also measure how well the uncertainty map tracks the error (calibration columns, figures)",
    )
    evaluate.add_argument(
        "--target", help="of a model trained in both directions: the one to score (default: the run's own)"
    )
    evaluate.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    evaluate.add_argument("--precision", default="fp32", choices=PRECISION_WISHES, help=PRECISION_HELP)
    evaluate.add_argument("--quiet", action="store_true")
    evaluate.set_defaults(handler=_evaluate)

    job = commands.add_parser("demo", help="the main job: demo cohort -> train -> evaluate -> table")
    job.add_argument("--workdir", type=Path, default=Path("demo"))
    job.add_argument("--config", default="demo_cpu", help="recipe (default: the fast CPU recipe)")
    job.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    job.add_argument("--subjects", type=int, default=12)
    job.add_argument(
        "--minutes", type=float, default=None,
        help="training time budget in minutes (default: the recipe's train.max_minutes)",
    )  # fmt: skip
    job.add_argument("--quiet", action="store_true")
    job.set_defaults(handler=_demo_job)

    export = commands.add_parser(
        "export", help="export the generator (ONNX, pt2, TorchScript; plan embedded) or a MONAI bundle"
    )
    export.add_argument("--checkpoint", required=True, type=Path, help="checkpoint .pt or run folder")
    export.add_argument("--format", required=True, choices=EXPORT_FORMATS)
    export.add_argument(
        "--out",
        required=True,
        type=Path,
        help="output file (model.onnx, model.pt2, model_ts.pt) or folder (monai-bundle)",
    )
    export.add_argument(
        "--target", help="of a model trained in both directions: the one to export (default: the run's own)"
    )
    export.add_argument("--overwrite", action="store_true",
                        help="replace an existing --out file that is not an earlier export in this format "
                             "(never a checkpoint or a run's file; a bundle folder is replaced only if an "
                             "earlier bundle export wrote it, flag or not)")  # fmt: skip
    export.set_defaults(handler=_export)

    convert = commands.add_parser("convert", help="add a synthetic series to every study of a DICOM export")
    add_convert_arguments(convert)
    convert.set_defaults(handler=convert_command)

    info = commands.add_parser(
        "info", help="versions, devices and what medsynth chooses on them (bug reports)"
    )
    info.add_argument("--json", action="store_true", help="print the report as JSON, for a bug report")
    info.add_argument("--runs-dir", type=Path, default=Path("runs"),
                      help="the folder whose free space is reported (default: runs)")  # fmt: skip
    info.set_defaults(handler=_info)
    return parser


def add_trust_arguments(infer: argparse.ArgumentParser) -> None:
    """``infer`` options of docs/trust.md: out-of-distribution refusal and uncertainty maps."""
    infer.add_argument("--strict", action="store_true",
                       help="refuse inputs unlike the training data instead of warning (exit 2)")  # fmt: skip
    infer.add_argument("--uncertainty", action="store_true",
                       help="also write <out stem>_uncertainty in the output's format (expected error)")  # fmt: skip


def _configure_logging(debug: bool) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
    log.handlers[:] = [handler]
    log.setLevel(logging.DEBUG if debug else logging.INFO)
    log.propagate = False


# ------------------------------------------------------------------------------------- data
def _data_demo(args: argparse.Namespace) -> int:
    from .data.demo import make_demo_cohort, parse_misregister
    from .errors import ConfigError

    if args.misregister is None and (args.misregister_reference or args.misregister_plane) is not None:
        raise ConfigError("--misregister-reference and --misregister-plane need --misregister MM,DEG")
    misregister = None if args.misregister is None else parse_misregister(args.misregister)
    reference = args.misregister_reference or "t1"
    make_demo_cohort(
        args.out,
        n_subjects=args.subjects,
        spacing_mm=args.spacing,
        seed=args.seed,
        dicom=args.dicom,
        misregister=misregister,
        reference=reference,
        protocol=args.protocol,
        misregister_plane=args.misregister_plane,
    )
    notes = "" if args.protocol == "se" else f", T1w acquired as {args.protocol}"
    if misregister is not None:
        notes += f", misregistered against {reference} (up to {misregister[0]:g} mm, {misregister[1]:g} deg"
        notes += f", in the {args.misregister_plane} plane)" if args.misregister_plane else ")"
    print(
        f"demo cohort: {args.subjects} subjects x T1w, T2w, PDw, FLAIR, CT at {args.spacing:g} mm in {args.out}"
        + notes
    )
    return 0


def _data_check(args: argparse.Namespace) -> int:
    from .data.check import check_dataset
    from .modalities import canonical_modality

    modalities = [canonical_modality(m) for m in args.modalities.split(",")] if args.modalities else None
    report = check_dataset(args.root, args.manifest, modalities=modalities, pairing=args.pairing)
    print(json.dumps(report.to_dict(), indent=2) if args.json else report.render())
    return 1 if report.blocking else 0


def _data_register(args: argparse.Namespace) -> int:
    from .data.register import register_dataset
    from .data.registration import RegistrationSettings

    report = register_dataset(
        args.root,
        args.out,
        manifest=args.manifest,
        modalities=args.modalities.split(",") if args.modalities else None,
        reference=args.reference,
        template=args.template,
        settings=RegistrationSettings(transform=args.transform, interpolation=args.interpolation),
        say=(lambda line: None) if args.quiet else (lambda line: print(line, flush=True)),
    )
    print(report.render())
    return 1 if report.failed else 0


# ------------------------------------------------------------------------------------ train
def _train(args: argparse.Namespace) -> int:
    from .engine.run import train_from_args

    train_from_args(args)
    return 0


# ------------------------------------------------------------------------------------ infer
def _infer(args: argparse.Namespace) -> int:
    from .inference.run import infer_from_args

    return infer_from_args(args)


def _export(args: argparse.Namespace) -> int:
    from .inference.export_cli import export_from_args

    return export_from_args(args)


def _evaluate(args: argparse.Namespace) -> int:
    from .evaluate import evaluate_from_args

    return evaluate_from_args(args)


def _info(args: argparse.Namespace) -> int:
    from .info import collect, render, to_json

    report = collect(args.runs_dir)
    print(to_json(report) if args.json else render(report))
    return 0


def _demo_job(args: argparse.Namespace) -> int:
    from .demo_job import run_demo_job

    return run_demo_job(args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
