"""Length-sorted parts and their token-balanced assignment to ranks.

The frames are sorted by protein length (ties by frame index) and cut into parts of
`frames_per_part` consecutive frames, so every batch inside a part holds proteins of nearly one
length (little padding); the shortest 4 x frames_per_part frames go into quarter-size parts, the
small change the dealing below ends with. Parts depend only on the input and `frames_per_part`,
never on the number of ranks: a run resumed on another number of GPUs reuses every finished part.

Parts are dealt to ranks by cost (ESM-2 tokens dominate: 3B parameters against DNABERT-S's 117M),
longest-processing-time first: each part goes to the rank with the least work so far (ties to the
lower rank), which keeps every rank within one small part's cost of the mean. Deterministic.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

import numpy as np

# Cost of a frame in "ESM-2 token equivalents": ESM-2 tokens (protein + BOS/EOS) plus the DNABERT-S
# pass, whose FLOPs per nucleotide are about 117M / 3B of ESM-2's per residue x (1 residue / 3 nt)
# x (~1 BPE token / 4-5 nt): small, but counted.
DNABERT_COST_PER_NUCLEOTIDE = 0.01


@dataclass(frozen=True)
class Part:
    index: int  # global part number: the part file's name
    frames: np.ndarray  # frame indices (into the prepared frame list), length-sorted
    cost: float


PART_LAYOUT = "length-sorted, quarter-size shortest parts"  # in the run fingerprint: parts of
# another layout are never mixed with these
SMALL_PARTS = 16  # quarter-size parts holding the shortest 4 x frames_per_part frames


def part_starts(n_frames: int, frames_per_part: int) -> list[int]:
    """Where each part begins in the length-sorted order: quarter-size parts first, then full ones."""
    small = max(1, frames_per_part // 4)
    small_end = min(n_frames, SMALL_PARTS * small)
    return list(range(0, small_end, small)) + list(range(small_end, n_frames, frames_per_part))


def plan_parts(protein_lengths: np.ndarray, frames_per_part: int) -> list[Part]:
    """Cut the length-sorted frames into parts of at most frames_per_part frames."""
    lengths = np.asarray(protein_lengths, dtype=np.int64)
    order = np.lexsort((np.arange(len(lengths)), lengths))  # by length, then frame index
    starts = part_starts(len(order), frames_per_part)
    parts = []
    for k, (start, end) in enumerate(zip(starts, starts[1:] + [len(order)])):
        idx = order[start:end]
        cost = float((lengths[idx] + 2).sum() + DNABERT_COST_PER_NUCLEOTIDE * (3 * lengths[idx] + 1).sum())
        parts.append(Part(k, idx, cost))
    return parts


def assign_parts(parts: list[Part], world_size: int) -> list[list[Part]]:
    """Deal parts to ranks, largest first, each to the least-loaded rank; each rank's list sorted by index."""
    heap = [(0.0, rank) for rank in range(world_size)]
    shards: list[list[Part]] = [[] for _ in range(world_size)]
    for part in sorted(parts, key=lambda p: (-p.cost, p.index)):
        load, rank = heapq.heappop(heap)
        shards[rank].append(part)
        heapq.heappush(heap, (load + part.cost, rank))
    return [sorted(s, key=lambda p: p.index) for s in shards]
