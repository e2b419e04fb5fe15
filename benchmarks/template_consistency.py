"""Whether ``medsynth data register --template`` puts a subject's images in one pose, in mm over the brain.

Template mode registers every image onto the template on its own, never onto its subject's other
images. If it works, the two poses it gives a subject's T1w and T2w differ by exactly the motion between
them, which the misregistered demo cohort records (``medsynth data demo --misregister MM,DEG``). For every
brain voxel ``p`` of the template (MNI152 > 0.2, on the copy's grid), the T1w's transform finds its point
``A p`` in the T1w and the T2w's finds ``B p`` in the T2w; the demo moved the T2w's anatomy by ``M``, so
``B p`` should be ``M A p``. The residual ``|B p - M A p|`` is the pose error that unpaired training on the
copy would see between the two domains (0 for a perfect template registration, whatever the template).

    medsynth data demo --out /tmp/misreg1212 --subjects 12 --spacing 2 --misregister 12,12
    medsynth data register /tmp/misreg1212 --out /tmp/mni --template mni152 --modalities t1,t2
    python benchmarks/template_consistency.py --cohort /tmp/misreg1212 --copy /tmp/mni
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from registration_accuracy import true_motions  # the demo's recorded motions, read the same way

from medsynth.data.register import TEMPLATE, transform_path
from medsynth.data.template import load_template, template_on_grid
from medsynth.io.readers import read_volume
from medsynth.io.volume import LPS_TO_RAS


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cohort", type=Path, required=True, help="the misregistered demo cohort")
    parser.add_argument("--copy", type=Path, required=True, help="its copy made with --template mni152")
    parser.add_argument("--every", type=int, default=20, help="use every n-th brain voxel (default 20)")
    args = parser.parse_args()
    import SimpleITK as sitk

    motions, _ = true_motions(args.cohort)
    flip = np.diag(LPS_TO_RAS)[:3]
    template = load_template("mni152")
    rows = []
    for subject, motion in sorted(motions.items()):
        anat = args.copy / subject / "anat"
        t1 = anat / f"{subject}_T1w.nii.gz"
        grid = template_on_grid(template, read_volume(t1).spacing)
        brain = np.argwhere(grid.array > 0.2)[:: args.every]
        points = (brain @ grid.affine[:3, :3].T + grid.affine[:3, 3]) * flip  # RAS -> LPS
        to_t1 = sitk.ReadTransform(str(transform_path(t1, TEMPLATE)))
        to_t2 = sitk.ReadTransform(str(transform_path(anat / f"{subject}_T2w.nii.gz", TEMPLATE)))
        in_t1 = np.array([to_t1.TransformPoint(tuple(p)) for p in points]) * flip  # LPS -> RAS
        moved = (in_t1 @ motion.matrix()[:3, :3].T + motion.matrix()[:3, 3]) * flip
        in_t2 = np.array([to_t2.TransformPoint(tuple(p)) for p in points])
        residual = np.linalg.norm(in_t2 - moved, axis=1)
        rows.append((subject, motion.shift_mm, abs(motion.angle_deg), residual.mean(), residual.max()))
    print("| subject | T2w moved mm | deg | pose residual mean mm | max mm |")
    print("|---|---|---|---|---|")
    for subject, shift, angle, mean, worst in rows:
        print(f"| {subject} | {shift:.1f} | {angle:.1f} | {mean:.2f} | {worst:.2f} |")
    means = [row[3] for row in rows]
    print(f"| all {len(rows)} | | | {np.mean(means):.2f} ({min(means):.2f}-{max(means):.2f}) | "
          f"{max(row[4] for row in rows):.2f} |")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
