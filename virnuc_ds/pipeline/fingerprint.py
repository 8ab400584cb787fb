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


def file_digest(path: str | os.PathLike, block: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(block):
            h.update(chunk)
    return h.hexdigest()


def model_identity(path: str) -> dict:
    p = Path(path)
    if p.is_dir():
        files = sorted(f for f in p.iterdir() if f.is_file() and f.suffix in (".json", ".bin", ".safetensors"))
        return {"path": str(p), "files": {f.name: f.stat().st_size for f in files}}
    if p.exists():
        return {"path": str(p), "size": p.stat().st_size}
    return {"path": str(path)}


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
    digest = hashlib.sha256(json.dumps(facts, sort_keys=True).encode()).hexdigest()[:16]
    return digest, facts


def check_or_write_manifest(output_dir: Path, fingerprint: str, facts: dict, force: bool) -> None:
    path = Path(output_dir) / MANIFEST
    if path.exists() and not force:
        try:
            old = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            old = {}
        if old.get("fingerprint") != fingerprint:
            changed = sorted(k for k in facts if old.get("facts", {}).get(k) != facts[k])
            raise VirnucError(
                f"{output_dir} holds a run with another {', '.join(changed) or 'setup'}; "
                "use another --output-dir, or --force to discard its results"
            )
        return
    with atomic_open(path) as fh:
        json.dump({"fingerprint": fingerprint, "facts": facts}, fh, indent=2)
