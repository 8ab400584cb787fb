"""Rank-local part files: the embeddings of one part, written atomically when the part finishes.

A part file is complete or absent (temp file + rename), so a crash at any instant loses at most the
parts in flight. Layout: the embedding store's (ids, dnabert_s, esm2) plus `frame_index` int64 [n]
(position of each row in the prepared frame list) and attrs `part`, `fingerprint`.
"""

from __future__ import annotations

import concurrent.futures
import os
from pathlib import Path

import h5py
import numpy as np

from ..atomic import atomic_path
from ..store.embeddings import UTF8_STRING

PARTS_DIR = "parts"


def part_path(output_dir: str | os.PathLike, index: int) -> Path:
    return Path(output_dir) / PARTS_DIR / f"part-{index:06d}.h5"


def _write_part_file(tmp: Path, index, frame_index, ids, dnabert_s, esm2, fingerprint) -> None:
    with h5py.File(tmp, "w") as f:
        f.create_dataset("frame_index", data=np.asarray(frame_index, dtype=np.int64))
        f.create_dataset("ids", data=np.array(ids, dtype=object), dtype=UTF8_STRING)
        f.create_dataset("dnabert_s", data=np.asarray(dnabert_s, dtype=np.float32))  # [n, H_dna]
        f.create_dataset("esm2", data=np.asarray(esm2, dtype=np.float32))  # [n, H_esm]
        f.attrs["part"] = index
        f.attrs["fingerprint"] = fingerprint


def write_part(path: Path, index: int, frame_index: np.ndarray, ids: list[str], dnabert_s: np.ndarray, esm2: np.ndarray,
               fingerprint: str, finisher: "PartFinisher | None" = None) -> None:
    """Write the part to a temporary file, fsync it and rename it into place: here, or in the
    finisher's thread (writing and syncing a 27 MB part takes tens of ms the GPU would otherwise
    wait). The arrays must not change afterwards."""
    if finisher is None:
        _write_and_rename(path, index, frame_index, ids, dnabert_s, esm2, fingerprint)
    else:
        finisher.submit(_write_and_rename, path, index, frame_index, ids, dnabert_s, esm2, fingerprint)


def _write_and_rename(path: Path, index, frame_index, ids, dnabert_s, esm2, fingerprint) -> None:
    with atomic_path(path) as tmp:
        _write_part_file(tmp, index, frame_index, ids, dnabert_s, esm2, fingerprint)


class PartFinisher:
    """One background thread that writes, fsyncs and renames finished parts into place, in order.

    A part counts as done once renamed; `drain()` waits for every submitted part (the runner calls
    it before the ranks meet at the barrier, and on its way out, so no finished part is dropped)
    and re-raises a failure. A crash before the rename loses that part only: it is recomputed.
    At most `max_pending` parts wait (their arrays in memory); submit() waits beyond that."""

    def __init__(self, max_pending: int = 2):
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="part-finisher")
        self._pending: list[concurrent.futures.Future] = []
        self.max_pending = max_pending

    def submit(self, fn, *args) -> None:
        self._raise_failures()
        while len(self._pending) >= self.max_pending:
            self._pending.pop(0).result()
        self._pending.append(self._pool.submit(fn, *args))

    def _raise_failures(self) -> None:
        still = []
        for future in self._pending:
            if future.done():
                future.result()  # re-raises a failed write or rename
            else:
                still.append(future)
        self._pending = still

    def drain(self) -> None:
        pending, self._pending = self._pending, []
        for future in pending:
            future.result()

    def close(self) -> None:
        try:
            self.drain()
        finally:
            self._pool.shutdown(wait=True)


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


def all_failure_lines(output_dir: str | os.PathLike) -> list[str]:
    """Every part's failed frames (`item|stage|message`), in part order."""
    return [line for f in sorted((Path(output_dir) / PARTS_DIR).glob("part-*.failed.txt")) for line in read_failure_lines(f)]


def failed_ids_of(lines: list[str]) -> frozenset[str]:
    return frozenset(line.split("|", 1)[0] for line in lines)


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
