"""``medsynth convert``: argparse wiring, kept here so the main CLI adds the subcommand in two lines::

convert = subparsers.add_parser("convert", help="add a synthetic contrast to every study of a DICOM export")
add_convert_arguments(convert); convert.set_defaults(handler=convert_command)

Building the parser imports nothing heavy: the runner (torch, SimpleITK) is imported when the command runs.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from ..errors import MedsynthError
from ..model.device import PRECISION_WISHES
from .report import FORMATS, UNREADABLE_REPORT, ConvertReport

#: ``--precision`` of convert, infer and evaluate: deterministic by default, faster when asked.
PRECISION_HELP = (
    "fp32 (default) measures nothing: the same input gives the same output on this machine, however busy "
    "it is; bf16, fp16 (CUDA) or auto (a CPU with a bf16 unit times bf16 against fp32, a card takes the "
    "model's training precision) may be faster; the sidecar records which ran"
)
#: How many study UIDs the one-line "not reported yet" message names before pointing to report.json.
_SHOWN_UIDS = 5


class Interrupted(KeyboardInterrupt):
    """SIGTERM or SIGINT arrived: the batch stops its workers, writes what it has, and exits."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def add_convert_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``convert``'s arguments to a (sub)parser."""
    parser.add_argument("input", help="root folder of the DICOM export (any layout; it is only read)")
    parser.add_argument("--checkpoint", help="medsynth checkpoint (.pt) or run folder (needed to convert)")
    parser.add_argument("--out", required=True, help="output folder (outside the input export)")
    parser.add_argument(
        "--format", dest="fmt", choices=FORMATS, default="nifti", help="what to write per study"
    )
    parser.add_argument("--map", dest="mapping", help="YAML of 'regex on SeriesDescription: modality' rules")
    parser.add_argument(
        "--target",
        help="modality to synthesise (unified checkpoints; the direction of a checkpoint trained both ways)",
    )
    parser.add_argument("--workers", type=int, default=1, help="studies converted in parallel (processes)")
    parser.add_argument(
        "--device",
        default="auto",
        help="auto (GPUs when present; worker i on GPU i %% n_gpus), cpu, cuda, or one device such as cuda:1",
    )
    parser.add_argument("--precision", default="fp32", choices=PRECISION_WISHES, help=PRECISION_HELP)
    parser.add_argument("--shard", default=None, help="K/N: convert only this machine's share of the studies")
    parser.add_argument(
        "--merge-reports",
        action="store_true",
        help="join the report-shard-K-of-N files in --out into report.csv/json (no --checkpoint needed)",
    )
    parser.add_argument("--overwrite", action="store_true", help="redo studies that are already converted")
    parser.add_argument("--dry-run", action="store_true", help="print what would be converted; write nothing")


@contextmanager
def _signals_interrupt() -> Iterator[None]:
    """Turn the first SIGTERM/SIGINT into :class:`Interrupted`; ignore repeats while the batch cleans up."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    handled = (signal.SIGTERM, signal.SIGINT)
    previous = {signum: signal.getsignal(signum) for signum in handled}

    def stop(signum: int, frame: object) -> None:
        for other in handled:
            signal.signal(other, signal.SIG_IGN)
        raise Interrupted(signum)

    for signum in handled:
        signal.signal(signum, stop)
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def convert_command(args: argparse.Namespace) -> int:
    """Run ``medsynth convert``; exit status 1 when any study failed (or, merging, is unreported), else 0.

    An input without any DICOM study is one ``error:`` line and status 1; SIGTERM or Ctrl-C stops the
    workers, writes the report of the finished studies and returns 128 + the signal number. Other
    :class:`~medsynth.errors.MedsynthError` (bad paths, bad mapping) propagates to the main CLI, which
    prints it as one line.
    """
    from .runner import NoStudiesError, merge_shard_reports, run_convert

    if args.merge_reports:
        return _print_merged(merge_shard_reports(args.input, args.out))
    if not args.checkpoint:
        raise MedsynthError("--checkpoint is required to convert (only --merge-reports works without one)")
    try:
        with _signals_interrupt():
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
                device=args.device,
                precision=args.precision,
            )
    except NoStudiesError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except Interrupted as exc:
        print(
            f"convert stopped by {exc}: workers ended, finished studies are in the report; "
            "run the same command again to resume",
            file=sys.stderr,
        )
        return 128 + exc.signum
    if args.dry_run:
        from .plan import render_plan

        print(render_plan(report.plans, report.settings["target"]))
        for note in report.notes:
            print(f"note: {note}")
    print(report.summary(), file=sys.stderr)
    return 1 if report.failed else 0


def _print_merged(report: ConvertReport) -> int:
    print(f"merged {len(report.settings['merged_from'])} shard reports: {report.summary()}", file=sys.stderr)
    for bad in report.settings.get("reports_unreadable", []):
        print(
            f"{bad['name']} cannot be read ({bad['reason']}): its {bad['studies']} studies are listed as "
            f"unreported; run shard {bad['shard']} again (or restore the file)",
            file=sys.stderr,
        )
    missing = [r.study_uid for r in report.studies if r.status == "unreported" and not _damaged(r.reason)]
    if missing:
        shown = ", ".join(missing[:_SHOWN_UIDS]) + (", ..." if len(missing) > _SHOWN_UIDS else "")
        shards = ", ".join(report.settings["shards_unreported"]) or "unknown"
        print(
            f"{len(missing)} studies of the export are in no shard report yet (shards {shards}): {shown} "
            "(all listed in report.json)",
            file=sys.stderr,
        )
    return 1 if report.failed or report.unreported else 0


def _damaged(reason: str) -> bool:
    return reason.startswith(UNREADABLE_REPORT)
