"""The block reader prepare's workers use reads every file exactly as read_fasta does, and bad
input found in a block is reported with read_fasta's own message."""

import gzip
import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from virnuc_ds.errors import InputError
from virnuc_ds.fasta import BlockRejected, parse_fasta_block, read_fasta, record_blocks
from virnuc_ds.prep.prepare import prepare

# pieces that make FASTA-like files with every awkward case: line endings of three kinds, blank
# lines, headers without ids or with descriptions, lower case, non-nucleotides, non-ASCII bytes
PIECES = st.sampled_from([
    b">", b">r1", b">r2 desc", b"> ", b">a/b:c", b"ACGT", b"acgtn", b"NNNN", b"X", b"\xc3\xa9", b"\xff",
    b"\n", b"\r\n", b"\r", b" ", b"\t", b"\n\n", b"ACGTACGTACGT",
    b"\x0b", b"\x0c", b"\x1c", b"\xc2\xa0", b"\xef\xbb\xbf",  # other whitespace, a no-break space, a byte-order mark
])


def read_by_blocks(path, block_bytes):
    return [rec for raw in record_blocks(path, block_bytes) for rec in parse_fasta_block(raw, check_nucleotides=True)]


def read_by_general_reader(path):
    return [(r.id, r.sequence) for r in read_fasta(path, check_nucleotides=True, check_duplicates=False, allow_empty_file=True)]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(PIECES, max_size=40), st.integers(1, 64), st.booleans())
def test_blocks_read_like_read_fasta(tmp_path, pieces, block_bytes, gzipped):
    data = b"".join(pieces)
    path = tmp_path / ("f.fa.gz" if gzipped else "f.fa")
    path.write_bytes(gzip.compress(data) if gzipped else data)
    assert b"".join(record_blocks(path, block_bytes)) == data
    try:
        expected = read_by_general_reader(path)
    except InputError:
        with pytest.raises(BlockRejected):
            read_by_blocks(path, block_bytes)
        return
    assert read_by_blocks(path, block_bytes) == expected


def test_every_block_after_the_first_starts_a_record(tmp_path):
    path = tmp_path / "f.fa"
    path.write_bytes(b"".join(b">r%d x\r\nACGT\rACGT\n\n" % i for i in range(500)))
    blocks = list(record_blocks(path, 100))
    assert len(blocks) > 10 and all(b.startswith(b">") for b in blocks)


def _sample(tmp_path, bad_record: bytes) -> "Path":  # noqa: F821
    path = tmp_path / "in.fa"
    good = b"".join(b">r%d\n%s\n" % (i, b"ATG" + b"GCT" * 200) for i in range(200))
    path.write_bytes(good + bad_record + good.replace(b">r", b">s"))
    return path


@pytest.mark.parametrize("bad_record", [b">bad\nACGTQ\n", b">empty\n", b">\nACGT\n", b">r7\nACGT\n"])
def test_prepare_reports_bad_input_as_read_fasta_does(tmp_path, bad_record):
    """A bad record deep in the file, found by a worker: the message is read_fasta's own."""
    path = _sample(tmp_path, bad_record)
    with pytest.raises(InputError) as expected:
        for _ in read_fasta(path, check_nucleotides=True):
            pass
    with pytest.raises(InputError) as got:
        prepare(path, 300, tmp_path / "out", workers=2, block_bytes=4096)
    assert str(got.value) == str(expected.value)
    assert not (tmp_path / "out" / "identified_protein.faa").exists()


def test_prepare_same_output_for_any_block_size(tmp_path):
    path = _sample(tmp_path, b">odd  description here\r\nATGAAAcccGGGTTT\r\n")
    prepare(path, 300, tmp_path / "a", workers=1, block_bytes=1 << 20)
    prepare(path, 300, tmp_path / "b", workers=2, block_bytes=333)
    for name in ("chunked.fa", "identified_nucleotide.fa", "identified_protein.faa"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_bad_input_with_blocks_in_flight_never_hangs(tmp_path):
    """A bad block ends prepare while other blocks are still in the pool. Terminating a Pool with tasks
    in flight could deadlock (once in ~20 tries here before the fix): 30 tries, in a child with a time limit."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    path = _sample(tmp_path, b">bad\nACGTQ\n")
    code = (
        "from virnuc_ds.prep.prepare import prepare\n"
        "from virnuc_ds.errors import InputError\n"
        "if __name__ == '__main__':\n"
        "    for _ in range(30):\n"
        "        try:\n"
        f"            prepare({str(path)!r}, 300, {str(tmp_path / 'out')!r}, workers=2, block_bytes=4096)\n"
        "        except InputError:\n"
        "            pass\n"
        "    print('done')\n"
    )
    (tmp_path / "loop.py").write_text(code)
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    proc = subprocess.run([sys.executable, str(tmp_path / "loop.py")], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == "done", proc.stderr[-2000:]


@pytest.mark.parametrize("data, expected", [
    (b">s\nA\tTG GCT\r\n", [("s", "ATGGCT")]),  # Biopython drops space, tab, CR and LF from sequence lines
    (b"\xef\xbb\xbf>s\nATGGCT\n", [("s", "ATGGCT")]),  # a leading byte-order mark (Windows editors)
    (b">s\xc3\xa9 d\xc3\xa9sc\nATGGCT\n", [("s\u00e9", "ATGGCT")]),  # UTF-8 ids
    (b">s\nA\x0bTGGCT\n", "character '\\x0b' at position 2 is not a nucleotide code"),  # the original keeps it
    (b">s\nA\xc2\xa0TGGCT\n", "character '\\xa0' at position 2 is not a nucleotide code"),
    (b">s\xff\nATGGCT\n", "header is not UTF-8 text"),
])
def test_whitespace_encoding_and_byte_order_marks(tmp_path, data, expected):
    """Only what Biopython's parser drops is dropped; any other character is refused, never dropped
    silently (the original would keep it, shifting the reading frame); ids must be UTF-8."""
    path = tmp_path / "f.fa"
    path.write_bytes(data)
    if isinstance(expected, list):
        assert read_by_general_reader(path) == expected
        assert read_by_blocks(path, 7) == expected
    else:
        with pytest.raises(InputError, match=re.escape(expected)):
            read_by_general_reader(path)
        with pytest.raises(BlockRejected):
            read_by_blocks(path, 7)
