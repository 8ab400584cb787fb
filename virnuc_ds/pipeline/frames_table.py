"""The prepared frames (ids, nucleotides, proteins), read from prepare's FASTA files.

Every rank needs every frame's protein length (to plan the parts) but the sequences of its own
parts only. prepare writes each record as exactly two lines (`>id`, sequence), so such a file is
memory-mapped and indexed by its line starts: a rank holds 24 bytes of offsets a record instead
of the records, and no copy of the file (the page cache shares it between the ranks of a node).
626k frames: 0.35 s instead of 1.8 s reading and splitting, on a 2-core CPU
(benchmarks/run_end_cpu.py). A record's id and sequence are cut out of the file when asked for.
Files of any other layout go through the general reader.
"""

from __future__ import annotations

import mmap
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import IncompleteError
from ..fasta import read_fasta
from ..prep.prepare import NUCLEOTIDE_FASTA, PROTEIN_FASTA

SCAN_BYTES = 1 << 26  # the newline scan works through the file 64 MiB at a time
NEWLINE, GREATER = ord("\n"), ord(">")
ODD_BYTES = [bytes([b]) for b in (0x09, 0x0B, 0x0C, 0x0D, 0x1C, 0x1D, 0x1E, 0x1F, 0x20)]  # str.split()'s ASCII whitespace


class TwoLineFasta:
    """A FASTA file laid out as prepare writes it, memory-mapped. `index()` returns None if the
    file has another layout (then the caller reads it with the general reader)."""

    def __init__(self, data: np.ndarray, header_start: np.ndarray, seq_start: np.ndarray,
                 seq_end: np.ndarray):
        self._data = data  # [file bytes] uint8, memory-mapped
        self.header_start = header_start  # [n] offset of each '>'
        self.seq_start = seq_start  # [n] offset of each sequence line
        self.seq_end = seq_end  # [n] offset of the newline ending it

    @classmethod
    def index(cls, path: Path) -> TwoLineFasta | None:
        path = Path(path)
        if path.stat().st_size == 0:
            empty = np.zeros(0, dtype=np.int64)
            return cls(np.zeros(0, dtype=np.uint8), empty, empty, empty)
        # The map lives as long as the table. prepare replaces its files by rename, which leaves a
        # mapped file intact; a prep file truncated in place under a running rank would end it (SIGBUS).
        with open(path, "rb") as fh:
            mapped = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
        # whitespace other than the newlines (which the general reader would cut ids at, or drop from
        # sequences) and non-ASCII bytes are not prepare's: the general reader decides
        if any(mapped.find(odd) != -1 for odd in ODD_BYTES):
            return None
        data = np.frombuffer(mapped, dtype=np.uint8)  # [file bytes], a view of the map
        ends, non_ascii = [], 0
        for start in range(0, len(data), SCAN_BYTES):
            block = data[start:start + SCAN_BYTES]
            ends.append(np.flatnonzero(block == NEWLINE) + start)  # each line's newline
            non_ascii += int(np.count_nonzero(block > 0x7E))
        if non_ascii:
            return None
        ends = np.concatenate(ends)  # [n_lines]
        if len(ends) == 0 or ends[-1] != len(data) - 1:  # no newline after the last line
            ends = np.append(ends, len(data))
        if len(ends) % 2:
            return None
        starts = np.concatenate(([0], ends[:-1] + 1))  # [n_lines]
        # copies, not views: the full line arrays are then freed (every start is < len(data))
        header_start, seq_start, seq_end = (np.ascontiguousarray(a) for a in (starts[0::2], starts[1::2], ends[1::2]))
        if not (data[header_start] == GREATER).all() or (data[seq_start] == GREATER).any() \
                or (seq_start - header_start < 3).any() or (seq_end == seq_start).any():
            return None  # a header line holds '>', an id and a newline; a sequence line is not empty
        return cls(data, header_start, seq_start, seq_end)

    def __len__(self) -> int:
        return len(self.header_start)

    def record_id(self, k: int) -> str:
        return bytes(self._data[self.header_start[k] + 1:self.seq_start[k] - 1]).decode("utf-8")

    def sequence(self, k: int) -> str:
        return bytes(self._data[self.seq_start[k]:self.seq_end[k]]).decode("ascii")

    def sequence_lengths(self) -> np.ndarray:
        return (self.seq_end - self.seq_start).astype(np.int64)

    def same_ids_as(self, other: TwoLineFasta, chunk: int = 1 << 18) -> bool:
        """Both files list the same ids in the same order (compared as bytes, a chunk at a time)."""
        if len(self) != len(other):
            return False
        mine, theirs = self.seq_start - self.header_start, other.seq_start - other.header_start
        if not np.array_equal(mine, theirs):
            return False
        for k in range(0, len(self), chunk):
            lengths = mine[k:k + chunk]
            if not np.array_equal(_gather(self._data, self.header_start[k:k + chunk], lengths),
                                  _gather(other._data, other.header_start[k:k + chunk], lengths)):
                return False
        return True


