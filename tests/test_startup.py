"""Start-up: building the ``medsynth`` parser imports no heavy library, and ``--help`` answers.

Behaviour only, never timed: what is imported decides how fast ``--help`` is (torch alone takes seconds).
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

HEAVY = ("torch", "SimpleITK", "pydicom", "matplotlib", "skimage", "monai", "nibabel", "scipy", "tqdm")


def _python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


def test_building_the_parser_imports_no_heavy_library():
    code = (
        "import json, sys, medsynth.cli; medsynth.cli.build_parser(); "
        f"print(json.dumps(sorted(m for m in {HEAVY!r} if m in sys.modules)))"
    )
    done = _python(code)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == []


def test_the_convert_package_loads_its_parts_on_first_use():
    code = (
        "import json, sys, medsynth.convert as c; before = 'pydicom' in sys.modules; "
        "c.Shard; c.add_convert_arguments; after_light = 'pydicom' in sys.modules; c.discover; "
        "print(json.dumps([before, after_light, 'pydicom' in sys.modules]))"
    )
    done = _python(code)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == [False, False, True]


@pytest.mark.parametrize("argv", [["--help"], ["infer", "--help"], ["convert", "--help"], ["--version"]])
def test_help_exits_zero(argv):
    done = subprocess.run(
        [sys.executable, "-m", "medsynth", *argv], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert "medsynth" in done.stdout
