"""Merge the part files into OUT/embeddings.h5 in frame order, and check completeness.

Complete means: every prepared frame has exactly one row, its id matches, and every value is finite.
Anything else raises IncompleteError (exit code 2) naming what is missing or wrong.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..errors import IncompleteError
from ..store.embeddings import Embeddings, write_embeddings
from .parts import PARTS_DIR, read_part

EMBEDDINGS_H5 = "embeddings.h5"


def _examples(items, n=5) -> str:
    items = list(items)
    more = f" and {len(items) - n} more" if len(items) > n else ""
    return ", ".join(repr(i) for i in items[:n]) + more


def merge_parts(
    output_dir: str | os.PathLike,
    frame_ids: list[str],
    attrs: dict | None = None,
    fingerprint: str | None = None,
    failed_ids: frozenset[str] = frozenset(),
) -> Path:
    """Write OUT/embeddings.h5; frames in failed_ids (listed in failed_files.txt) may be absent."""
    out = Path(output_dir)
    files = sorted((out / PARTS_DIR).glob("part-*.h5"))
    n = len(frame_ids)
    if n == 0:
        raise IncompleteError(f"{out}: the prepared frame list is empty (no open reading frame in the input); nothing to merge")
    filled = np.zeros(n, dtype=np.int64)
    dnabert = esm = None
    for path in files:
        part = read_part(path)
        if fingerprint is not None and part["fingerprint"] != fingerprint:
            continue  # a part of another run's layout; it is not ours to merge
        idx = part["frame_index"]
        if len(idx) and (idx.min() < 0 or idx.max() >= n):
            raise IncompleteError(f"{path}: frame indices outside the {n} prepared frames")
        wrong = [(i, a) for i, a in zip(idx, part["ids"]) if frame_ids[i] != a]
        if wrong:
            raise IncompleteError(f"{path}: ids do not match the prepared frames, e.g. {wrong[0][1]!r}")
        if dnabert is None:
            dnabert = np.full((n, part["dnabert_s"].shape[1]), np.nan, dtype=np.float32)
            esm = np.full((n, part["esm2"].shape[1]), np.nan, dtype=np.float32)
        dnabert[idx] = part["dnabert_s"]
        esm[idx] = part["esm2"]
        np.add.at(filled, idx, 1)
    listed_failed = np.array([i in failed_ids for i in frame_ids], dtype=bool) if failed_ids else np.zeros(n, dtype=bool)
    missing = np.flatnonzero((filled == 0) & ~listed_failed)
    if len(missing) or (dnabert is None and len(failed_ids) < n):
        raise IncompleteError(
            f"{len(missing) if dnabert is not None else n} of {n} frames have no embeddings "
            f"({_examples(frame_ids[i] for i in missing[:6]) if len(missing) else 'no part files'}); "
            "rerun the same command to compute them"
        )
    duplicated = np.flatnonzero(filled > 1)
    if len(duplicated):
        raise IncompleteError(f"{len(duplicated)} frames appear in several parts ({_examples(frame_ids[i] for i in duplicated[:6])})")
    bad = np.flatnonzero((filled > 0) & ~(np.isfinite(dnabert).all(1) & np.isfinite(esm).all(1)))
    if len(bad):
        raise IncompleteError(f"{len(bad)} frames have NaN or Inf embeddings ({_examples(frame_ids[i] for i in bad[:6])})")
    keep = filled > 0
    path = out / EMBEDDINGS_H5
    if dnabert is None:  # every frame failed
        raise IncompleteError(f"all {n} frames failed; see {out / 'failed_files.txt'}")
    write_embeddings(path, Embeddings([i for i, k in zip(frame_ids, keep) if k], dnabert[keep], esm[keep]), **(attrs or {}))
    return path
