"""The pooled-embedding store: one HDF5 layout for every embedding file the tool writes.

Layout (h5py, one file):
  ids        [N]        UTF-8 variable-length strings, frame ids in frame order
  dnabert_s  [N, 768]   float32, DNABERT-S mean of the last hidden state
  esm2       [N, 2560]  float32, ESM-2 mean of the last layer over residues
  attrs: format ("virnuc-ds embeddings"), format_version, dnabert_s_model, esm2_model, dtype
         (the compute dtype of the models), virnuc_ds_version
Datasets are chunked by rows (ROWS_PER_CHUNK) and not compressed: pooled embeddings are dense floats
that compress by a few percent at most, and uncompressed rows read fastest for the classifier.
Rank-local part files use the same layout with a subset of rows.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np

from ..atomic import atomic_path
from ..errors import InputError
from ..version import __version__

FORMAT = "virnuc-ds embeddings"
FORMAT_VERSION = 1
ROWS_PER_CHUNK = 1024
EMBEDDING_DATASETS = ("dnabert_s", "esm2")
UTF8_STRING = h5py.string_dtype(encoding="utf-8")


@dataclass
class Embeddings:
    """Pooled embeddings of N frames, rows aligned with ids."""

    ids: list[str]
    dnabert_s: np.ndarray  # [N, H_dna] float32
    esm2: np.ndarray  # [N, H_esm] float32
    attrs: dict = field(default_factory=dict)

    def __post_init__(self):
        self.dnabert_s = np.asarray(self.dnabert_s, dtype=np.float32)
        self.esm2 = np.asarray(self.esm2, dtype=np.float32)
        n = len(self.ids)
        if self.dnabert_s.ndim != 2 or self.esm2.ndim != 2 or self.dnabert_s.shape[0] != n or self.esm2.shape[0] != n:
            raise ValueError(
                f"embeddings do not line up: {n} ids, dnabert_s {self.dnabert_s.shape}, esm2 {self.esm2.shape}"
            )

    def __len__(self) -> int:
        return len(self.ids)

    def features(self) -> np.ndarray:
        """The classifier's input: concat(DNABERT-S, ESM-2) per frame, [N, H_dna + H_esm] float32."""
        return np.concatenate([self.dnabert_s, self.esm2], axis=1)


def finite_rows(dnabert_s: np.ndarray, esm2: np.ndarray) -> np.ndarray:
    """[N] bool: the frames whose DNABERT-S and ESM-2 embeddings are all finite."""
    return np.isfinite(dnabert_s).all(1) & np.isfinite(esm2).all(1)


def write_embeddings(path: str | os.PathLike, emb: Embeddings, **attrs) -> None:
    """Write atomically: the file appears complete under its name, or not at all."""
    merged = {"format": FORMAT, "format_version": FORMAT_VERSION, "virnuc_ds_version": __version__}
    merged.update(emb.attrs)
    merged.update(attrs)
    with atomic_path(path) as tmp:
        with h5py.File(tmp, "w") as f:
            n = len(emb)
            f.create_dataset("ids", data=np.array(emb.ids, dtype=object), dtype=UTF8_STRING)
            for name in EMBEDDING_DATASETS:
                data = getattr(emb, name)
                f.create_dataset(
                    name,
                    data=data,
                    dtype="float32",
                    chunks=(max(1, min(n, ROWS_PER_CHUNK)), data.shape[1]) if n else None,
                )
            for k, v in merged.items():
                f.attrs[k] = "" if v is None else v


def read_embeddings(path: str | os.PathLike) -> Embeddings:
    """Read a store written by write_embeddings; InputError if it is not one."""
    path = Path(path)
    if not path.exists():
        raise InputError(path, "file not found")
    try:
        with h5py.File(path, "r") as f:
            missing = [k for k in ("ids", *EMBEDDING_DATASETS) if k not in f]
            if missing:
                raise InputError(path, f"not a virnuc-ds embeddings file (missing datasets {', '.join(missing)})")
            ids = [s.decode("utf-8") if isinstance(s, bytes) else str(s) for s in f["ids"][()]]
            dnabert = f["dnabert_s"][()]
            esm = f["esm2"][()]
            attrs = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in f.attrs.items()}
    except OSError as exc:
        raise InputError(path, f"not a readable HDF5 file ({exc})") from None
    try:
        return Embeddings(ids, dnabert, esm, attrs)
    except ValueError as exc:
        raise InputError(path, str(exc)) from None
