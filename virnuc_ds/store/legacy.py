"""Import the original VirNucPro's embedding files so work already paid for is kept.

Formats (torch.save pickles):
  *_DNABERT_S.pt  {'nucleotide': [ids], 'data': [{'label': id, 'mean_representation': [768 floats]}]}
  *_ESM.pt        {'proteins': [ids], 'data': [tensor(2560)]}
  *_merged.pt     {'ids': [ids], 'data': tensor[N, 3328]}   (DNABERT-S first, then ESM-2)
Rows follow the DNABERT-S file's order, as the original's merge step does.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from ..errors import InputError, first_line
from .embeddings import Embeddings

DNABERT_S_DIM = 768


def _load(path: str | os.PathLike, keys: tuple[str, str]) -> dict:
    path = Path(path)
    if not path.exists():
        raise InputError(path, "file not found")
    try:
        # weights_only: these files hold only lists, dicts, floats and tensors, so no code runs.
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises many types for a bad pickle
        raise InputError(path, f"not a readable torch file ({first_line(exc)})") from None
    if not isinstance(obj, dict) or any(k not in obj for k in keys):
        raise InputError(path, f"not an original VirNucPro file (expected a dict with keys {keys})")
    if len(obj[keys[0]]) != len(obj[keys[1]]):
        raise InputError(path, f"{len(obj[keys[0]])} ids but {len(obj[keys[1]])} rows")
    return obj


def _check_unique(path, ids) -> None:
    seen = set()
    for i in ids:
        if i in seen:
            raise InputError(path, "duplicate id", record=i)
        seen.add(i)


def read_legacy_dnabert_s(path) -> tuple[list[str], np.ndarray]:
    obj = _load(path, ("nucleotide", "data"))
    ids = [str(i) for i in obj["nucleotide"]]
    rows = []
    for rid, item in zip(ids, obj["data"]):
        if not isinstance(item, dict) or "mean_representation" not in item:
            raise InputError(path, "entry has no 'mean_representation'", record=rid)
        if item.get("label", rid) != rid:
            raise InputError(path, f"label {item.get('label')!r} differs from the id list", record=rid)
        rows.append(np.asarray(item["mean_representation"], dtype=np.float32).reshape(-1))
    _check_unique(path, ids)
    return ids, _stack(path, ids, rows)


def read_legacy_esm(path) -> tuple[list[str], np.ndarray]:
    obj = _load(path, ("proteins", "data"))
    ids = [str(i) for i in obj["proteins"]]
    rows = [np.asarray(torch.as_tensor(t, dtype=torch.float32).reshape(-1).numpy()) for t in obj["data"]]
    _check_unique(path, ids)
    return ids, _stack(path, ids, rows)


def read_legacy_merged(path, dnabert_dim: int = DNABERT_S_DIM) -> Embeddings:
    obj = _load(path, ("ids", "data"))
    ids = [str(i) for i in obj["ids"]]
    data = torch.as_tensor(obj["data"], dtype=torch.float32).numpy()
    if data.ndim != 2 or data.shape[1] <= dnabert_dim:
        raise InputError(path, f"'data' has shape {tuple(data.shape)}, expected [N, {dnabert_dim} + ESM width]")
    _check_unique(path, ids)
    return Embeddings(ids, data[:, :dnabert_dim], data[:, dnabert_dim:], {"source": "legacy merged"})


def _stack(path, ids, rows) -> np.ndarray:
    if not rows:
        raise InputError(path, "holds no embeddings")
    widths = {r.shape[0] for r in rows}
    if len(widths) != 1:
        bad = next(i for i, r in zip(ids, rows) if r.shape[0] != rows[0].shape[0])
        raise InputError(path, f"embedding widths differ ({sorted(widths)})", record=bad)
    return np.stack(rows)


def import_legacy(dnabert_path, esm_path) -> Embeddings:
    """Join a DNABERT-S file and an ESM file by id, in the DNABERT-S file's order."""
    dna_ids, dna = read_legacy_dnabert_s(dnabert_path)
    esm_ids, esm = read_legacy_esm(esm_path)
    esm_row = {i: k for k, i in enumerate(esm_ids)}
    missing = [i for i in dna_ids if i not in esm_row]
    if missing:
        raise InputError(esm_path, f"{len(missing)} ids of {dnabert_path} are missing, e.g. {missing[0]!r}")
    extra = set(esm_ids) - set(dna_ids)
    if extra:
        raise InputError(dnabert_path, f"{len(extra)} ids of {esm_path} are missing, e.g. {sorted(extra)[0]!r}")
    order = np.array([esm_row[i] for i in dna_ids], dtype=np.int64)
    return Embeddings(
        dna_ids, dna, esm[order], {"source": f"legacy import of {Path(dnabert_path).name} + {Path(esm_path).name}"}
    )
