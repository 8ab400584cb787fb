"""The README's install and test commands are the ones CI runs."""

from pathlib import Path

ROOT = Path(__file__).parents[1]


def test_ci_runs_the_readme_commands():
    readme = ROOT.joinpath("README.md").read_text()
    ci = ROOT.joinpath(".ci", "run").read_text().splitlines()
    for marker in ("# README install command:", "# README test command:",
                   "# README demo command (the tiny demo models, on the CPU):"):
        command = ci[ci.index(marker) + 1].strip()
        assert command in readme, f"{command!r} is not in the README"
