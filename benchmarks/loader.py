"""Throughput of the 2D training loader, read from the preprocessed cache.

Prints slices per second for batches of ``--batch-size`` (default 8) over whole shuffled epochs, plus
the one-off costs (cache preparation, loading the slices into RAM). Without ``--data`` it builds the
demo cohort at 2 mm in a temporary folder first. The fingerprint is computed on every subject here:
this measures speed, not a training protocol.

    python benchmarks/loader.py                      # demo cohort
    python benchmarks/loader.py --data DIR --source t1 --target t2 --context 3
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import machine

from medsynth.data.cache import prepare_cohort
from medsynth.data.datasets import SliceDataset, make_loader
from medsynth.data.demo import make_demo_cohort
from medsynth.data.fingerprint import Fingerprint, NormalizationSpec
from medsynth.data.layouts import load_subject, scan_dataset


def _parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, help="dataset folder (default: a fresh 2 mm demo cohort)")
    parser.add_argument("--cache", type=Path, help="cache folder (default: a temporary one)")
    parser.add_argument("--source", default="t1")
    parser.add_argument("--target", default="t2")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--context", type=int, default=1)
    parser.add_argument("--epochs", type=int, default=5)
    return parser.parse_args()


def _measure(args: argparse.Namespace, data: Path, cache: Path) -> None:
    modalities = [args.source, args.target]
    records = scan_dataset(data)
    start = time.perf_counter()
    specs = {m: NormalizationSpec.for_modality(m) for m in modalities}
    fingerprint = Fingerprint.compute(((r.id, load_subject(r, modalities)) for r in records), specs)
    cohort = prepare_cohort(records, modalities, fingerprint, cache, progress=False)
    prepared = time.perf_counter()
    dataset = SliceDataset(cohort, cohort.ids, [args.source], args.target, context=args.context)
    loaded = time.perf_counter()
    loader = make_loader(dataset, args.batch_size, shuffle=True, seed=0, drop_last=True)
    slices = 0
    for epoch in range(args.epochs):
        loader.set_epoch(epoch)
        for batch in loader:
            slices += batch["source"].shape[0]
    elapsed = time.perf_counter() - loaded
    print(
        f"subjects: {len(records)}  slices/epoch: {len(dataset)}  crop: {dataset.crop_size}  context: {args.context}"
    )
    print(f"fingerprint + cache: {prepared - start:.1f} s  load into RAM: {loaded - prepared:.2f} s")
    print(f"loader: {slices / elapsed:,.0f} slices/s (batch {args.batch_size}, {args.epochs} epochs)")


def main() -> None:
    args = _parse()
    print(machine.describe())
    with tempfile.TemporaryDirectory(prefix="medsynth-bench-") as scratch:
        data = args.data
        if data is None:
            data = Path(scratch) / "demo"
            make_demo_cohort(data, n_subjects=12, spacing_mm=2.0, seed=0, progress=False)
        _measure(args, data, args.cache or Path(scratch) / "cache")


if __name__ == "__main__":
    main()
