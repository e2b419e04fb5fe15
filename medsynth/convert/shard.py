"""``--shard K/N``: split the studies of one export among N machines without coordination.

Membership depends only on the study UID's hash, so every machine (or SLURM array task) computes the
same partition from the same export, whatever order the files are walked in and whichever studies
are already done.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

from ..errors import MedsynthError

_SHARD = re.compile(r"\s*(?P<index>[0-9]+)\s*/\s*(?P<count>[0-9]+)\s*", re.ASCII)


@dataclass(frozen=True)
class Shard:
    """Shard ``index`` (1-based) of ``count``."""

    index: int = 1
    count: int = 1

    def __post_init__(self) -> None:
        if self.count < 1 or not 1 <= self.index <= self.count:
            raise MedsynthError(
                f"--shard {self.index}/{self.count} is out of range; use K/N with 1 <= K <= N"
            )

    @classmethod
    def parse(cls, text: str) -> Shard:
        """Read ``"K/N"``.

        >>> Shard.parse("2/4")
        Shard(index=2, count=4)
        """
        match = _SHARD.fullmatch(text)  # ASCII digits only: "²/2" passes isdigit() but not int()
        if match is None:
            raise MedsynthError(f"cannot read --shard {text!r}; write it as K/N, e.g. --shard 1/4")
        return cls(int(match["index"]), int(match["count"]))

    def contains(self, study_uid: str) -> bool:
        """True when this shard owns the study."""
        return self.owner(study_uid, self.count).index == self.index

    @classmethod
    def owner(cls, study_uid: str, count: int) -> Shard:
        """The one shard of ``count`` that owns a study: the shards of one count partition the export.

        >>> [Shard.owner("1.2.3", 4).contains("1.2.3"), Shard.owner("1.2.3", 1)]
        [True, Shard(index=1, count=1)]
        """
        if count < 1:
            raise MedsynthError(f"a shard count must be at least 1, got {count}")
        digest = int.from_bytes(hashlib.sha256(study_uid.encode("utf-8")).digest()[:8], "big")
        return cls(digest % count + 1, count)

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"
