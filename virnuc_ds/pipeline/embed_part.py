"""Embed one part: DNABERT-S and ESM-2 with fault isolation and out-of-memory recovery.

- A batch that raises is retried one frame at a time, so one bad record costs only itself: the
  frames that still fail are returned as FrameFailure(item, stage, message) and listed by the run in
  OUT/failed_files.txt; the rest of the part is kept.
- CUDA out-of-memory halves the embedder's token budget and retries the part (logged; the smaller
  budget is kept for later parts). Batching does not change results beyond the batching gates.
- Fault injection (tests, and users checking their setup): frame ids named in the config key
  `run.fail_frames` or the environment variable VIRNUC_DS_FAIL_FRAMES (comma-separated) raise
  inside the ESM-2 stage.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

log = logging.getLogger("virnuc_ds.run")

MIN_TOKS_PER_BATCH = 1024


@dataclass(frozen=True)
class FrameFailure:
    item: str
    stage: str
    message: str

    def line(self) -> str:
        return f"{self.item}|{self.stage}|{' '.join(self.message.split())}"


class InjectedFault(RuntimeError):
    pass


def injected_fault_ids(config_ids: Sequence[str]) -> frozenset[str]:
    env = os.environ.get("VIRNUC_DS_FAIL_FRAMES", "")
    return frozenset(config_ids) | frozenset(x.strip() for x in env.split(",") if x.strip())


def _is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()


def embed_with_oom_retry(embedder, sequences: list[str], stage: str) -> np.ndarray:
    """embedder.embed(sequences) [n, D]; on out-of-memory, halve the token budget and try again."""
    while True:
        try:
            return embedder.embed(sequences).numpy()
        except (torch.OutOfMemoryError, RuntimeError) as exc:
            if not _is_oom(exc) or embedder.toks_per_batch <= MIN_TOKS_PER_BATCH:
                raise
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            embedder.toks_per_batch = max(MIN_TOKS_PER_BATCH, embedder.toks_per_batch // 2)
            log.warning("%s: out of GPU memory; retrying with %d tokens a batch", stage, embedder.toks_per_batch)


def embed_stage(embedder, stage: str, ids: list[str], sequences: list[str], fail_ids: frozenset[str], width: int):
    """(rows [n, width] float32, NaN rows for failed frames; failures)."""

    def run(sub_ids, sub_seqs):
        bad = [i for i in sub_ids if i in fail_ids]
        if bad:
            raise InjectedFault(f"injected fault (run.fail_frames / VIRNUC_DS_FAIL_FRAMES) for {bad[0]}")
        return embed_with_oom_retry(embedder, sub_seqs, stage)

    try:
        return run(ids, sequences), []
    except Exception as batch_error:  # noqa: BLE001 - isolate the failing frames below
        if _is_oom(batch_error):
            raise
        log.warning("%s: a batch failed (%s); retrying its %d frames one at a time", stage, batch_error, len(ids))
    rows: list[np.ndarray | None] = []
    failures = []
    for rid, seq in zip(ids, sequences):
        try:
            rows.append(run([rid], [seq])[0])
        except Exception as exc:  # noqa: BLE001 - recorded, the run goes on
            if _is_oom(exc):
                raise
            failures.append(FrameFailure(rid, stage, f"{type(exc).__name__}: {exc}"))
            rows.append(None)
    out = np.full((len(ids), width), np.nan, dtype=np.float32)
    for k, r in enumerate(rows):
        if r is not None:
            out[k] = r
    return out, failures
