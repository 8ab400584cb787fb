"""Classify pooled embeddings and write the original's two result files.

prediction_results.txt (tab-separated): `Sequence_ID  Prediction  score1  score2`, one row per
frame in frame order; scores are the softmax probabilities printed as Python prints a numpy
float32; `virus` iff index 1 wins (a tie is `others`, as torch.max takes the first maximum).

prediction_results_highestscore.csv (tab-separated despite its name, as the original):
`Modified_ID  Is_Virus`, Modified_ID = Sequence_ID minus its last 2 characters (the frame tag), sorted,
Is_Virus = max(score2) >= max(score1) over the group's frames, written True/False.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..atomic import atomic_open
from .mlp import MLPClassifier

RESULTS_TXT = "prediction_results.txt"
HIGHEST_CSV = "prediction_results_highestscore.csv"
LABELS = ("others", "virus")
# The original ran its DataLoader with batch_size=256; the same batches give the same float32 bits.
ORIGINAL_BATCH = 256


def predict_probabilities(
    model: MLPClassifier, features: np.ndarray, *, device: str | torch.device = "cpu", batch_rows: int = ORIGINAL_BATCH * 256
) -> np.ndarray:
    """Softmax probabilities [N, 2] float32 of features [N, D].

    Rows go through the model in slices of 256, the original's batches; many such slices are
    stacked into one call only where that cannot change the arithmetic (eval-mode Linear and
    BatchNorm work row by row, but BLAS kernels may block differently by batch size, so on the CPU
    the original's 256-row batches are kept exactly).
    """
    model = model.to(device).eval()
    n = features.shape[0]
    out = np.empty((n, 2), dtype=np.float32)
    step = ORIGINAL_BATCH if torch.device(device).type == "cpu" else max(ORIGINAL_BATCH, batch_rows)
    with torch.no_grad():
        for start in range(0, n, step):
            x = torch.from_numpy(np.ascontiguousarray(features[start : start + step], dtype=np.float32)).to(device)
            out[start : start + len(x)] = F.softmax(model(x), dim=1).cpu().numpy()  # [b, 2]
    return out


RESULTS_HEADER = "Sequence_ID\tPrediction\tscore1\tscore2\n"


def prediction_line(rid: str, probabilities: np.ndarray) -> str:
    """One row of prediction_results.txt for a frame's two probabilities (newline included)."""
    p0, p1 = np.float32(probabilities[0]), np.float32(probabilities[1])
    return f"{rid}\t{LABELS[int(p1 > p0)]}\t{str(p0)}\t{str(p1)}\n"


def write_prediction_lines(path: str | os.PathLike, lines: list[str]) -> None:
    with atomic_open(path, "w") as fh:
        fh.write(RESULTS_HEADER)
        fh.writelines(lines)


def write_prediction_results(path: str | os.PathLike, ids: list[str], probabilities: np.ndarray) -> None:
    write_prediction_lines(path, [prediction_line(rid, p) for rid, p in zip(ids, probabilities)])


def highest_score_table(ids: list[str], probabilities: np.ndarray) -> list[tuple[str, bool]]:
    """(Modified_ID, Is_Virus) sorted by Modified_ID."""
    best: dict[str, list[float]] = {}
    for rid, (p0, p1) in zip(ids, probabilities):
        key = rid[:-2]
        cur = best.get(key)
        if cur is None:
            best[key] = [float(p0), float(p1)]
        else:
            cur[0] = max(cur[0], float(p0))
            cur[1] = max(cur[1], float(p1))
    return [(key, best[key][1] >= best[key][0]) for key in sorted(best)]


def write_highest_score(path: str | os.PathLike, ids: list[str], probabilities: np.ndarray) -> None:
    with atomic_open(path, "w") as fh:
        fh.write("Modified_ID\tIs_Virus\n")
        for key, is_virus in highest_score_table(ids, probabilities):
            fh.write(f"{key}\t{is_virus}\n")


def write_results(output_dir: str | os.PathLike, ids: list[str], probabilities: np.ndarray) -> tuple[Path, Path]:
    out = Path(output_dir)
    write_prediction_results(out / RESULTS_TXT, ids, probabilities)
    write_highest_score(out / HIGHEST_CSV, ids, probabilities)
    return out / RESULTS_TXT, out / HIGHEST_CSV
