"""The fingerprint of a run: what its parts depend on (input, chunk length, models, numerics).

Stored in OUT/run_manifest.json and in every part file. A rerun with the same fingerprint resumes;
a different one is refused unless --force, so parts of two different runs never get merged.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from ..atomic import atomic_open
from ..errors import VirnucError
from .shard import PART_LAYOUT

MANIFEST = "run_manifest.json"
MODEL_FACTS = ("esm2", "dnabert_s")
MODEL_FILE_SUFFIXES = (".json", ".bin", ".safetensors", ".txt")  # the files of a model folder that are identified
EARLIER_MODEL_FILE_SUFFIXES = (".json", ".bin", ".safetensors")  # those virnuc-ds until 2026-11-29 listed


def file_digest(path: str | os.PathLike, block: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(block):
            h.update(chunk)
    return h.hexdigest()


def content_sample_digest(path: Path, edge: int = 1 << 20, samples: int = 64, sample: int = 1 << 16) -> str:
    """sha256 of a file's size, its first and last MiB and 64 blocks of 64 KiB spread evenly between:
    tells model files apart in milliseconds (another seed, a fine-tune: every tensor differs), where
    hashing a 5.7 GB checkpoint on a shared file system would take a minute."""
    size = path.stat().st_size
    h = hashlib.sha256(str(size).encode())
    with open(path, "rb") as fh:
        offsets = [0, *(size * k // (samples + 1) for k in range(1, samples + 1)), max(0, size - edge)]
        for k, offset in enumerate(offsets):
            fh.seek(offset)
            h.update(fh.read(edge if k in (0, len(offsets) - 1) else sample))
    return h.hexdigest()[:16]


def model_identity(path: str) -> dict:
    """Where a model is and what it is; only what it is enters the fingerprint, so the same files
    copied elsewhere (e.g. to a node's scratch disk in each job of a resumed run) resume the run."""
    p = Path(path)
    if p.is_dir():
        files = sorted(f for f in p.iterdir() if f.is_file() and f.suffix in MODEL_FILE_SUFFIXES)
        return {"path": str(p), "files": {f.name: content_sample_digest(f) for f in files}}
    if p.exists():
        return {"path": str(p), "content": content_sample_digest(p)}
    return {"path": str(path)}


def _without_model_paths(facts: dict) -> dict:
    """The facts a part's numbers depend on: a model's path is recorded, not compared."""
    return {k: ({kk: vv for kk, vv in v.items() if kk != "path"} if k in MODEL_FACTS and isinstance(v, dict) else v)
            for k, v in facts.items()}


def run_fingerprint(input_digest: str, cfg, esm2_path: str, dnabert_path: str, dtypes: dict) -> tuple[str, dict]:
    """(short hash, the facts hashed): everything that changes a part's numbers."""
    facts = {
        "input_sha256": input_digest,
        "expected_length": cfg.prepare.expected_length,
        "esm2": model_identity(esm2_path),
        "dnabert_s": model_identity(dnabert_path),
        # what runs, not what was asked for: on a CPU the kernels are never used
        "esm2_engine": f"deepspeed-{cfg.esm2.attention}" if dtypes.get("kernels") else "eager",
        "dtypes": dtypes,
        "max_residues": cfg.esm2.max_residues,
        "frames_per_part": cfg.run.frames_per_part,
        "part_layout": PART_LAYOUT,
    }
    digest = hashlib.sha256(json.dumps(_without_model_paths(facts), sort_keys=True).encode()).hexdigest()[:16]
    return digest, facts


def _same_as_earlier_identity(old_facts: dict, facts: dict) -> bool:
    """A manifest written before models were identified by content (virnuc-ds until 2026-11-29) named
    them by path and size: the same files at the same path, and every other fact equal, are the same
    run, so its parts (which carry its fingerprint) resume."""
    if any(old_facts.get(k) != facts.get(k) for k in facts if k not in MODEL_FACTS):
        return False
    for key in MODEL_FACTS:
        old, path = old_facts.get(key, {}), Path(facts[key].get("path", ""))
        if not isinstance(old, dict) or old.get("path") != str(path):
            return False
        if "size" in old:
            if not path.is_file() or path.stat().st_size != old["size"]:
                return False
        elif isinstance(old.get("files"), dict) and path.is_dir():
            sizes = {f.name: f.stat().st_size for f in path.iterdir()
                     if f.is_file() and f.suffix in EARLIER_MODEL_FILE_SUFFIXES}
            if sizes != old["files"]:
                return False
        else:
            return False
    return True


def check_or_write_manifest(output_dir: Path, fingerprint: str, facts: dict, force: bool,
                            has_results: bool = True) -> tuple[str, bool]:
    """Refuse a folder whose results (parts or more) belong to another setup (unless --force); record this
    run's setup. Returns (the run's fingerprint, replaced): the folder's own where its manifest is of
    an earlier virnuc-ds and describes this setup; replaced is True when an earlier setup's manifest
    was replaced as it had no finished work to lose (e.g. its run failed while loading a model that
    has been fixed since)."""
    path = Path(output_dir) / MANIFEST
    replaced = False
    if path.exists() and not force:
        try:
            old = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            old = {}
        if old.get("fingerprint") != fingerprint:
            if old.get("fingerprint") and _same_as_earlier_identity(old.get("facts", {}), facts):
                return old["fingerprint"], False
            before, now = _without_model_paths(old.get("facts", {})), _without_model_paths(facts)
            changed = sorted(k for k in now if before.get(k) != now[k])
            if has_results:
                raise VirnucError(
                    f"{output_dir} holds a run with another {', '.join(changed) or 'setup'}; "
                    "use another --output-dir, or --force to discard its results"
                )
            replaced = True
        elif old.get("facts") == facts:
            return fingerprint, False
        # else the same models found at another path: the manifest records where they are now
    with atomic_open(path) as fh:
        json.dump({"fingerprint": fingerprint, "facts": facts}, fh, indent=2)
    return fingerprint, replaced
