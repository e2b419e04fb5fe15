"""What the data_prep scripts share: scanning a download, placing files, checking, the command line.

Sources are only ever read: files are symlinked (default) or copied into the output tree, never moved.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from medsynth.data.check import check_dataset
from medsynth.data.layouts import SubjectRecord, bids_label, scan_dataset
from medsynth.errors import DataError, MedsynthError
from medsynth.io.atomic import atomic_path, atomic_write_text


def nifti_extension(path: Path) -> str:
    """``.nii.gz`` or ``.nii``: a link must keep the compression its target has."""
    return ".nii.gz" if path.name.endswith(".nii.gz") else ".nii"


def scan_download(source: Path, layout: str) -> list[SubjectRecord]:
    """The subjects of a download, refusing a folder that is not in the expected layout."""
    records = scan_dataset(source)
    if records[0].layout != layout:
        raise DataError(
            f"found the {records[0].layout} layout here, not {layout}; pass the extracted {layout} download",
            source,
        )
    return records


def place(source: Path, destination: Path, *, copy: bool) -> None:
    """Symlink (or copy) ``source`` to ``destination``; a rerun over the same output is a no-op."""
    if destination.is_symlink() or destination.exists():
        if destination.resolve() == source.resolve() or (copy and _same_copy(source, destination)):
            return
        raise DataError(f"already exists and is not {source}; choose an empty --out folder", destination)
    destination.parent.mkdir(parents=True, exist_ok=True)
    if copy:
        with atomic_path(destination) as temp:
            shutil.copy2(source, temp)
    else:
        os.symlink(source.resolve(), destination)


def _same_copy(source: Path, destination: Path) -> bool:
    """``copy2`` keeps size and modification time, so a file from an earlier run matches on both."""
    a, b = source.stat(), destination.stat()
    return (a.st_size, a.st_mtime_ns) == (b.st_size, b.st_mtime_ns)


def write_participants(out: Path, records: Sequence[SubjectRecord]) -> None:
    """``participants.tsv`` mapping each BIDS participant to the id it had in the download."""
    lines = ["participant_id\tsource_id"] + [f"sub-{bids_label(r.id)}\t{r.id}" for r in records]
    atomic_write_text(out / "participants.tsv", "\n".join(lines) + "\n")


def check(source: Path, modalities: Sequence[str]) -> int:
    """Print the ``medsynth data check`` report of a download; 1 when something blocks training."""
    report = check_dataset(source, modalities=modalities)
    print(report.render())
    return 1 if report.blocking else 0


def parser(description: str) -> argparse.ArgumentParser:
    """The arguments every data_prep script takes."""
    cli = argparse.ArgumentParser(description=description)
    cli.add_argument("source", type=Path, help="the extracted download (read only, never modified)")
    cli.add_argument("--out", type=Path, help="output folder for the BIDS-like layout medsynth reads")
    cli.add_argument("--copy", action="store_true", help="copy files instead of symlinking them")
    cli.add_argument("--check", action="store_true", help="only validate the download and print a report")
    return cli


def run(action: Callable[[], int]) -> int:
    """Run a script body, printing user errors as one line (exit 2) as the medsynth CLI does."""
    try:
        return action()
    except MedsynthError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
