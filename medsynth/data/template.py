"""The template of ``medsynth data register --template``: one common pose for every image of a dataset.

Unpaired training never looks at a subject's pair, but it does learn what each domain looks
like, pose included: when one modality's heads sit where the scanner put them and the other's are turned
by up to 12 degrees, the critic accepts turned heads and the generators are free to turn them (measured
in the unpaired study, docs/unpaired_study.md). The field's answer is to bring every image, on its own,
into one template space (MNI152 for brains) before learning; no image is ever registered onto its pair.

A template is a file in any format medsynth reads, or ``mni152``: nilearn's MNI152 2009 T1 template
(1 mm, brain only), which nilearn ships as a package file (nothing is downloaded). Mutual information
registers any contrast (a T2w, a CT) onto it.

Each subject's images are written on the template's field of view at the subject's finest voxel size
(:func:`template_grid`), so a 2 mm dataset stays 2 mm on a 1 mm template and no image loses resolution.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..errors import DataError
from ..io.geometry import resample_to
from ..io.readers import read_volume
from ..io.volume import Volume
from .layouts import constant_problem

#: ``--template`` value naming nilearn's MNI152 2009 T1 template.
MNI152 = "mni152"


def load_template(template: str | Path) -> Volume:
    """The template volume: ``mni152`` or an image file.

    Raises:
        MedsynthError: the file cannot be read (a one-line error naming it).
        DataError: the template is constant (nothing to register onto).
    """
    if str(template).lower() == MNI152:
        from nilearn import datasets  # imported here: nilearn's import is slow

        image = datasets.load_mni152_template(resolution=1)
        volume = Volume(np.asarray(image.dataobj, dtype=np.float32), image.affine, {"path": MNI152})
    else:
        volume = read_volume(Path(template))
    problem = constant_problem(volume)
    if problem:
        raise DataError(f"the template {problem}", volume.source)
    return volume


def finest_spacing(volumes: Sequence[Volume]) -> tuple[float, float, float]:
    """The smallest voxel size along each axis over ``volumes`` (a subject's images)."""
    return tuple(float(s) for s in np.min([v.spacing for v in volumes], axis=0))  # type: ignore[return-value]


def template_grid(template: Volume, spacing: Sequence[float]) -> Volume:
    """The template's field of view and axes at voxel size ``spacing``: an empty volume to resample onto.

    Voxel (0, 0, 0) stays centred where the template's is, and each axis gets as many voxels as it takes
    to reach the template's last one (so MNI152 at 1 mm becomes nilearn's own 2 mm grid, 99 x 117 x 95).
    """
    old = np.asarray(template.spacing)
    new = np.asarray(spacing, dtype=np.float64)
    shape = 1 + np.ceil((np.asarray(template.shape) - 1) * old / new - 1e-6).astype(int)
    affine = template.affine.copy()
    affine[:3, :3] = template.direction * new
    return Volume(np.zeros(tuple(shape), dtype=np.float32), affine, {"path": template.source})


def template_on_grid(template: Volume, spacing: Sequence[float]) -> Volume:
    """The template resampled onto :func:`template_grid` (what each image is registered onto)."""
    return resample_to(template, template_grid(template, spacing))
