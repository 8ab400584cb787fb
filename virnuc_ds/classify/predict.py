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


class SequenceGroups:
    """Frames grouped by sequence for the highest-score file: Modified_ID = frame id minus its last 2
    characters, the groups numbered in sorted Modified_ID order (Python's string order, as the
    original sorts). Built once from the ids (the background merge builds it while the GPUs work);
    each table is then a vectorised maximum."""

    def __init__(self, ids: list[str]):
        self.keys = sorted(dict.fromkeys(rid[:-2] for rid in ids))  # the Modified_IDs, sorted
        rank = {key: r for r, key in enumerate(self.keys)}
        self.group = np.fromiter((rank[rid[:-2]] for rid in ids), dtype=np.int64, count=len(ids))  # [n_frames]

    def table(self, probabilities: np.ndarray, keep: np.ndarray | None = None) -> list[tuple[str, bool]]:
        """(Modified_ID, Is_Virus) sorted by Modified_ID, over the frames `keep` selects (all if None).
        Is_Virus = max(score2) >= max(score1) over the group's frames; float32 maxima are exact, so
        this equals the original's comparison of Python floats."""
        group = self.group if keep is None else self.group[keep]
        probabilities = probabilities if keep is None else probabilities[keep]  # [n, 2] float32
        best = np.full((2, len(self.keys)), -np.inf, dtype=probabilities.dtype)  # [2, n_groups], no rounding
        np.maximum.at(best[0], group, probabilities[:, 0])
        np.maximum.at(best[1], group, probabilities[:, 1])
        present = np.zeros(len(self.keys), dtype=bool)
        present[group] = True
        rows = np.flatnonzero(present)
        is_virus = (best[1] >= best[0])[rows]
        return [(self.keys[r], v) for r, v in zip(rows.tolist(), is_virus.tolist())]


def highest_score_table(ids: list[str], probabilities: np.ndarray) -> list[tuple[str, bool]]:
    """(Modified_ID, Is_Virus) sorted by Modified_ID."""
    return SequenceGroups(ids).table(probabilities)


def write_highest_score_table(path: str | os.PathLike, table: list[tuple[str, bool]]) -> None:
    with atomic_open(path, "w") as fh:
        fh.write("Modified_ID\tIs_Virus\n")
        fh.write("".join(f"{key}\t{is_virus}\n" for key, is_virus in table))


def write_highest_score(path: str | os.PathLike, ids: list[str], probabilities: np.ndarray) -> None:
    write_highest_score_table(path, highest_score_table(ids, probabilities))


def write_results(output_dir: str | os.PathLike, ids: list[str], probabilities: np.ndarray) -> tuple[Path, Path]:
    out = Path(output_dir)
    write_prediction_results(out / RESULTS_TXT, ids, probabilities)
    write_highest_score(out / HIGHEST_CSV, ids, probabilities)
    return out / RESULTS_TXT, out / HIGHEST_CSV
