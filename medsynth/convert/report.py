"""The batch report: one row per study, written as ``report.csv`` and ``report.json``.

Research IT reads the CSV in a spreadsheet and scripts read the JSON; both hold the same rows. A row
names the study by UIDs and hashes only (no patient name, no free-text tags), so the report can be
shared with whoever debugs a failed batch.

``--shard K/N`` runs each write ``report-shard-K-of-N.*``; :func:`merge_reports` makes the one report of
the whole export from them, with an ``unreported`` row for every study no shard has reported yet.
"""

from __future__ import annotations

import csv
import io
import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..io.atomic import atomic_write_text

if TYPE_CHECKING:
    from .plan import Plan

#: What ``--format`` may ask for per study.
FORMATS: tuple[str, ...] = ("nifti", "dicom", "both")

#: Row statuses, in the order the summary line lists them. ``unreported`` appears only in merged reports.
STATUSES: tuple[str, ...] = ("converted", "planned", "skipped", "failed", "unreported")

#: Columns of ``report.csv``.
_CSV_COLUMNS = (
    "study_uid", "patient_key", "status", "reason", "seconds", "inputs", "outputs", "ood", "checkpoint",
    "precision",
)  # fmt: skip

#: The reason of a study skipped because an earlier run converted it.
ALREADY_CONVERTED = "already converted (use --overwrite to redo)"

#: The reason of an ``unreported`` study whose shard's report exists but cannot be read.
UNREADABLE_REPORT = "its shard's report cannot be read"

_SHARD_REPORT = re.compile(r"^report-shard-(?P<index>[0-9]+)-of-(?P<count>[0-9]+)\.json$")


@dataclass
class StudyResult:
    """What happened to one study."""

    study_uid: str
    patient_key: str
    status: str  # one of STATUSES
    reason: str = ""
    seconds: float = 0.0
    inputs: dict[str, str] = field(default_factory=dict)  # modality -> series UID used
    outputs: list[str] = field(default_factory=list)  # paths relative to the output folder
    ood: dict[str, Any] = field(default_factory=dict)  # the out-of-distribution check (model/ood.py)
    checkpoint: str = ""  # ``name sha256:...`` of the model that made the outputs (also for earlier runs')
    #: What the model computed in (``asked``, ``precision``, ``channels_last``, ``reason``), from the sidecar.
    precision: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"status must be one of {STATUSES}, got {self.status!r}")


@dataclass
class ConvertReport:
    """Every study's result plus the notes discovery made about files it could not use."""

    studies: list[StudyResult] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)
    plans: list[Plan] = field(default_factory=list, repr=False)  # for the --dry-run table; not serialised

    def count(self, status: str) -> int:
        return sum(result.status == status for result in self.studies)

    @property
    def failed(self) -> bool:
        return self.count("failed") > 0

    def summary(self) -> str:
        """One line such as ``3 converted, 1 skipped, 0 failed (4 studies)``."""
        parts = [f"{self.count(s)} {s}" for s in STATUSES if self.count(s) or s in ("converted", "failed")]
        return ", ".join(parts) + f" ({len(self.studies)} studies)"

    def to_csv(self) -> str:
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(_CSV_COLUMNS)
        for r in self.studies:
            inputs = ";".join(f"{m}={uid}" for m, uid in sorted(r.inputs.items()))
            writer.writerow(
                [
                    r.study_uid,
                    r.patient_key,
                    r.status,
                    r.reason,
                    f"{r.seconds:.2f}",
                    inputs,
                    ";".join(r.outputs),
                    _ood_cell(r.ood),
                    r.checkpoint,
                    r.precision.get("precision", ""),
                ]
            )
        return buffer.getvalue()

    @property
    def unreported(self) -> list[str]:
        """Study UIDs of the export that no shard report holds (merged reports only)."""
        return [r.study_uid for r in self.studies if r.status == "unreported"]

    def to_json(self) -> str:
        payload = {
            "summary": {s: self.count(s) for s in STATUSES},
            "settings": self.settings,
            "studies": [asdict(r) for r in self.studies],
            "unreported": self.unreported,
            "notes": self.notes,
        }
        return json.dumps(payload, indent=2) + "\n"

    def write(self, out: Path, suffix: str = "") -> tuple[Path, Path]:
        """Write ``report<suffix>.csv`` and ``report<suffix>.json`` atomically into ``out``."""
        return (
            atomic_write_text(out / f"report{suffix}.csv", self.to_csv()),
            atomic_write_text(out / f"report{suffix}.json", self.to_json()),
        )


