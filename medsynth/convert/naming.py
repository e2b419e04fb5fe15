"""Output names derived from UIDs and hashes only.

Tag text (PatientName, SeriesDescription, even PatientID) is free text a scanner operator typed or an
attacker crafted: ``../../etc`` in a description must not become a path, and a patient's medical
record number must not appear in a folder name or a log. So folders are named by a hash of the
patient ID and by the study UID when it is a well-formed UID (digits and dots), else by its hash.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")


def short_hash(text: str, length: int = 16) -> str:
    """Stable hex digest of ``text`` (SHA-256, truncated): same input, same name, on any machine."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:length]


def patient_key(patient_id: str) -> str:
    """Pseudonymous folder name for a patient: ``p-`` + hash of PatientID (``p-unknown`` when empty).

    A hash of a short identifier can be reversed by trying every ID, so this keeps IDs out of paths
    and logs; it is not anonymisation.

    >>> patient_key("")
    'p-unknown'
    """
    return f"p-{short_hash(patient_id)}" if patient_id.strip() else "p-unknown"


def safe_uid(uid: str) -> str:
    """The UID itself when it is a valid DICOM UID (at most 64 digits and dots), else ``h-`` + its hash.

    >>> safe_uid("1.2.840.10008")
    '1.2.840.10008'
    >>> safe_uid("../../evil").startswith("h-")
    True
    """
    return uid if _UID.match(uid) and len(uid) <= 64 else f"h-{short_hash(uid)}"


def study_folder(out: Path, patient_id: str, study_uid: str) -> Path:
    """``OUT/<patient key>/<safe study UID>``."""
    return out / patient_key(patient_id) / safe_uid(study_uid)
