"""Planning: which series of a study feed the model, and the ``--dry-run`` table that shows it.

Planning reads nothing but the headers discovery already collected, so a dry run over a large export
costs seconds and tells the user which studies will convert and why the others will not.
"""

from __future__ import annotations

from dataclasses import dataclass

from .discovery import SeriesRecord, Study
from .naming import patient_key


@dataclass(frozen=True)
class Plan:
    """What the batch will do with a study: the inputs chosen, or why it cannot be converted."""

    study: Study
    inputs: dict[str, SeriesRecord]
    problem: str = ""


def plan_study(study: Study, sources: tuple[str, ...], target: str, fixed_sources: bool) -> Plan:
    """Choose one series per needed modality.

    A fixed task (``t1,t2->flair``) needs every source; a unified model takes whichever of its
    modalities the study has (never the target itself). When a study holds several series of one
    modality, the one with the most slices wins (ties: lowest SeriesInstanceUID), so reruns agree.
    """
    by_modality: dict[str, list[SeriesRecord]] = {}
    for series in study.series:
        if series.modality is not None and series.unsupported is None:
            by_modality.setdefault(series.modality, []).append(series)
    wanted = sources if fixed_sources else tuple(m for m in sources if m != target and m in by_modality)
    missing = [m for m in wanted if m not in by_modality] if fixed_sources else []
    if missing or not wanted:
        needed = ", ".join(missing or [m for m in sources if m != target])
        return Plan(study, {}, f"no usable series for {needed}")
    chosen = {m: min(by_modality[m], key=lambda s: (-len(s.files), s.series_uid)) for m in wanted}
    return Plan(study, chosen)


def render_plan(plans: list[Plan], target: str) -> str:
    """A plain-text table: each study, each of its series with the modality given and why.

    Series descriptions are shown (the user needs them to write ``--map`` rules) but cut to 40
    printable characters; patients appear only as their hashed key.
    """
    lines: list[str] = []
    for plan in plans:
        study = plan.study
        verdict = f"skip: {plan.problem}" if plan.problem else f"convert {'+'.join(plan.inputs)} -> {target}"
        lines.append(f"study {study.study_uid}  patient {patient_key(study.patient_id)}  [{verdict}]")
        chosen = {s.series_uid for s in plan.inputs.values()}
        for series in study.series:
            mark = "*" if series.series_uid in chosen else " "
            modality = series.modality or "-"
            why = series.unsupported or series.reason
            lines.append(
                f"  {mark} {modality:<6} {series.dicom_modality or '--':<3} {len(series.files):>4} files  "
                f"{_printable(series.description):<40}  {why}  ({series.series_uid})"
            )
    return "\n".join(lines)


def _printable(text: str, width: int = 40) -> str:
    clean = "".join(ch if ch.isprintable() else "?" for ch in text)
    return clean if len(clean) <= width else clean[: width - 1] + "…"
