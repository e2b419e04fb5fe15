"""Throughput of ``medsynth convert``: studies per minute on the demo cohort exported as DICOM.

Without ``--checkpoint`` the model is an identity predictor, so the figure is the pipeline's own cost
(discovery, DICOM decoding, NIfTI and derived-DICOM writing); with one, it is the end-to-end rate.
Discovery (headers only) is timed separately because it is what a ``--dry-run`` costs.

    python benchmarks/convert.py                                  # 6 demo subjects at 2 mm, identity model
    python benchmarks/convert.py --subjects 12 --spacing 1 --checkpoint run/checkpoint_best.pt --workers 2
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import machine

from medsynth.convert import discover, run_convert
from medsynth.data.demo import make_demo_cohort
from medsynth.io.volume import Volume


class IdentityPredictor:
    """A T1 -> T2 'model' that returns its input, to time everything but the network."""

    required_modalities = ("t1",)
    target = "t2"

    def predict(self, inputs: dict[str, Volume], target: str | None = None) -> Volume:
        return inputs["t1"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--subjects", type=int, default=6)
    parser.add_argument("--spacing", type=float, default=2.0, help="demo voxel size in mm")
    parser.add_argument("--checkpoint", help="a real checkpoint (default: identity predictor)")
    parser.add_argument("--format", dest="fmt", default="both", choices=("nifti", "dicom", "both"))
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args()
    print(machine.describe())

    with tempfile.TemporaryDirectory(prefix="medsynth-bench-") as temp:
        cohort = Path(temp) / "demo"
        make_demo_cohort(
            cohort, n_subjects=args.subjects, spacing_mm=args.spacing, dicom=True, progress=False
        )
        export = cohort / "dicom"
        files = sum(1 for p in export.rglob("*") if p.is_file())

        start = time.perf_counter()
        found = discover(export)
        discovery_s = time.perf_counter() - start

        start = time.perf_counter()
        report = run_convert(
            export,
            args.checkpoint or IdentityPredictor(),
            Path(temp) / "out",
            fmt=args.fmt,
            workers=args.workers,
        )
        convert_s = time.perf_counter() - start

    model = args.checkpoint or "identity predictor"
    print(f"export: {len(found.studies)} studies, {files} files ({args.spacing:g} mm demo)")
    print(f"discovery: {discovery_s:.2f} s ({files / discovery_s:.0f} files/s)")
    print(f"convert ({model}, --format {args.fmt}, --workers {args.workers}): {report.summary()}")
    print(f"throughput: {report.count('converted') / convert_s * 60:.1f} studies/min ({convert_s:.1f} s)")


if __name__ == "__main__":
    main()
