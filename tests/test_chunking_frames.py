"""Chunking quirks and the vectorised translation against a plain reading of the original's rules."""

import random

from hypothesis import given, settings
from hypothesis import strategies as st

from virnuc_ds.prep.chunking import chunk_sequence, chunk_starts
from virnuc_ds.prep.frames import translate_chunks

CODONS = {
    a + b + c: aa
    for (a, b, c), aa in zip(
        ((x, y, z) for x in "TCAG" for y in "TCAG" for z in "TCAG"),
        "FFLLSSSSYY**CC*WLLLLPPPPHHQQRRRRIIIMTTTTNNKKSSRRVVVVAAAADDEEGGGG",
    )
}


def chunk_lengths(n, L):
    return [len(s) for _, s in chunk_sequence("x", "A" * n, L)]


def test_documented_quirks():
    assert chunk_lengths(1001, 500) == [500, 500, 335]
    assert chunk_lengths(501, 500) == [500, 251]
    assert chunk_lengths(2300, 500) == [500] * 4 + [464]
    assert chunk_lengths(500, 500) == [500]
    assert chunk_lengths(37, 300) == [37]
    assert [cid for cid, _ in chunk_sequence("seq", "ACGT" * 200, 300)] == ["seq_chunk_1", "seq_chunk_2", "seq_chunk_3"]


@given(st.integers(min_value=1, max_value=20000), st.sampled_from([300, 500]))
def test_chunks_cover_the_sequence(n, L):
    starts = chunk_starts(n, L)
    assert len(starts) == -(-n // L)
    assert starts[0] == 0
    assert all(0 <= s < n for s in starts)
    assert min(n, starts[-1] + L) == n  # the last chunk reaches the end


def reference_frames(chunk_id, seq):
    """The original's rules, written plainly (one dict lookup per codon)."""
    s = seq.upper()
    rc = s.translate(str.maketrans("ACGT", "TGCA"))[::-1]
    out = []
    for tag, strand in (("F", s), ("R", rc)):
        for f in range(3):
            prot = "".join(CODONS.get(strand[i : i + 3], "") for i in range(f, len(strand) - 2, 3))
            if prot and "*" not in prot:
                out.append((f"{chunk_id}{tag}{f + 1}", strand[f : f + 1 + 3 * len(prot)], prot))
    return out


@settings(max_examples=200, deadline=None)
@given(st.lists(st.text(alphabet="ACGTacgtNRYKM", min_size=1, max_size=40), min_size=1, max_size=6))
def test_translation_matches_reference(seqs):
    chunks = [(f"c{i}", s) for i, s in enumerate(seqs)]
    got = [(f.id, f.nucleotide, f.protein) for f in translate_chunks(chunks)]
    want = [fr for cid, s in chunks for fr in reference_frames(cid, s)]
    assert got == want


def test_translation_of_long_coding_sequences():
    rng = random.Random(7)
    sense = [c for c, aa in CODONS.items() if aa != "*"]
    chunks = [(f"c{i}", "".join(rng.choice(sense) for _ in range(rng.randint(1, 200)))) for i in range(50)]
    got = [(f.id, f.nucleotide, f.protein) for f in translate_chunks(chunks)]
    want = [fr for cid, s in chunks for fr in reference_frames(cid, s)]
    assert got == want
    assert all(any(g[0] == f"c{i}F1" for g in got) for i in range(50))  # F1 of a stop-free ORF is kept
