"""Six-frame translation of chunks, vectorised with numpy lookup tables.

Semantics of the original (VirNucPro units.translate_dna / identify_seq):
- the chunk is upper-cased; the reverse strand complements A, C, G, T only and keeps other letters;
- frames F1-F3 start at offsets 0, 1, 2 of the forward strand, R1-R3 at the same offsets of the
  reverse complement; codons are read while a full codon remains;
- a codon with any letter other than A/C/G/T is dropped (no 'X'); stops translate to '*';
- a frame is kept iff its protein is non-empty and has no '*';
- its nucleotide sequence is strand[f : f + 1 + 3*len(protein)] (one base longer than its codons,
  and shorter than the span it came from when codons were dropped: both quirks of the original).

Many chunks are translated at once: their sequences are concatenated into one byte buffer, every
position's codon code is computed in one pass, and each frame is a strided slice of that buffer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

_BASES = b"TCAG"
_AMINO_ACIDS = b"FFLLSSSSYY**CC*WLLLLPPPPHHQQRRRRIIIMTTTTNNKKSSRRVVVVAAAADDEEGGGG"  # standard table, TCAG order

# base letter -> 0..3 (A, C, G, T), anything else -> 4
_BASE_CODE = np.full(256, 4, dtype=np.uint8)
for _i, _b in enumerate(b"ACGT"):
    _BASE_CODE[_b] = _i
# codon code c0*25 + c1*5 + c2 -> amino acid byte, 0 where the codon holds a non-ACGT letter
_CODON_TO_AA = np.zeros(125, dtype=np.uint8)
for _i1, _b1 in enumerate(_BASES):
    for _i2, _b2 in enumerate(_BASES):
        for _i3, _b3 in enumerate(_BASES):
            code = int(_BASE_CODE[_b1]) * 25 + int(_BASE_CODE[_b2]) * 5 + int(_BASE_CODE[_b3])
            _CODON_TO_AA[code] = _AMINO_ACIDS[_i1 * 16 + _i2 * 4 + _i3]
# reverse-strand complement: A<->T, C<->G, everything else unchanged
_COMPLEMENT = bytes.maketrans(b"ACGT", b"TGCA")

FRAME_NAMES = ("F1", "F2", "F3", "R1", "R2", "R3")


@dataclass(frozen=True)
class Frame:
    id: str  # chunk id + F1..F3 / R1..R3
    nucleotide: str
    protein: str


def _amino_acids_at_every_position(strands: bytes) -> bytes:
    """aa[i] = translation of the codon starting at i (0 if it holds a non-ACGT letter or runs off)."""
    codes = _BASE_CODE[np.frombuffer(strands, dtype=np.uint8)]  # [n]
    codon = np.zeros(len(codes), dtype=np.uint8)  # [n]
    if len(codes) >= 3:
        codon[:-2] = _CODON_TO_AA[codes[:-2] * 25 + codes[1:-1] * 5 + codes[2:]]
    return codon.tobytes()


def translate_chunks(chunks: Sequence[tuple[str, str]]) -> list[Frame]:
    """Kept frames of each (chunk id, sequence), in chunk order then F1, F2, F3, R1, R2, R3."""
    if not chunks:
        return []
    upper = [seq.upper().encode("ascii", "replace") for _, seq in chunks]
    forward = b"".join(upper)
    reverse = forward.translate(_COMPLEMENT)[::-1]
    aa_forward = _amino_acids_at_every_position(forward)
    aa_reverse = _amino_acids_at_every_position(reverse)
    total = len(forward)

    frames: list[Frame] = []
    start = 0
    for (chunk_id, _), seq in zip(chunks, upper):
        n = len(seq)
        end = start + n
        # the chunk's reverse complement sits at [total - end, total - start) of `reverse`
        for strand, aa, base, tag in (
            (forward, aa_forward, start, "F"),
            (reverse, aa_reverse, total - end, "R"),
        ):
            for f in range(3):
                # codons start at base+f, base+f+3, ... while a full codon remains in the chunk
                protein = aa[base + f : base + max(n - 2, 0) : 3].replace(b"\x00", b"")
                if not protein or b"*" in protein:
                    continue
                nuc_end = min(base + f + 1 + 3 * len(protein), base + n)
                frames.append(
                    Frame(
                        f"{chunk_id}{tag}{f + 1}",
                        strand[base + f : nuc_end].decode("ascii"),
                        protein.decode("ascii"),
                    )
                )
        start = end
    return frames
