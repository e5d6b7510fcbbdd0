"""Every runnable example under examples/ is exercised here.

Each example's stdout must match examples/output/<stem>.txt exactly: those
files are what the documentation shows as the example's output, so a change
in behaviour (or a new example without a recorded output) fails here. The
examples inherit GREENBACK_NO_EXTENSIONS from this process (conftest sets it
under --no-c-extensions), so both implementations must print the same.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
OUTPUTS = EXAMPLES / "output"
ALL_EXAMPLES = sorted(path.name for path in EXAMPLES.glob("*.py"))


def run_example(name: str) -> str:
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / name)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=EXAMPLES,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    return proc.stdout


def test_examples_are_found() -> None:
    # Guards the parametrization below against an empty glob.
    assert "quickstart.py" in ALL_EXAMPLES


@pytest.mark.parametrize("name", ALL_EXAMPLES)
def test_example_output_matches_docs(name: str) -> None:
    expected_file = OUTPUTS / f"{Path(name).stem}.txt"
    assert expected_file.is_file(), f"record the output of {name} in {expected_file}"
    assert run_example(name) == expected_file.read_text(encoding="utf-8")


def test_every_recorded_output_has_an_example() -> None:
    stems = {Path(name).stem for name in ALL_EXAMPLES}
    orphans = sorted(p.name for p in OUTPUTS.glob("*.txt") if p.stem not in stems)
    assert orphans == []

