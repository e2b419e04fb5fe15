"""How far ``medsynth data register`` leaves a misregistered demo cohort from the truth, in mm over the brain.

The demo records each subject's true motion (``medsynth data demo --misregister MM,DEG``: participants.tsv
``misregister_*``, dataset_description.json the rotation centre), so the recovered transforms can be
checked point by point. For every brain voxel ``x`` of the reference (T1w) grid, the truth puts the moved
anatomy at ``M x`` and the registration looks for it at ``T x`` (``T`` from the saved ``.tfm``, as a
displacement field on the reference grid, so rigid, affine and B-spline transforms are measured alike):
the residual is ``|T x - M x|`` (= ``|M^-1 T x - x|``, M being rigid). The brain is the subject's
simulated grey + white matter (fraction >= 0.5), rebuilt from the demo's seed.

Each registered image is also compared with the aligned cohort's (same seed, no ``--misregister``):
the correlation of the two inside the brain, for the misregistered input and for the registered copy.

    medsynth data demo --out /tmp/aligned --subjects 12 --spacing 2
    medsynth data demo --out /tmp/misreg24 --subjects 12 --spacing 2 --misregister 4,4
    medsynth data register /tmp/misreg24 --out /tmp/reg24
    python benchmarks/registration_accuracy.py --registered /tmp/reg24 --aligned /tmp/aligned
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from medsynth.data import demo
from medsynth.data.register import transform_path
from medsynth.io.readers import read_volume
from medsynth.io.volume import LPS_TO_RAS, Volume

SUFFIX = {"t1": "T1w", "t2": "T2w", "pd": "PDw", "flair": "FLAIR", "ct": "CT"}


def true_motions(cohort: Path) -> tuple[dict[str, demo.Misregistration], dict[str, object]]:
    """Each subject's recorded motion and the cohort's demo settings (seed, spacing, centre)."""
    info = json.loads((cohort / "dataset_description.json").read_text())["MedsynthDemo"]
    centre = tuple(info["misregistration"]["centre_mm"])
    lines = (cohort / "participants.tsv").read_text().splitlines()
    header = lines[0].split("\t")
    motions = {}
    for line in lines[1:]:
        row = dict(zip(header, line.split("\t"), strict=True))
        motions[row["participant_id"]] = demo.Misregistration(
            tuple(float(row[f"misregister_t{a}_mm"]) for a in "xyz"),  # type: ignore[arg-type]
            tuple(float(row[f"misregister_axis_{a}"]) for a in "xyz"),  # type: ignore[arg-type]
            float(row["misregister_rotation_deg"]),
            centre,  # type: ignore[arg-type]
        )
    return motions, info


def brain_mask(index: int, spacing_mm: float, seed: int) -> np.ndarray:
    """Subject ``index``'s grey + white matter (fraction >= 0.5), from the demo's own draws."""
    base = demo.anatomy(spacing_mm)
    coords, _ = demo.warp_coordinates(base, np.random.default_rng((seed, index)))
    fractions = demo.warp(base.fractions[[demo.TISSUE_INDEX["gm"], demo.TISSUE_INDEX["wm"]]], coords)
    return fractions.sum(axis=0) >= 0.5


def residual_mm(tfm: Path, reference: Volume, motion: demo.Misregistration, brain: np.ndarray) -> np.ndarray:
    """``|T x - M x|`` in mm for every brain voxel ``x`` of the reference grid."""
    import SimpleITK as sitk

    from medsynth.io.geometry import volume_to_sitk

    grid = volume_to_sitk(reference)
    field = sitk.TransformToDisplacementField(
        sitk.ReadTransform(str(tfm)), sitk.sitkVectorFloat64, grid.GetSize(), grid.GetOrigin(),
        grid.GetSpacing(), grid.GetDirection(),
    )  # fmt: skip
    displacement = sitk.GetArrayFromImage(field).transpose(2, 1, 0, 3)[brain] * np.diag(LPS_TO_RAS)[:3]
    ijk = np.argwhere(brain)
    world = ijk @ reference.affine[:3, :3].T + reference.affine[:3, 3]
    truth = world @ motion.matrix()[:3, :3].T + motion.matrix()[:3, 3]
    return np.linalg.norm(world + displacement - truth, axis=1)


def correlation(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a.ravel(), b.ravel())[0, 1])


def measure(registered: Path, aligned: Path) -> dict[str, list[dict[str, float]]]:
    """Per modality, one entry per subject: mean and max residual (mm), correlation before and after."""
    motions, info = true_motions(registered)
    source = Path(json.loads((registered / "registration" / "args.json").read_text())["source"])
    reference = info["misregistration"]["reference"]
    results: dict[str, list[dict[str, float]]] = {}
    for index, (subject, motion) in enumerate(motions.items()):
        if not (registered / "registration" / f"{subject}.json").exists():
            continue  # failed, or not registered yet: the subjects done are measured
        brain = brain_mask(index, float(info["spacing_mm"]), int(info["seed"]))
        ref = read_volume(registered / subject / "anat" / f"{subject}_{SUFFIX[reference]}.nii.gz")
        for modality, suffix in SUFFIX.items():
            image = registered / subject / "anat" / f"{subject}_{suffix}.nii.gz"
            if modality == reference or not image.exists():
                continue
            residual = residual_mm(transform_path(image, reference), ref, motion, brain)
            truth = read_volume(aligned / subject / "anat" / image.name).array[brain]
            results.setdefault(modality, []).append({
                "mean_mm": float(residual.mean()),
                "max_mm": float(residual.max()),
                "r_before": correlation(read_volume(source / subject / "anat" / image.name).array[brain], truth),
                "r_after": correlation(read_volume(image).array[brain], truth),
            })  # fmt: skip
    return results


def render(results: dict[str, list[dict[str, float]]]) -> str:
    lines = [
        "| modality | mean residual (mm) | worst subject's mean (mm) | max (mm) | r before | r after |",
        "|---|---|---|---|---|---|",
    ]
    for modality, rows in results.items():
        means = [r["mean_mm"] for r in rows]
        lines.append(
            f"| {SUFFIX[modality]} | {np.mean(means):.3f} | {max(means):.3f} | {max(r['max_mm'] for r in rows):.2f} "
            f"| {np.mean([r['r_before'] for r in rows]):.3f} | {np.mean([r['r_after'] for r in rows]):.3f} |"
        )
    everything = [r["mean_mm"] for rows in results.values() for r in rows]
    lines.append(f"\nall {len(everything)} pairs: mean residual {np.mean(everything):.3f} mm over the brain")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--registered", type=Path, required=True, help="output of medsynth data register")
    parser.add_argument(
        "--aligned", type=Path, required=True, help="the demo cohort of the same seed, aligned"
    )
    args = parser.parse_args()
    print(render(measure(args.registered, args.aligned)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
