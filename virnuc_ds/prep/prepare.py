"""FASTA -> chunks -> six-frame ORFs, written as the original's three FASTA files.

Outputs in the output folder (each written atomically: complete under its final name or absent):
  chunked.fa                  the chunks ({id}_chunk_{k}), input letter case kept
  identified_nucleotide.fa    the kept frames' nucleotide sequences
  identified_protein.faa      the kept frames' proteins
The input is streamed in blocks of whole records (raw bytes); worker processes parse, chunk and
translate them, and the results are written in input order, so the output is the same for any
number of workers and any block size. Bad input is reported as read_fasta reports it (file,
record, reason): a block the workers refuse sends the file through read_fasta for the error.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import multiprocessing as mp
import os
import time
from dataclasses import dataclass
from pathlib import Path

from ..atomic import atomic_path, ensure_writable_dir
from ..errors import InputError
from ..fasta import BlockRejected, IdHashes, check_unique_ids, parse_fasta_block, read_fasta, record_blocks
from .chunking import chunk_sequence
from .frames import translate_chunks

log = logging.getLogger(__name__)

CHUNKED_FASTA = "chunked.fa"
NUCLEOTIDE_FASTA = "identified_nucleotide.fa"
PROTEIN_FASTA = "identified_protein.faa"
EXPECTED_LENGTHS = (300, 500)


@dataclass
class PrepareStats:
    records: int = 0
    bases: int = 0
    chunks: int = 0
    frames: int = 0


def _process_block(args: tuple[bytes, int]) -> tuple[str, str, str, list[str], int, int, int]:
    """One block of input bytes -> (chunk FASTA text, nucleotide text, protein text, record ids, counts)."""
    raw, chunk_length = args
    records = parse_fasta_block(raw, check_nucleotides=True)
    chunks = [c for rid, seq in records for c in chunk_sequence(rid, seq, chunk_length)]
    frames = translate_chunks(chunks)
    chunk_text = "".join(f">{cid}\n{seq}\n" for cid, seq in chunks)
    nuc_text = "".join(f">{f.id}\n{f.nucleotide}\n" for f in frames)
    prot_text = "".join(f">{f.id}\n{f.protein}\n" for f in frames)
    n_bases = sum(len(s) for _, s in records)
    return chunk_text, nuc_text, prot_text, [rid for rid, _ in records], len(chunks), len(frames), n_bases


BLOCK_BYTES = 1 << 20  # input bytes a worker takes at a time (whole records: a longer record is one block)


def _input_blocks(path: Path, block_bytes: int, chunk_length: int):
    """(block of whole records, chunk length) for the workers; a read error is the input's
    (BlockRejected), not to be confused with one writing the outputs."""
    try:
        for raw in record_blocks(path, block_bytes):
            yield raw, chunk_length
    except (OSError, EOFError) as error:
        raise BlockRejected(error) from error


def _settle(in_flight: collections.deque, timeout_s: float = 60.0) -> None:
    """Wait (a bounded time) for the blocks still in the pool before it is terminated: a
    multiprocessing Pool terminated with tasks in flight can deadlock (its task handler stuck on the
    queue's lock: CI hung so once; tests/test_fasta_blocks.py repeats the case)."""
    deadline = time.monotonic() + timeout_s
    for result in in_flight:
        result.wait(max(0.0, deadline - time.monotonic()))
    in_flight.clear()


def _raise_input_error(path: Path, error):
    """Bad input found on the block path: read the file with read_fasta, which names the file,
    record and reason exactly as it always has."""
    for _ in read_fasta(path, check_nucleotides=True):
        pass
    raise InputError(path, f"cannot be read: {error}") from None  # read_fasta found nothing: an I/O error


def default_workers() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - non-Linux
        return max(1, os.cpu_count() or 1)


def prepare(
    input_fasta: str | os.PathLike,
    expected_length: int,
    output_dir: str | os.PathLike,
    *,
    workers: int = 0,
    block_bytes: int = BLOCK_BYTES,
    progress=None,
) -> PrepareStats:
    """Run chunking and six-frame translation; returns counts. Raises InputError on bad input.

    workers: processes for parsing and translation (0 = all CPUs available to this process, 1 = in-process).
    progress: optional callable(stats) called after each block.
    """
    if expected_length not in EXPECTED_LENGTHS:
        raise InputError(input_fasta, f"expected length must be one of {EXPECTED_LENGTHS}, not {expected_length}")
    input_fasta = Path(input_fasta)
    out = ensure_writable_dir(output_dir)

    workers = workers or default_workers()
    stats = PrepareStats()
    ids = IdHashes()  # duplicate record ids, checked across blocks at the end
    blocks = _input_blocks(input_fasta, block_bytes, expected_length)
    with contextlib.ExitStack() as stack:
        paths = [stack.enter_context(atomic_path(out / name)) for name in (CHUNKED_FASTA, NUCLEOTIDE_FASTA, PROTEIN_FASTA)]
        handles = [stack.enter_context(open(p, "w", encoding="utf-8")) for p in paths]  # whatever the locale
        # spawn, not fork: the caller may hold torch/OpenMP threads, and a forked child can deadlock on them
        pool = stack.enter_context(mp.get_context("spawn").Pool(workers)) if workers > 1 else None

        def write(result) -> None:
            chunk_text, nuc_text, prot_text, record_ids, n_chunks, n_frames, n_bases = result
            for fh, text in zip(handles, (chunk_text, nuc_text, prot_text)):
                fh.write(text)
            ids.extend(record_ids)
            stats.records += len(record_ids)
            stats.chunks += n_chunks
            stats.frames += n_frames
            stats.bases += n_bases
            if progress is not None:
                progress(stats)

        # Blocks are read here and parsed and translated in the pool, a bounded number in flight;
        # results are written in input order.
        in_flight: collections.deque = collections.deque()
        try:
            for block in blocks:
                if pool is None:
                    write(_process_block(block))
                    continue
                in_flight.append(pool.apply_async(_process_block, (block,)))
                while len(in_flight) > 2 * workers:
                    write(in_flight.popleft().get())
            while in_flight:
                write(in_flight.popleft().get())
        except BlockRejected as error:
            _settle(in_flight)
            _raise_input_error(input_fasta, error)
        except BaseException:
            _settle(in_flight)
            raise
        if stats.records == 0:
            _raise_input_error(input_fasta, "no records")
        check_unique_ids(input_fasta, ids)
        for fh in handles:
            fh.close()
    log.info("prepared %d chunks and %d frames from %s", stats.chunks, stats.frames, input_fasta)
    return stats
