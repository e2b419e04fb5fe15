"""Hounsfield-unit scoring of synthetic CTs inside ``medsynth evaluate``, for any method that made them.

The numbers follow the SynthRAD challenge's rules (:mod:`medsynth.ct_metrics` computes them) and answer
what a radiotherapy user asks: is the HU right (MAE, mean error, per tissue band), is the bone where it
should be (Dice and 95 % Hausdorff distance of the > 250 HU region), and would a proton beam stop in the
right place (the water-equivalent path length to every voxel inside the brain, eight beams in the axial
plane). Where is the body: the input's foreground joined with what the real CT shows of the head (its
> -500 HU region, holes filled), so a synthetic CT that forgets the scalp or the skull's outer table is
scored there too.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

import numpy as np

from .ct_metrics import RangeReference, body_mask, ct_metrics, intracranial_mask
from .viz import ct_figure

#: The columns of the printed HU table, in order, with their headers and formats.
CT_TABLE: tuple[tuple[str, str, str], ...] = (
    ("mae_hu", "MAE HU", "{:.1f}"),
    ("me_hu", "ME HU", "{:+.1f}"),
    ("psnr_hu", "PSNR dB", "{:.2f}"),
    ("ms_ssim", "MS-SSIM", "{:.3f}"),
    ("bone_dice", "bone Dice", "{:.3f}"),
    ("bone_hd95_mm", "bone HD95 mm", "{:.2f}"),
    ("range_error_mean_mm", "range err mm", "{:.2f}"),
    ("range_error_p95_mm", "p95 mm", "{:.2f}"),
    ("range_error_p95_pct", "p95 %", "{:.2f}"),
)


class _Case(Protocol):
    subject: str
    method: str
    target: str
    inputs: tuple[str, ...]
    metrics: dict[str, Any]


class CTScoring:
    """The HU metrics of one subject's real CT, computed for as many candidate CTs as there are methods.

    The body and brain masks and the real CT's proton path lengths depend only on the real CT and the
    inputs, so they are found once per subject; ``score`` then takes a candidate in HU (canonical RAS,
    the real CT's grid) and, with ``figure``, draws it from the same path lengths.
    """

    def __init__(self, real_hu: np.ndarray, input_mask: np.ndarray, spacing: tuple[float, ...]) -> None:
        self.real = np.asarray(real_hu, dtype=np.float32)
        self.body = np.asarray(input_mask, dtype=bool) | body_mask(self.real)
        self.brain = intracranial_mask(self.real)
        self.spacing = tuple(float(s) for s in spacing)
        self.range = RangeReference(self.real, self.brain, self.spacing)

    def score(
        self, synthetic_hu: np.ndarray, figure: tuple[tuple[str, np.ndarray], Path] | None = None
    ) -> dict[str, Any]:
        """The metrics of one candidate; ``figure=((name, MR), path)`` also writes its PNG."""
        metrics = ct_metrics(
            synthetic_hu, self.real, mask=self.body, spacing=self.spacing, reference=self.range
        )
        metrics["body_voxels"] = int(self.body.sum())
        metrics["brain_voxels"] = int(self.brain.sum())
        if figure is not None:
            source, path = figure
            errors = self.range.error_map(self.range.differences(synthetic_hu))
            ct_figure(source, synthetic_hu, self.real, errors, path, mask=self.body, spacing=self.spacing)
        return metrics


def render_ct_table(cases: list[Any]) -> str:
    """Mean ± std over subjects of the HU metrics, one line per method (CT targets only)."""
    groups: dict[tuple[str, str], list[_Case]] = {}
    for case in cases:
        if case.target == "ct" and "mae_hu" in case.metrics:
            groups.setdefault((case.method, "+".join(case.inputs) + " -> ct"), []).append(case)
    header = f"{'method':<15} {'inputs -> target':<16} {'n':>3}  " + "  ".join(
        f"{title:>17}" for _, title, _ in CT_TABLE
    )
    lines = [
        "held-out metrics in Hounsfield units inside the body (inputs' foreground + the real CT's head); "
        "PSNR over [-1024, 3071] HU; bone = real/synthetic > 250 HU; proton range error = water-equivalent "
        "depth to each brain voxel, 8 axial beams",
        header,
        "-" * len(header),
    ]
    for (method, direction), members in groups.items():
        cells = []
        for key, _, fmt in CT_TABLE:
            values = np.array([m.metrics.get(key, np.nan) for m in members], dtype=np.float64)
            finite = values[np.isfinite(values)]
            cells.append(
                f"{fmt.format(finite.mean())} ± {fmt.format(finite.std()).lstrip('+')}".rjust(17)
                if finite.size
                else "-".rjust(17)
            )
        lines.append(f"{method:<15} {direction:<16} {len(members):>3}  " + "  ".join(cells))
    return "\n".join(lines)
