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
    seen: set[str] = set()
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
        if check_duplicates:
            if rid in seen:
                raise InputError(path, "duplicate record id", record=rid)
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


def write_fasta_records(fh: TextIO, records: Iterable[tuple[str, str]]) -> int:
    """Write (id, sequence) pairs one line each; returns the count."""
    n = 0
    for rid, seq in records:
        fh.write(f">{rid}\n{seq}\n")
        n += 1
    return n
