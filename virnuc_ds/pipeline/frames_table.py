"""The prepared frames as parallel lists (ids, nucleotides, proteins), read from prepare's FASTA files.

prepare writes each record as exactly two lines (`>id`, sequence); such files are read with one
split, ~10x faster than the general FASTA reader that every other file goes through.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import IncompleteError
from ..fasta import read_fasta
from ..prep.prepare import NUCLEOTIDE_FASTA, PROTEIN_FASTA


@dataclass
class FramesTable:
    ids: list[str]
    nucleotides: list[str]
    proteins: list[str]

    def __len__(self) -> int:
        return len(self.ids)

    def protein_lengths(self) -> np.ndarray:
        return np.fromiter((len(p) for p in self.proteins), dtype=np.int64, count=len(self.proteins))


def read_prepared_fasta(path: Path) -> tuple[list[str], list[str]]:
    """(ids, sequences) of a FASTA file written by prepare (two lines a record); any other layout
    goes through the general reader."""
    lines = path.read_text().split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    headers, sequences = lines[0::2], lines[1::2]
    if len(headers) == len(sequences) and all(h[:1] == ">" and " " not in h and "\t" not in h for h in headers) \
            and not any(s[:1] == ">" for s in sequences):
        return [h[1:] for h in headers], sequences
    records = [(r.id, r.sequence) for r in read_fasta(path, allow_empty_file=True)]
    return [i for i, _ in records], [s for _, s in records]


def read_frame_ids(prep_dir: str | Path) -> list[str]:
    return read_prepared_fasta(Path(prep_dir) / PROTEIN_FASTA)[0]


def read_frames_table(prep_dir: str | Path) -> FramesTable:
    prep_dir = Path(prep_dir)
    nuc_ids, nucleotides = read_prepared_fasta(prep_dir / NUCLEOTIDE_FASTA)
    prot_ids, proteins = read_prepared_fasta(prep_dir / PROTEIN_FASTA)
    if nuc_ids != prot_ids:
        raise IncompleteError(f"{prep_dir}: {NUCLEOTIDE_FASTA} and {PROTEIN_FASTA} list different frames; rerun with --force")
    return FramesTable(nuc_ids, nucleotides, proteins)
