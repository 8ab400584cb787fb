"""Streaming FASTA reading (plain or gzip) with validation, and FASTA writing.

The record id is the first word of the header, as Biopython's `SeqIO.parse(..., "fasta")` gives it
(the original tool's ids). Records are yielded one at a time: millions of reads never sit in memory.
"""

from __future__ import annotations

import gzip
import io
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, TextIO

import numpy as np

from .errors import InputError

# IUPAC nucleotide codes, both cases. Anything else in a nucleotide record is an error.
NUCLEOTIDE_CODES = frozenset("ACGTURYSWKMBDHVNacgturyswkmbdhvn")
_NUCLEOTIDE_BYTES = "".join(sorted(NUCLEOTIDE_CODES)).encode()


@dataclass(frozen=True)
class FastaRecord:
    id: str
    sequence: str
    description: str = ""


def open_text(path: str | os.PathLike) -> TextIO:
    """Open a text file, transparently decompressing gzip (detected by its magic bytes)."""
    path = Path(path)
    if not path.exists():
        raise InputError(path, "file not found")
    if path.is_dir():
        raise InputError(path, "is a folder, not a file")
    with open(path, "rb") as fh:
        magic = fh.read(2)
    if magic == b"\x1f\x8b":
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8", errors="replace", newline=None)
    return open(path, "r", encoding="utf-8", errors="replace", newline=None)


def read_fasta(
    path: str | os.PathLike,
    *,
    check_nucleotides: bool = False,
    check_duplicates: bool = True,
    allow_empty_file: bool = False,
    allow_empty_sequence: bool = False,
) -> Iterator[FastaRecord]:
    """Yield the records of a FASTA file, raising InputError (file, record, reason) on bad input.

    Checks: the first non-blank line is a header; no duplicate ids (optional); no empty sequence
    (optional); nucleotide letters only (optional); at least one record (optional).
    """
    seen = _IdHashes() if check_duplicates else None
    count = 0
    header: str | None = None
    parts: list[str] = []

    def finish() -> FastaRecord:
        sequence = "".join(parts)
        words = header.split(None, 1)
        rid = words[0] if words else ""
        desc = header
        if not rid:
            raise InputError(path, f"header of record #{count} has no id", record=f"#{count}")
        if not sequence and not allow_empty_sequence:
            raise InputError(path, "empty sequence", record=rid)
        if check_nucleotides:
            if sequence.encode("utf-8").translate(None, _NUCLEOTIDE_BYTES):
                pos = next(i for i, c in enumerate(sequence) if c not in NUCLEOTIDE_CODES)
                raise InputError(
                    path, f"character {sequence[pos]!r} at position {pos + 1} is not a nucleotide code", record=rid
                )
        if seen is not None:
            seen.add(rid)
        return FastaRecord(rid, sequence, desc)

    with open_text(path) as fh:
        try:
            for lineno, line in enumerate(fh, start=1):
                if line.startswith(">"):
                    if header is not None:
                        count += 1
                        yield finish()
                    header = line[1:].strip()
                    parts = []
                    continue
                stripped = "".join(line.split())
                if not stripped:
                    continue
                if header is None:
                    raise InputError(path, f"line {lineno} comes before any '>' header: not a FASTA file")
                parts.append(stripped)
        except UnicodeDecodeError as exc:  # pragma: no cover - errors='replace' prevents most
            raise InputError(path, f"not a text file ({exc.reason})") from None
        except (OSError, EOFError) as exc:
            raise InputError(path, f"cannot be read: {exc}") from None
    if header is not None:
        count += 1
        yield finish()
    if count == 0 and not allow_empty_file:
        raise InputError(path, "contains no FASTA records (empty file?)")
    if seen is not None and seen.has_duplicates():
        raise InputError(path, "duplicate record id", record=_first_duplicate_id(path))


class _IdHashes:
    """Record ids seen so far, as 8-byte hashes: a million reads cost 8 MB, not a set of strings.

    Duplicates are looked for when the file ends (outputs are written atomically, so nothing is
    left behind); a second pass then names the duplicated id, ruling out hash collisions."""

    def __init__(self):
        self._blocks: list[np.ndarray] = []
        self._current: list[int] = []

    def add(self, rid: str) -> None:
        self._current.append(hash(rid))
        if len(self._current) >= 65536:
            self._blocks.append(np.array(self._current, dtype=np.int64))
            self._current = []

    def repeated(self) -> set[int]:
        """Hashes seen more than once."""
        hashes = np.sort(np.concatenate([*self._blocks, np.array(self._current, dtype=np.int64)]))
        return set(hashes[1:][hashes[1:] == hashes[:-1]].tolist())

    def has_duplicates(self) -> bool:
        return bool(self.repeated())


def _first_duplicate_id(path) -> str | None:
    counts: dict[int, list[str]] = {}
    hashes = _IdHashes()
    for rec in read_fasta(path, check_duplicates=False):
        hashes.add(rec.id)
    repeated = hashes.repeated()
    for rec in read_fasta(path, check_duplicates=False):
        h = hash(rec.id)
        if h in repeated:
            if rec.id in counts.setdefault(h, []):
                return rec.id
            counts[h].append(rec.id)
    return None


def write_fasta_records(fh: TextIO, records: Iterable[tuple[str, str]]) -> int:
    """Write (id, sequence) pairs one line each; returns the count."""
    n = 0
    for rid, seq in records:
        fh.write(f">{rid}\n{seq}\n")
        n += 1
    return n
