"""Bring the IXI dataset (T1, T2, PD) into the BIDS-like layout medsynth reads.

    python data_prep/ixi.py ixi/ --check                     # validate the extracted download
    python data_prep/ixi.py ixi/ --out data/ixi              # symlink into sub-*/anat/
    python data_prep/ixi.py ixi/ --out data/ixi --register   # also register T1 onto the T2/PD grid

IXI's T2 and PD come from one dual-echo acquisition and share a grid; its T1 is a separate acquisition
on another grid and is *not* co-registered with them. Translating T1 <-> T2/PD therefore needs a
registration first: ``--register`` does a rigid (6 degrees of freedom) mutual-information registration
of each T1 onto its T2 with SimpleITK and writes the resampled T1 (a new file; the source is untouched).
"""

from __future__ import annotations

import sys
from pathlib import Path

import SimpleITK as sitk
from _common import check, nifti_extension, parser, place, run, scan_download, write_participants

from medsynth.data.layouts import bids_path
from medsynth.io.atomic import atomic_path

MODALITIES = ("t2", "pd", "t1")  # T2 first: its grid is the reference the T1 is registered to


def register_rigid(moving: Path, fixed: Path, out: Path) -> float:
    """Rigidly register ``moving`` onto ``fixed`` and write it resampled on ``fixed``'s grid.

    Mattes mutual information, because T1 and T2 contrasts are not linearly related; a moments-based
    initialisation and a three-level pyramid make it robust to the large offsets between IXI's T1 and T2
    headers. Returns the final metric value (more negative is better).
    """
    fixed_image = sitk.ReadImage(str(fixed), sitk.sitkFloat32)
    moving_image = sitk.ReadImage(str(moving), sitk.sitkFloat32)
    registration = sitk.ImageRegistrationMethod()
    registration.SetMetricAsMattesMutualInformation(numberOfHistogramBins=32)
    registration.SetMetricSamplingStrategy(registration.REGULAR)
    # A fixed seed: SimpleITK reads seed 0 as 'wall clock', which made runs (and a test) differ.
    registration.SetMetricSamplingPercentage(0.25, seed=42)
    registration.SetInterpolator(sitk.sitkLinear)
    registration.SetOptimizerAsRegularStepGradientDescent(
        learningRate=2.0, minStep=1e-3, numberOfIterations=200, relaxationFactor=0.5
    )
    registration.SetOptimizerScalesFromPhysicalShift()
    registration.SetShrinkFactorsPerLevel([4, 2, 1])
    registration.SetSmoothingSigmasPerLevel([2.0, 1.0, 0.0])
    registration.SmoothingSigmasAreSpecifiedInPhysicalUnitsOn()
    initial = sitk.CenteredTransformInitializer(
        fixed_image, moving_image, sitk.Euler3DTransform(), sitk.CenteredTransformInitializerFilter.MOMENTS
    )
    registration.SetInitialTransform(initial, inPlace=False)
    transform = registration.Execute(fixed_image, moving_image)
    background = float(sitk.GetArrayViewFromImage(moving_image).min())
    resampled = sitk.Resample(
        moving_image, fixed_image, transform, sitk.sitkLinear, background, sitk.sitkFloat32
    )
    with atomic_path(out) as temp:
        sitk.WriteImage(resampled, str(temp))
    return registration.GetMetricValue()


def main(argv: list[str] | None = None) -> int:
    cli = parser(__doc__.splitlines()[0])
    cli.add_argument(
        "--register", action="store_true", help="rigidly register each T1 onto its T2 (SimpleITK)"
    )
    args = cli.parse_args(argv)
    if args.check:
        return run(lambda: check(args.source, MODALITIES))
    if args.out is None:
        cli.error("give --out DST to reorganise, or --check to validate")
    return run(lambda: reorganise(args.source, args.out, copy=args.copy, register=args.register))


def reorganise(source: Path, out: Path, *, copy: bool, register: bool) -> int:
    """Place every subject's T1/T2/PD under ``out``; with ``register``, T1 is registered, not linked."""
    records = scan_download(source, "ixi")
    incomplete = []
    for record in records:
        if set(MODALITIES) - set(record.paths):
            incomplete.append(record.id)
        fixed = record.paths.get("t2") or record.paths.get("pd")  # PD shares T2's grid
        for modality, path in record.paths.items():
            if register and modality == "t1" and fixed is not None:
                destination = bids_path(out, record.id, "t1")
                if not destination.exists():  # written atomically, so an existing one is complete
                    register_rigid(path, fixed, destination)
            else:
                place(path, bids_path(out, record.id, modality, nifti_extension(path)), copy=copy)
    write_participants(out, records)
    print(f"{len(records)} IXI subjects written to {out}")
    if incomplete:
        print(f"{len(incomplete)} lack one of T1/T2/PD (IXI is incomplete): {', '.join(incomplete)}")
    if not register:
        print("IXI T1 is not registered to T2/PD: rerun with --register before training T1 <-> T2/PD")
    return 0


if __name__ == "__main__":
    sys.exit(main())
