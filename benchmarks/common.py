"""Shared pieces of the ESM-2 benchmarks: workloads, batching, tokens, pooling, timing, metadata.

Workloads are random proteins (20 standard amino acids, seeded) whose lengths follow the
product's inputs: `chunk500` (proteins of 500-bp chunks, 100-166 aa), `read150` (proteins of
150-bp reads, 48-50 aa), `mixed` (30-1000 aa, uniform). The weights are random too (fair-esm's
own init), so only shapes matter; the arithmetic is the real model's.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

AMINO_ACIDS = np.frombuffer(b"ACDEFGHIKLMNPQRSTVWY", dtype=np.uint8)
REPO = Path(__file__).resolve().parents[1]

WORKLOADS = {  # name: (min residues, max residues, proteins in the throughput set)
    "chunk500": (100, 166, 3000),
    "read150": (48, 50, 6000),
    "mixed": (30, 1000, 600),
}

# ESM-2 3B, the product's model (fair-esm esm2_t36_3B_UR50D architecture)
ESM2_3B = {"num_layers": 36, "embed_dim": 2560, "attention_heads": 40}


@dataclass
class Workload:
    name: str
    proteins: list[str]

    @property
    def lengths(self) -> np.ndarray:
        return np.array([len(p) for p in self.proteins], dtype=np.int64)


def make_workload(name: str, count: int | None = None, seed: int = 0) -> Workload:
    low, high, default_count = WORKLOADS[name]
    rng = np.random.default_rng([seed, sum(map(ord, name))])
    count = default_count if count is None else count
    lengths = rng.integers(low, high + 1, size=count)
    proteins = [AMINO_ACIDS[rng.integers(0, 20, size=n)].tobytes().decode() for n in lengths]
    return Workload(name, proteins)


def long_proteins(count: int, length: int = 1022, seed: int = 1) -> list[str]:
    """Proteins at the original's limit (1022 aa + BOS + EOS = 1024 tokens)."""
    rng = np.random.default_rng([seed, length])
    return [AMINO_ACIDS[rng.integers(0, 20, size=length)].tobytes().decode() for _ in range(count)]


# the product's own batching, so benchmarks time the batches the runner makes
from virnuc_ds.embed.esm2 import plan_token_batches as plan_batches  # noqa: E402,F401


class Tokenizer:
    """fair-esm's BatchConverter output (BOS, residues, EOS, right padding), vectorised."""

    def __init__(self, alphabet):
        self.alphabet = alphabet
        self.lookup = np.full(256, -1, dtype=np.int64)
        for token, index in alphabet.tok_to_idx.items():
            if len(token) == 1:
                self.lookup[ord(token)] = index

    def __call__(self, proteins) -> tuple[torch.Tensor, torch.Tensor]:
        """(tokens [B, T] int64, residue counts [B] int64)."""
        counts = np.array([len(p) for p in proteins], dtype=np.int64)
        tokens = np.full((len(proteins), int(counts.max()) + 2), self.alphabet.padding_idx,
                         dtype=np.int64)
        tokens[:, 0] = self.alphabet.cls_idx
        for row, protein in enumerate(proteins):
            tokens[row, 1:len(protein) + 1] = self.lookup[np.frombuffer(protein.encode(), np.uint8)]
            tokens[row, len(protein) + 1] = self.alphabet.eos_idx
        return torch.from_numpy(tokens), torch.from_numpy(counts)


def mean_over_residues(reps: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """reps [B, T, E] -> [B, E] fp32: mean over positions 1..count (no BOS/EOS/padding)."""
    positions = torch.arange(reps.shape[1], device=reps.device)
    counts = counts.to(reps.device)
    keep = (positions >= 1) & (positions <= counts[:, None])  # [B, T]
    summed = reps.masked_fill(~keep[..., None], 0.0).sum(dim=1, dtype=torch.float32)
    return summed / counts[:, None].float()


def esm2_flops(token_counts, num_layers: int, embed_dim: int) -> float:
    """Useful FLOPs of ESM-2 over sequences of T tokens each (padding not counted): per layer and
    token 24 E^2 (qkv 6E^2, out 2E^2, fc1 8E^2, fc2 8E^2), plus attention 4 T E per token."""
    t = np.asarray(token_counts, dtype=np.float64)
    return float(num_layers * (24.0 * embed_dim**2 * t.sum() + 4.0 * embed_dim * (t * t).sum()))


def cosine_and_rel_l2(test: torch.Tensor, ref: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Per row: cosine similarity and ||test - ref|| / ||ref||, computed in float64."""
    test, ref = test.double(), ref.double()
    cosine = torch.nn.functional.cosine_similarity(test, ref, dim=1)
    rel_l2 = (test - ref).norm(dim=1) / ref.norm(dim=1)
    return cosine.numpy(), rel_l2.numpy()


def matmul_peak_tflops(n: int = 8192, repeats: int = 10) -> float:
    """bf16 n^3 matrix product on random data, after warm-up: the ceiling used for % of peak."""
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        a @ b
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return 2 * n**3 / float(np.median(times)) / 1e12


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True)
        return out.stdout.strip() if out.returncode == 0 else "uncommitted (no HEAD)"
    except OSError:
        return "unknown (git not available)"


def environment() -> dict:
    versions = {"python": platform.python_version(), "torch": torch.__version__,
                "cuda": torch.version.cuda}
    for name in ("deepspeed", "esm", "transformers", "triton"):
        try:
            module = __import__(name)
            versions[name] = getattr(module, "__version__", "unknown")
        except Exception:  # noqa: BLE001 - a version report must not fail the benchmark
            versions[name] = None
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "none"
    return {"gpu": gpu, "versions": versions, "command": " ".join([sys.executable] + sys.argv),
            "host": platform.node(), "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "torch_cuda_arch_list": os.environ.get("TORCH_CUDA_ARCH_LIST")}


def write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, default=str) + "\n")
    tmp.replace(path)
