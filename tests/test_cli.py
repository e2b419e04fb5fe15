"""The ``medsynth`` argument parser: subcommands, choices shared with the library, lazy package names."""

from __future__ import annotations

import pytest

import medsynth.convert
from medsynth.cli import build_parser, main


def test_convert_offers_the_formats_the_runner_accepts():
    from medsynth.convert import runner

    convert = ["convert", "in", "--checkpoint", "c.pt", "--out", "o", "--format"]
    for fmt in runner.FORMATS:
        assert build_parser().parse_args([*convert, fmt]).fmt == fmt
    with pytest.raises(SystemExit):
        build_parser().parse_args([*convert, "png"])


def test_every_command_has_a_handler():
    parser = build_parser()
    cases = {
        "data demo --out d": "_data_demo",
        "data check d": "_data_check",
        "train t1->t2 --data d": "_train",
        "infer --volume v.nii.gz --checkpoint c.pt --out o.nii.gz": "_infer",
        "evaluate --run r": "_evaluate",
        "demo": "_demo_job",
        "convert in --checkpoint c.pt --out o": "convert_command",
    }
    for argv, handler in cases.items():
        assert parser.parse_args(argv.split()).handler.__name__ == handler, argv


def test_convert_package_exports_resolve_and_unknown_names_raise():
    assert sorted(medsynth.convert.__all__) == sorted(medsynth.convert._WHERE)
    for name in medsynth.convert.__all__:
        assert getattr(medsynth.convert, name) is not None
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        medsynth.convert.nope  # noqa: B018


def test_no_command_prints_help_and_exits_2(capsys):
    assert main([]) == 2
    assert "commands" in capsys.readouterr().out
