"""Bring a BraTS download (2023 ``-t1n/-t1c/-t2w/-t2f`` or 2021 ``_t1/_t1ce/_t2/_flair``) into medsynth's layout.

    python data_prep/brats.py BraTS2023-GLI-Training/ --check
    python data_prep/brats.py BraTS2023-GLI-Training/ --out data/brats

BraTS images are already skull-stripped, co-registered to the SRI24 atlas and resampled to 1 mm
isotropic 240x240x155, so no registration is needed: the files are symlinked (or copied) under
``sub-*/anat/`` and segmentations are left out. medsynth can also read the download directly
(``--data BraTS2023-GLI-Training/``); reorganising is for mixing it with other data or renaming.
"""

from __future__ import annotations

import sys
from pathlib import Path

from _common import check, nifti_extension, parser, place, run, scan_download, write_participants

from medsynth.data.layouts import bids_path

MODALITIES = ("t1", "t1c", "t2", "flair")


def reorganise(source: Path, out: Path, *, copy: bool) -> int:
    """Place every subject's four contrasts under ``out`` (links by default; sources never change)."""
    records = scan_download(source, "brats")
    for record in records:
        for modality, path in record.paths.items():
            place(path, bids_path(out, record.id, modality, nifti_extension(path)), copy=copy)
    write_participants(out, records)
    incomplete = [r.id for r in records if set(MODALITIES) - set(r.paths)]
    print(f"{len(records)} BraTS subjects written to {out}")
    if incomplete:
        print(f"{len(incomplete)} lack one of t1n/t1c/t2w/t2f: {', '.join(incomplete)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    cli = parser(__doc__.splitlines()[0])
    args = cli.parse_args(argv)
    if args.check:
        return run(lambda: check(args.source, MODALITIES))
    if args.out is None:
        cli.error("give --out DST to reorganise, or --check to validate")
    return run(lambda: reorganise(args.source, args.out, copy=args.copy))


if __name__ == "__main__":
    sys.exit(main())
