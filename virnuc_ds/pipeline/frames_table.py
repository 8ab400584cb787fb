"""The prepared frames as parallel lists (ids, nucleotides, proteins), read from prepare's FASTA files."""

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


def read_frames_table(prep_dir: str | Path) -> FramesTable:
    prep_dir = Path(prep_dir)
    nuc = [(r.id, r.sequence) for r in read_fasta(prep_dir / NUCLEOTIDE_FASTA, allow_empty_file=True)]
    prot = [(r.id, r.sequence) for r in read_fasta(prep_dir / PROTEIN_FASTA, allow_empty_file=True)]
    if [i for i, _ in nuc] != [i for i, _ in prot]:
        raise IncompleteError(f"{prep_dir}: {NUCLEOTIDE_FASTA} and {PROTEIN_FASTA} list different frames; rerun with --force")
    return FramesTable([i for i, _ in nuc], [s for _, s in nuc], [s for _, s in prot])
