"""Cut a sequence into fixed-length overlapping chunks exactly as the original VirNucPro does.

The original spreads the overlap over the chunks with integer arithmetic that has quirks (for
n=1001, L=500 the chunks are 500, 500, 335 long; for n=501: 500, 251). The classifier was trained on
data cut this way, so the quirks are reproduced, not fixed.
"""

from __future__ import annotations


def chunk_starts(n: int, chunk_length: int) -> list[int]:
    """Start offsets of the chunks of a sequence of length n (each chunk is s[start:start+L]).

    num_chunks = ceil(n / L); the overlap (num_chunks*L - n) is spread as `upper` steps for the first
    `extra` chunks and `lower` steps after them, the way the original's list arithmetic works out.
    """
    if n <= 0:
        raise ValueError("cannot chunk an empty sequence")
    L = chunk_length
    num_chunks = -(-n // L)
    repeat_length = num_chunks * L - n
    lower = int(repeat_length / num_chunks)  # the original's float division, then int()
    extra = repeat_length - lower * (num_chunks - 1)  # how many steps take lower + 1
    # steps[k] is subtracted after chunk k; the original's list is [upper]*extra + [lower]*rest + [0],
    # truncated by zip to num_chunks entries.
    steps = ([lower + 1] * extra + [lower] * max(0, num_chunks - 1 - extra) + [0])[:num_chunks]
    starts = []
    move = 0
    for k in range(num_chunks):
        a = k * L
        starts.append(a - move if a > 1 else a)
        move += steps[k]
    return starts


def chunk_sequence(record_id: str, sequence: str, chunk_length: int) -> list[tuple[str, str]]:
    """(chunk id, chunk sequence) pairs; ids are `{record_id}_chunk_{k}` with k from 1.

    The letter case is kept (frames are upper-cased later, as in the original).
    """
    return [
        (f"{record_id}_chunk_{k}", sequence[start : start + chunk_length])
        for k, start in enumerate(chunk_starts(len(sequence), chunk_length), start=1)
    ]
