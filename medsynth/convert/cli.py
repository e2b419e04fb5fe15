"""``medsynth convert``: argparse wiring, kept here so the main CLI adds the subcommand in two lines::

convert = subparsers.add_parser("convert", help="add a synthetic contrast to every study of a DICOM export")
add_convert_arguments(convert); convert.set_defaults(handler=convert_command)
"""

from __future__ import annotations

import argparse
import sys

from .formats import FORMATS


def add_convert_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``convert``'s arguments to a (sub)parser."""
    parser.add_argument("input", help="root folder of the DICOM export (any layout; it is only read)")
    parser.add_argument("--checkpoint", required=True, help="medsynth checkpoint (.pt) or run folder")
    parser.add_argument("--out", required=True, help="output folder (outside the input export)")
    parser.add_argument(
        "--format", dest="fmt", choices=FORMATS, default="nifti", help="what to write per study"
    )
    parser.add_argument("--map", dest="mapping", help="YAML of 'regex on SeriesDescription: modality' rules")
    parser.add_argument("--target", help="modality to synthesise (unified checkpoints only)")
    parser.add_argument("--workers", type=int, default=1, help="studies converted in parallel (processes)")
    parser.add_argument("--shard", default=None, help="K/N: convert only this machine's share of the studies")
    parser.add_argument("--overwrite", action="store_true", help="redo studies that are already converted")
    parser.add_argument("--dry-run", action="store_true", help="print what would be converted; write nothing")


def convert_command(args: argparse.Namespace) -> int:
    """Run ``medsynth convert``; exit status 1 when any study failed, else 0.

    :class:`~medsynth.errors.MedsynthError` (bad paths, bad mapping) propagates to the main CLI, which
    prints it as one line.
    """
    from .plan import render_plan
    from .runner import run_convert

    report = run_convert(
        args.input,
        args.checkpoint,
        args.out,
        fmt=args.fmt,
        mapping=args.mapping,
        workers=args.workers,
        shard=args.shard,
        overwrite=args.overwrite,
        dry_run=args.dry_run,
        target=args.target,
    )
    if args.dry_run:
        print(render_plan(report.plans, report.settings["target"]))
        for note in report.notes:
            print(f"note: {note}")
    print(report.summary(), file=sys.stderr)
    return 1 if report.failed else 0
