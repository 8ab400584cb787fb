"""Rank-local part files: the embeddings of one part, written atomically when the part finishes.

A part file is complete or absent (temp file + rename), so a crash at any instant loses at most the
parts in flight. Layout: the embedding store's (ids, dnabert_s, esm2) plus `frame_index` int64 [n]
(position of each row in the prepared frame list) and attrs `part`, `fingerprint`.
"""

from __future__ import annotations

import os
from pathlib import Path

import h5py
import numpy as np

from ..atomic import atomic_path
from ..store.embeddings import UTF8_STRING

PARTS_DIR = "parts"


def part_path(output_dir: str | os.PathLike, index: int) -> Path:
    return Path(output_dir) / PARTS_DIR / f"part-{index:06d}.h5"


def write_part(path: Path, index: int, frame_index: np.ndarray, ids: list[str], dnabert_s: np.ndarray, esm2: np.ndarray, fingerprint: str) -> None:
    with atomic_path(path) as tmp:
        with h5py.File(tmp, "w") as f:
            f.create_dataset("frame_index", data=np.asarray(frame_index, dtype=np.int64))
            f.create_dataset("ids", data=np.array(ids, dtype=object), dtype=UTF8_STRING)
            f.create_dataset("dnabert_s", data=np.asarray(dnabert_s, dtype=np.float32))  # [n, H_dna]
            f.create_dataset("esm2", data=np.asarray(esm2, dtype=np.float32))  # [n, H_esm]
            f.attrs["part"] = index
            f.attrs["fingerprint"] = fingerprint


def read_part(path: Path) -> dict:
    with h5py.File(path, "r") as f:
        return {
            "frame_index": f["frame_index"][()],
            "ids": [s.decode() if isinstance(s, bytes) else str(s) for s in f["ids"][()]],
            "dnabert_s": f["dnabert_s"][()],
            "esm2": f["esm2"][()],
            "fingerprint": f.attrs.get("fingerprint", ""),
        }


def failures_path(output_dir: str | os.PathLike, index: int) -> Path:
    """Frames of the part that failed: lines `item|stage|message`; present only while some did."""
    return Path(output_dir) / PARTS_DIR / f"part-{index:06d}.failed.txt"


def read_failure_lines(path: Path) -> list[str]:
    return [line for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def finished_frames(path: Path, fingerprint: str) -> np.ndarray | None:
    """Frame indices a part file already holds, if it is this run's (reads no embeddings)."""
    if not path.exists():
        return None
    try:
        with h5py.File(path, "r") as f:
            if f.attrs.get("fingerprint", "") != fingerprint:
                return None
            return f["frame_index"][()]
    except (OSError, KeyError):
        return None


def part_is_complete(output_dir, index: int, expected_frames: np.ndarray, fingerprint: str) -> bool:
    """True if the part holds exactly these frames, from a run with this fingerprint, none failed."""
    done = finished_frames(part_path(output_dir, index), fingerprint)
    return done is not None and np.array_equal(done, expected_frames) and not failures_path(output_dir, index).exists()
