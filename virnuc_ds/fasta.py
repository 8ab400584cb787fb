"""Streaming FASTA reading (plain or gzip) with validation, and FASTA writing.

The record id is the first word of the header, as Biopython's `SeqIO.parse(..., "fasta")` gives it
(the original tool's ids). Records are yielded one at a time: millions of reads never sit in memory.

Two readers, one reading: `read_fasta` yields records one by one and names the file, record and
reason of the first problem. `record_blocks` + `parse_fasta_block` split the file into blocks of
whole records as raw bytes, so worker processes can parse them (prepare reads a large sample this
way: one process parsing records was its slowest step). A block parses to exactly the records
read_fasta yields for those lines; where read_fasta would raise, the block parser raises
BlockRejected and the caller reads the file with read_fasta for the exact error.
"""

from __future__ import annotations

import gzip
import io
import os
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterable, Iterator, TextIO

import numpy as np

from .errors import InputError

# IUPAC nucleotide codes, both cases. Anything else in a nucleotide record is an error.
NUCLEOTIDE_CODES = frozenset("ACGTURYSWKMBDHVNacgturyswkmbdhvn")
_NUCLEOTIDE_BYTES = "".join(sorted(NUCLEOTIDE_CODES)).encode()

# Text is UTF-8 (a leading byte-order mark dropped); bytes that are not UTF-8 become lone surrogates,
# so a header holding them is refused by name (a sequence holding them fails the nucleotide check).
ENCODING, DECODE_ERRORS = "utf-8-sig", "surrogateescape"


def sequence_letters(line: str) -> str:
    """A sequence line without the characters Biopython's FASTA parser drops (space, tab, CR, LF).
    Any other character stays, so a vertical tab or a no-break space is reported, not dropped."""
    if " " in line or "\t" in line or "\r" in line or "\n" in line:  # the usual line has none: as fast as before
        return line.replace("\n", "").replace(" ", "").replace("\t", "").replace("\r", "")
    return line


def is_utf8_text(text: str) -> bool:
    if text.isascii():
        return True
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate: a byte that was not UTF-8
        return False
    return True


@dataclass(frozen=True)
class FastaRecord:
    id: str
    sequence: str
    description: str = ""


def open_binary(path: str | os.PathLike) -> BinaryIO:
    """Open a file's bytes, transparently decompressing gzip (detected by its magic bytes)."""
    path = Path(path)
    if not path.exists():
        raise InputError(path, "file not found")
    if path.is_dir():
        raise InputError(path, "is a folder, not a file")
    with open(path, "rb") as fh:
        magic = fh.read(2)
    return gzip.open(path, "rb") if magic == b"\x1f\x8b" else open(path, "rb")


def open_text(path: str | os.PathLike) -> TextIO:
    """Open a text file (UTF-8, undecodable bytes kept as lone surrogates, universal newlines), gzip or plain."""
    return io.TextIOWrapper(open_binary(path), encoding=ENCODING, errors=DECODE_ERRORS, newline=None)


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
    seen = IdHashes() if check_duplicates else None
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
        if not is_utf8_text(header):
            raise InputError(path, "header is not UTF-8 text", record=rid)
        if not sequence and not allow_empty_sequence:
            raise InputError(path, "empty sequence", record=rid)
        if check_nucleotides:
            if sequence.encode("utf-8", DECODE_ERRORS).translate(None, _NUCLEOTIDE_BYTES):
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
                stripped = sequence_letters(line)
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
    if seen is not None:
        check_unique_ids(path, seen)


class BlockRejected(ValueError):
    """A block holds something read_fasta refuses; read the file with read_fasta for the error."""


def record_blocks(path: str | os.PathLike, block_bytes: int = 1 << 20) -> Iterator[bytes]:
    """The file's bytes (decompressed) in blocks of about block_bytes or more, each cut just before
    a '>' that starts a line, so a record never spans two blocks; together they are the file.
    Raises InputError (missing file, a folder), OSError or EOFError (unreadable, broken gzip)."""
    pending: list[bytes] = []  # read since the last cut
    previous = b""  # the byte before this read: a line may start at the read's first byte
    with open_binary(path) as fh:
        while data := fh.read(block_bytes):
            probe = previous + data
            start = _last_line_start(probe)
            previous = data[-1:]
            if start < 0:
                pending.append(data)
                continue
            cut = start - (len(probe) - len(data))  # that '>' in data
            block = b"".join([*pending, data[:cut]])
            if block:
                yield block
            pending = [data[cut:]]
    if pending:
        yield b"".join(pending)


def _last_line_start(buf: bytes) -> int:
    """Index of the last '>' that begins a line (after '\n', or '\r' alone), or -1."""
    end = len(buf)
    while (i := buf.rfind(b">", 1, end)) > 0:
        if buf[i - 1] in b"\r\n":
            return i
        end = i
    return -1


def parse_fasta_block(raw: bytes, *, check_nucleotides: bool = False) -> list[tuple[str, str]]:
    """(id, sequence) of the records in a block from record_blocks, as read_fasta reads them
    (UTF-8, universal newlines, ids the header's first word, space and tab dropped from sequences). Raises BlockRejected where read_fasta raises InputError; duplicate ids and an
    empty file are the caller's to check across blocks."""
    text = raw.decode(ENCODING, errors=DECODE_ERRORS).replace("\r\n", "\n").replace("\r", "\n")
    records: list[tuple[str, str]] = []
    rid: str | None = None
    parts: list[str] = []

    def finish() -> None:
        sequence = "".join(parts)
        if not sequence:
            raise BlockRejected(f"record {rid!r}: empty sequence")
        if check_nucleotides and sequence.encode("utf-8", DECODE_ERRORS).translate(None, _NUCLEOTIDE_BYTES):
            raise BlockRejected(f"record {rid!r}: a character that is not a nucleotide code")
        records.append((rid, sequence))

    for line in text.split("\n"):
        if line.startswith(">"):
            if rid is not None:
                finish()
            words = line[1:].split(None, 1)
            if not words:
                raise BlockRejected("a header without an id")
            if not is_utf8_text(line):
                raise BlockRejected("a header that is not UTF-8 text")
            rid, parts = words[0], []
            continue
        stripped = sequence_letters(line)
        if not stripped:
            continue
        if rid is None:
            raise BlockRejected("a line before any '>' header")
        parts.append(stripped)
    if rid is not None:
        finish()
    return records


class IdHashes:
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

    def extend(self, ids: list[str]) -> None:
        self._blocks.append(np.fromiter(map(hash, ids), dtype=np.int64, count=len(ids)))

    def repeated(self) -> set[int]:
        """Hashes seen more than once."""
        hashes = np.sort(np.concatenate([*self._blocks, np.array(self._current, dtype=np.int64)]))
        return set(hashes[1:][hashes[1:] == hashes[:-1]].tolist())

    def has_duplicates(self) -> bool:
        return bool(self.repeated())


def check_unique_ids(path, seen: IdHashes) -> None:
    """Raise read_fasta's InputError if ids collected with seen.add/extend repeat."""
    if seen.has_duplicates():
        raise InputError(path, "duplicate record id", record=_first_duplicate_id(path))


def _first_duplicate_id(path) -> str | None:
    counts: dict[int, list[str]] = {}
    hashes = IdHashes()
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