def report_suffix(index: int, count: int) -> str:
    """``""`` for an unsharded run, else ``-shard-K-of-N``: shards share one output folder.

    >>> report_suffix(2, 3)
    '-shard-2-of-3'
    """
    return "" if count == 1 else f"-shard-{index}-of-{count}"


def now_iso() -> str:
    """UTC time to the microsecond; merged reports let the later of two rows win by it."""
    return datetime.now(timezone.utc).isoformat(timespec="microseconds")


@dataclass(frozen=True)
class ShardReport:
    """One ``report-shard-K-of-N.json`` as read back for merging."""

    name: str
    index: int
    count: int
    finished: str  # ISO time the run wrote it (the file's mtime for reports without one)
    rows: tuple[StudyResult, ...]
    notes: tuple[str, ...]
    settings: dict[str, Any]


@dataclass(frozen=True)
class UnreadableShardReport:
    """A ``report-shard-K-of-N.json`` that exists but cannot be read (garbled, truncated, not a report)."""

    name: str
    index: int
    count: int
    reason: str

    @property
    def shard(self) -> str:
        return f"{self.index}/{self.count}"


def read_shard_reports(
    out: str | Path,
) -> tuple[list[ShardReport], list[str], list[UnreadableShardReport]]:
    """Every readable ``report-shard-*-of-*.json`` in ``out``, a note for each unreadable one, and those.

    An unreadable report is kept apart so the merge can say that its shard's studies are unreported
    because the report is damaged, not because the shard has not run.
    """
    out = Path(out)
    reports: list[ShardReport] = []
    notes: list[str] = []
    unreadable: list[UnreadableShardReport] = []
    names = {f.name for f in fields(StudyResult)}
    for path in sorted(out.glob("report-shard-*-of-*.json")):
        match = _SHARD_REPORT.match(path.name)
        if match is None:
            continue
        try:
            payload = json.loads(path.read_text(encoding="utf-8"))
            rows = tuple(
                StudyResult(**{k: v for k, v in row.items() if k in names}) for row in payload["studies"]
            )
            settings = dict(payload.get("settings", {}))
            mtime = datetime.fromtimestamp(path.stat().st_mtime, timezone.utc).isoformat(
                timespec="microseconds"
            )
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            reason = f"{type(exc).__name__}: {' '.join(str(exc).split())[:200]}"
            notes.append(f"shard report {path.name} cannot be read ({reason}); ignored")
            index, count = int(match["index"]), int(match["count"])
            if 1 <= index <= count:
                unreadable.append(UnreadableShardReport(path.name, index, count, reason))
            continue
        reports.append(
            ShardReport(
                name=path.name,
                index=int(match["index"]),
                count=int(match["count"]),
                finished=str(settings.get("finished") or mtime),
                rows=rows,
                notes=tuple(payload.get("notes", [])),
                settings=settings,
            )
        )
    return reports, notes, unreadable


def _rank(row: StudyResult, finished: str) -> tuple[int, int, str]:
    """A done row beats one that is not; a conversion beats 'already converted'; then the later one."""
    done = row.status == "converted" or (row.status == "skipped" and row.reason == ALREADY_CONVERTED)
    return (int(done), int(row.status == "converted"), finished)


