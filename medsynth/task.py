"""What a model translates: ``sources -> target`` or a unified set of modalities.

Parsing accepts the forms users type: ``'t1->t2'``, ``t1:t2``, ``'t1,t2,pd->flair'`` and
``unified`` with a modality list. An argument that ends in ``-`` is what a shell leaves of an
unquoted ``t1->t2`` (``>`` redirected the rest into a file), so it gets a message saying so.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .errors import MedsynthError
from .modalities import DISPLAY_NAMES, canonical_modality


@dataclass(frozen=True)
class Task:
    """A synthesis task.

    ``mode`` is ``one_to_one`` or ``many_to_one`` (fixed ``sources`` and ``target``) or ``unified``
    (``modalities``: any non-empty subset synthesises any missing member).
    """

    sources: tuple[str, ...] = ()
    target: str | None = None
    modalities: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.is_unified:
            if len(self.modalities) < 2:
                raise MedsynthError(
                    "a unified task needs at least two modalities, e.g. --modalities t1,t2,pd,flair"
                )
            if len(set(self.modalities)) != len(self.modalities):
                raise MedsynthError(f"modality listed twice in {','.join(self.modalities)}")
            return
        if not self.sources or self.target is None:
            raise MedsynthError("a task needs sources and a target, e.g. 't1->t2'")
        if self.target in self.sources:
            raise MedsynthError(f"the target {self.target!r} is also a source; pick a different target")
        if len(set(self.sources)) != len(self.sources):
            raise MedsynthError(f"a source is listed twice in {','.join(self.sources)}")

    @property
    def is_unified(self) -> bool:
        return bool(self.modalities)

    @property
    def mode(self) -> str:
        if self.is_unified:
            return "unified"
        return "one_to_one" if len(self.sources) == 1 else "many_to_one"

    @property
    def required_modalities(self) -> tuple[str, ...]:
        """Every modality the training data must contain."""
        if self.is_unified:
            return self.modalities
        assert self.target is not None
        return (*self.sources, self.target)

    def __str__(self) -> str:
        if self.is_unified:
            return "unified:" + ",".join(self.modalities)
        return ",".join(self.sources) + "->" + str(self.target)

    def describe(self) -> str:
        """Human-readable form, e.g. ``T1w -> T2w``."""
        if self.is_unified:
            return "unified over " + ", ".join(DISPLAY_NAMES[m] for m in self.modalities)
        return ", ".join(DISPLAY_NAMES[m] for m in self.sources) + " -> " + DISPLAY_NAMES[str(self.target)]

    def to_dict(self) -> dict[str, Any]:
        return {"sources": list(self.sources), "target": self.target, "modalities": list(self.modalities)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Task:
        return cls(
            sources=tuple(data.get("sources") or ()),
            target=data.get("target"),
            modalities=tuple(data.get("modalities") or ()),
        )

    @classmethod
    def parse(cls, text: str, modalities: str | None = None) -> Task:
        """Parse a task string.

        >>> str(Task.parse("T1w->t2"))
        't1->t2'
        >>> Task.parse("t1,t2,pd:flair").mode
        'many_to_one'
        """
        text = text.strip()
        if text.lower() == "unified":
            if not modalities:
                raise MedsynthError("'unified' needs --modalities, e.g. --modalities t1,t2,pd,flair")
            return cls(modalities=tuple(canonical_modality(m) for m in _split_list(modalities)))
        if text.endswith("-") and ">" not in text:
            raise MedsynthError(
                f"task {text!r} looks cut short: the shell read '>' as a redirection. "
                f"Quote the task ('{text}>TARGET') or write it as SOURCE:TARGET"
            )
        for separator in ("->", ":"):
            if separator in text:
                left, _, right = text.partition(separator)
                break
        else:
            raise MedsynthError(
                f"cannot read task {text!r}; write it as 't1->t2', t1:t2 or 't1,t2,pd->flair'"
            )
        sources = tuple(canonical_modality(s) for s in _split_list(left))
        targets = _split_list(right)
        if len(targets) != 1:
            raise MedsynthError(f"task {text!r} needs exactly one target after '->'")
        return cls(sources=sources, target=canonical_modality(targets[0]))


def _split_list(text: str) -> list[str]:
    items = [item for item in text.replace("+", ",").split(",") if item.strip()]
    if not items:
        raise MedsynthError(f"empty modality list in {text!r}")
    return items
