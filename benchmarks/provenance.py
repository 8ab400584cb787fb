"""What a CPU benchmark's result records about where it ran, and its table of medians."""

from __future__ import annotations

import os
import platform
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def provenance() -> dict:
    """Python, torch, numpy, CPU, cores, commit and command. A device's copy of the tree may have no
    (or another) .git: the caller passes the commit in VIRNUC_DS_COMMIT."""
    import numpy as np
    import torch

    commit = os.environ.get("VIRNUC_DS_COMMIT") or subprocess.run(
        ["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout.strip() or "unknown"
    return {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__,
            "cpu": platform.processor() or platform.machine(), "cores": len(os.sched_getaffinity(0)),
            "commit": commit, "command": " ".join(sys.argv)}


def print_medians(label: str, runs: dict[str, list[float]]) -> None:
    """One line per entry: its median and every run, in seconds."""
    width = max([len(label), *map(len, runs)])
    print(f"{label:<{width}} {'median s':>9}  runs")
    for name, values in runs.items():
        print(f"{name:<{width}} {statistics.median(values):>9.2f}  {' '.join(f'{v:.2f}' for v in values)}")
