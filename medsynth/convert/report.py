"""The batch report: one row per study, written as ``report.csv`` and ``report.json``.

Research IT reads the CSV in a spreadsheet and scripts read the JSON; both hold the same rows. A row
names the study by UIDs and hashes only (no patient name, no free-text tags), so the report can be
shared with whoever debugs a failed batch.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..io.atomic import atomic_write_text

if TYPE_CHECKING:
    from .plan import Plan

#: Row statuses, in the order the summary line lists them.
STATUSES: tuple[str, ...] = ("converted", "planned", "skipped", "failed")


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
        writer.writerow(["study_uid", "patient_key", "status", "reason", "seconds", "inputs", "outputs"])
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
                ]
            )
        return buffer.getvalue()

    def to_json(self) -> str:
        payload = {
            "summary": {s: self.count(s) for s in STATUSES},
            "settings": self.settings,
            "studies": [asdict(r) for r in self.studies],
            "notes": self.notes,
        }
        return json.dumps(payload, indent=2) + "\n"

    def write(self, out: Path, suffix: str = "") -> tuple[Path, Path]:
        """Write ``report<suffix>.csv`` and ``report<suffix>.json`` atomically into ``out``."""
        return (
            atomic_write_text(out / f"report{suffix}.csv", self.to_csv()),
            atomic_write_text(out / f"report{suffix}.json", self.to_json()),
        )
