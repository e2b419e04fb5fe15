"""Task parsing: the forms users type, aliases, and the shell's broken unquoted form."""

from __future__ import annotations

import pytest

from medsynth.errors import MedsynthError
from medsynth.task import Task


@pytest.mark.parametrize(
    ("text", "sources", "target"),
    [
        ("t1->t2", ("t1",), "t2"),
        ("T1w->T2W", ("t1",), "t2"),
        ("t1:t2", ("t1",), "t2"),
        ("t1,t2,pd->flair", ("t1", "t2", "pd"), "flair"),
        ("t1n, t2w : t2f", ("t1", "t2"), "flair"),
        ("pdw->ct", ("pd",), "ct"),
    ],
)
def test_parse_forms(text: str, sources: tuple[str, ...], target: str) -> None:
    task = Task.parse(text)
    assert task.sources == sources and task.target == target
    assert task.mode == ("one_to_one" if len(sources) == 1 else "many_to_one")


def test_unified_needs_modalities_and_round_trips() -> None:
    task = Task.parse("unified", "t1,T2w,pd,FLAIR")
    assert task.mode == "unified" and task.modalities == ("t1", "t2", "pd", "flair")
    assert Task.from_dict(task.to_dict()) == task
    with pytest.raises(MedsynthError, match="--modalities"):
        Task.parse("unified")


def test_unquoted_shell_form_explains_quoting() -> None:
    with pytest.raises(MedsynthError, match="Quote the task"):
        Task.parse("t1-")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("t1->t7", "unknown modality 't7'"),
        ("t1->t1", "also a source"),
        ("t1,t1->t2", "listed twice"),
        ("t1->t2,pd", "exactly one target"),
        ("t1t2", "cannot read task"),
    ],
)
def test_bad_tasks(text: str, message: str) -> None:
    with pytest.raises(MedsynthError, match=message):
        Task.parse(text)
