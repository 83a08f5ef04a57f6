from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_ci_runs_exactly_the_readme_test_command():
    readme = [line.strip() for line in (ROOT / "README.md").read_text().splitlines()]
    test_command = next(line for line in readme if line.endswith("-m pytest"))
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert ci[-1] == test_command