def merge_reports(
    reports: Sequence[ShardReport],
    export_studies: Iterable[tuple[str, str, list[str]]],
    notes: Sequence[str] = (),
    unreadable: Sequence[UnreadableShardReport] = (),
) -> ConvertReport:
    """One report of the whole export from the shards' reports.

    ``export_studies`` lists ``(study UID, patient key, owning shards)`` for every study discovery
    finds now; a study no report holds becomes an ``unreported`` row naming the shards that own it,
    or, when the report of its shard exists but is ``unreadable``, saying so (settings
    ``reports_unreadable`` counts them per report).
    When several reports hold one study, the row kept is the done one (converted, or skipped as
    already converted), else the later, and a note says which reports disagreed.

    Example::

        reports, problems = read_shard_reports("synth/")
        merged = merge_reports(reports, [("1.2.3", "p-ab12", ["2/3"])], problems)
    """
    merged_notes = list(notes)
    seen_notes = set(merged_notes)
    for report in reports:
        for note in report.notes:  # every shard discovered the whole export: the same notes, once
            if note not in seen_notes:
                seen_notes.add(note)
                merged_notes.append(note)
    candidates: dict[str, list[tuple[StudyResult, ShardReport]]] = {}
    for report in sorted(reports, key=lambda r: (r.finished, r.name)):
        for row in report.rows:
            candidates.setdefault(row.study_uid, []).append((row, report))
    rows: dict[str, StudyResult] = {}
    for uid, found in candidates.items():
        best_row, best_report = max(found, key=lambda pair: _rank(pair[0], pair[1].finished))
        rows[uid] = best_row
        if len(found) > 1:
            seen = ", ".join(f"{row.status} in {report.name}" for row, report in found)
            merged_notes.append(
                f"study {uid} is in {len(found)} shard reports ({seen}); kept the {best_row.status} row "
                f"of {best_report.name}"
            )
    export_uids: set[str] = set()
    unreported_shards: set[str] = set()
    damaged = {u.shard: u for u in unreadable}
    damaged_counts: dict[str, int] = {}
    for uid, key, owners in export_studies:
        export_uids.add(uid)
        if uid in rows:
            continue
        bad = next((damaged[o] for o in owners if o in damaged), None)
        if bad is not None:
            damaged_counts[bad.name] = damaged_counts.get(bad.name, 0) + 1
            reason = (
                f"{UNREADABLE_REPORT}: {bad.name} ({bad.reason}); run shard {bad.shard} again to report it"
            )
        else:
            unreported_shards.update(owners)
            reason = f"no shard has reported it yet (owned by shard {', '.join(owners)})" if owners else ""
        rows[uid] = StudyResult(uid, key, "unreported", reason or "no shard has reported it yet")
    gone = sorted(set(rows) - export_uids)
    if gone:
        merged_notes.append(
            f"{len(gone)} reported studies are no longer in the export: {', '.join(gone[:10])}"
        )
    settings: dict[str, Any] = {
        "merged_from": [r.name for r in reports],
        "shards_reported": sorted({f"{r.index}/{r.count}" for r in reports}, key=_shard_order),
        "shards_unreported": sorted(unreported_shards, key=_shard_order),
        "reports_unreadable": [
            {"name": u.name, "shard": u.shard, "reason": u.reason, "studies": damaged_counts.get(u.name, 0)}
            for u in unreadable
        ],
        "finished": now_iso(),
    }
    for key in ("target", "format", "medsynth_version"):
        values = {str(r.settings.get(key)) for r in reports if r.settings.get(key) is not None}
        if len(values) == 1:
            settings[key] = values.pop()
        elif values:
            merged_notes.append(f"shard reports disagree on {key}: {', '.join(sorted(values))}")
    return ConvertReport(
        studies=sorted(rows.values(), key=lambda r: r.study_uid), notes=merged_notes, settings=settings
    )


def _shard_order(text: str) -> tuple[int, int]:
    index, _, count = text.partition("/")
    return (int(count), int(index))


def _ood_cell(ood: dict[str, Any]) -> str:
    """``ok``, ``skipped``, or ``out_of_distribution: reason; reason`` (empty when not checked)."""
    if not ood:
        return ""
    reasons = ood.get("reasons") or []
    return f"{ood.get('status')}: " + "; ".join(reasons) if reasons else str(ood.get("status"))