def _gather(data: np.ndarray, starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """The bytes data[s:s+l] for every (s, l), concatenated."""
    if len(lengths) == 0:
        return np.zeros(0, dtype=np.uint8)
    shift = starts - np.concatenate(([0], np.cumsum(lengths)[:-1]))  # [n]
    return data[np.repeat(shift, lengths) + np.arange(int(lengths.sum()))]


class _Field(Sequence):
    """One field (id or sequence) of every record, cut out of the file on access."""

    def __init__(self, fasta: TwoLineFasta, getter):
        self._fasta, self._get = fasta, getter

    def __len__(self) -> int:
        return len(self._fasta)

    def __getitem__(self, k: int) -> str:
        if k < 0:
            k += len(self)
        if not 0 <= k < len(self):
            raise IndexError(k)
        return self._get(k)


@dataclass
class FramesTable:
    ids: Sequence[str]
    nucleotides: Sequence[str]
    proteins: Sequence[str]
    lengths: np.ndarray | None = None  # [n] protein lengths, if known without reading the proteins

    def __len__(self) -> int:
        return len(self.ids)

    def protein_lengths(self) -> np.ndarray:
        if self.lengths is not None:
            return self.lengths
        return np.fromiter((len(p) for p in self.proteins), dtype=np.int64, count=len(self.proteins))


def read_prepared_fasta(path: Path) -> tuple[list[str], list[str]]:
    """(ids, sequences) of a FASTA file, as lists: quick for prepare's layout, the general reader
    for any other."""
    path = Path(path)
    indexed = TwoLineFasta.index(path)
    if indexed is not None:  # the layout is checked: one split makes the lists
        lines = path.read_text(encoding="utf-8").split("\n")
        n = len(indexed)
        return [h[1:] for h in lines[0:2 * n:2]], lines[1:2 * n:2]
    records = [(r.id, r.sequence) for r in read_fasta(path, allow_empty_file=True)]
    return [i for i, _ in records], [s for _, s in records]


def read_frame_ids(prep_dir: str | Path) -> list[str]:
    return read_prepared_fasta(Path(prep_dir) / PROTEIN_FASTA)[0]


def read_frames_table(prep_dir: str | Path, check_ids: bool = True) -> FramesTable:
    """The frames of OUT/prep: memory-mapped for prepare's own layout, read into lists otherwise.
    IncompleteError if the nucleotide and protein files do not list the same frames; check_ids=False
    skips that comparison (~0.3 s for 600k frames) where this run's prepare has just written both."""
    prep_dir = Path(prep_dir)
    nuc, prot = TwoLineFasta.index(prep_dir / NUCLEOTIDE_FASTA), TwoLineFasta.index(prep_dir / PROTEIN_FASTA)
    if nuc is not None and prot is not None:
        same = len(nuc) == len(prot) and (not check_ids or nuc.same_ids_as(prot))
        table = FramesTable(_Field(prot, prot.record_id), _Field(nuc, nuc.sequence), _Field(prot, prot.sequence),
                            prot.sequence_lengths())
    else:
        nuc_ids, nucleotides = read_prepared_fasta(prep_dir / NUCLEOTIDE_FASTA)
        ids, proteins = read_prepared_fasta(prep_dir / PROTEIN_FASTA)
        same = nuc_ids == ids
        table = FramesTable(ids, nucleotides, proteins)
    if not same:
        raise IncompleteError(f"{prep_dir}: {NUCLEOTIDE_FASTA} and {PROTEIN_FASTA} list different frames; rerun with --force")
    return table
