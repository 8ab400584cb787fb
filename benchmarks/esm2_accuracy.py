"""ESM-2 pooled-embedding accuracy of the fast paths against fp32 fair-esm on the same weights.

Per protein: cosine similarity and relative L2 (||fast - fp32|| / ||fp32||) of the pooled
embedding (mean over residue positions 1..len, no BOS/EOS). Sets: a sample of each throughput
workload, plus proteins at the original's limit (1022 aa) in `mixed` and alone as `long1022`.
Configurations (whichever are given):
  eager-bf16              fair-esm cast to bf16 as is (its rotary inv_freq is cast too)
  eager-bf16-rotary-fp32  the same with fp32 rotary tables (virnuc_ds.embed.esm2's eager engine)
  deepspeed-bf16          virnuc_ds.embed.esm2_kernels (the product's default)
  fp32-tanh-gelu          fp32 fair-esm with the kernels' tanh GELU: that approximation's own effect
Gates (DESIGN.md): min cosine >= 0.9999 and relative L2 <= 1e-2 for bf16 against fp32.

Usually run from esm2_throughput.py (one process, one model); standalone:
    python benchmarks/esm2_accuracy.py --out benchmarks/results [--small]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import math
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import (ESM2_3B, Tokenizer, cosine_and_rel_l2, environment,  # noqa: E402
                               git_commit, long_proteins, make_workload, mean_over_residues,
                               plan_batches, write_json)

COSINE_GATE, REL_L2_GATE = 0.9999, 1e-2
SAMPLE = {"chunk500": 128, "read150": 128, "mixed": 96}
LONG_COUNT = 6


def accuracy_sets(sample=SAMPLE, long_count=LONG_COUNT) -> dict[str, list[str]]:
    """The first proteins of each throughput workload (so fp32 runs overlap), plus 1022-aa ones."""
    sets = {name: make_workload(name).proteins[:count] for name, count in sample.items()}
    long = long_proteins(long_count)
    sets["mixed"] = sets["mixed"] + long[: long_count // 2]
    sets["long1022"] = long
    return sets


@torch.inference_mode()
def pooled_embeddings(encode, tokenizer, proteins, toks_per_batch: int) -> torch.Tensor:
    """[N, E] fp32 on CPU, input order."""
    lengths = [len(p) + 2 for p in proteins]
    out = None
    for batch in plan_batches(lengths, toks_per_batch):
        tokens, counts = tokenizer([proteins[i] for i in batch])
        reps = encode(tokens.cuda())
        pooled = mean_over_residues(reps, counts).cpu()
        if out is None:
            out = torch.empty(len(proteins), pooled.shape[1])
        out[torch.from_numpy(batch)] = pooled
    return out


def fair_esm_encoder(model):
    last = model.num_layers

    def encode(tokens):
        return model(tokens, repr_layers=[last])["representations"][last]

    return encode


@contextlib.contextmanager
def tanh_gelu():
    """fair-esm's layers call esm.modules.gelu: swap in the tanh form the kernels use."""
    import esm.modules

    erf_gelu = esm.modules.gelu
    esm.modules.gelu = lambda x: torch.nn.functional.gelu(x, approximate="tanh")
    try:
        yield
    finally:
        esm.modules.gelu = erf_gelu


def summarise(cosine: np.ndarray, rel_l2: np.ndarray, lengths) -> dict:
    worst = int(np.argmin(cosine))
    return {"n": int(len(cosine)), "min_cosine": float(cosine.min()),
            "mean_cosine": float(cosine.mean()), "max_rel_l2": float(rel_l2.max()),
            "median_rel_l2": float(np.median(rel_l2)), "worst_length_aa": int(lengths[worst]),
            "passes_gates": bool(cosine.min() >= COSINE_GATE and rel_l2.max() <= REL_L2_GATE)}


def run_accuracy(fp32_model, alphabet, fast: dict, sets=None, *, fp32_toks=8192,
                 fast_toks=65536, tanh_sample=64, reference_cache=None, log=print) -> dict:
    """fast: {configuration: encode(tokens) -> reps}. Returns {set: {config: summary}} plus the
    per-protein arrays under '_per_protein'. reference_cache: a dict keeping the fp32 pooled
    embeddings per set between calls on the same model and sets."""
    tokenizer = Tokenizer(alphabet)
    sets = accuracy_sets() if sets is None else sets
    results, per_protein = {}, {}
    for set_name, proteins in sets.items():
        lengths = [len(p) for p in proteins]
        cache = {} if reference_cache is None else reference_cache
        if set_name not in cache:
            cache[set_name] = pooled_embeddings(fair_esm_encoder(fp32_model), tokenizer, proteins,
                                                fp32_toks)
        ref = cache[set_name]
        results[set_name], per_protein[set_name] = {}, {"length_aa": lengths}
        runs = {name: (encode, fast_toks, proteins) for name, encode in fast.items()}
        if tanh_sample:
            runs["fp32-tanh-gelu"] = (fair_esm_encoder(fp32_model), fp32_toks,
                                      proteins[:tanh_sample])
        for name, (encode, toks, subset) in runs.items():
            with tanh_gelu() if name == "fp32-tanh-gelu" else contextlib.nullcontext():
                test = pooled_embeddings(encode, tokenizer, subset, toks)
            cosine, rel_l2 = cosine_and_rel_l2(test, ref[: len(subset)])
            results[set_name][name] = summarise(cosine, rel_l2, lengths)
            per_protein[set_name][name] = {"cosine": cosine.tolist(), "rel_l2": rel_l2.tolist()}
            s = results[set_name][name]
            log(f"accuracy {set_name:9s} {name:24s} n={s['n']:4d} min cos {s['min_cosine']:.7f} "
                f"max relL2 {s['max_rel_l2']:.2e} (worst at {s['worst_length_aa']} aa)")
        per_protein[set_name]["fp32_pooled_norm"] = ref.norm(dim=1).tolist()
    results["_per_protein"] = per_protein
    return results


def build_models(small: bool, device="cuda"):
    import esm

    torch.manual_seed(0)
    alphabet = esm.data.Alphabet.from_architecture("ESM-1b")
    arch = {"num_layers": 6, "embed_dim": 320, "attention_heads": 5} if small else ESM2_3B
    with torch.device(device):
        model = esm.model.esm2.ESM2(alphabet=alphabet, **arch).eval().requires_grad_(False)
    return model, alphabet, arch


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--small", action="store_true", help="6-layer 320-wide model (smoke test)")
    args = parser.parse_args(argv)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    from virnuc_ds.embed.esm2_kernels import build_kernel_encoder

    model, alphabet, arch = build_models(args.small)
    bf16 = copy.deepcopy(model).to(torch.bfloat16)
    fast = {"eager-bf16": fair_esm_encoder(bf16),
            "deepspeed-bf16": build_kernel_encoder(model, alphabet, dtype=torch.bfloat16,
                                                   max_tokens=65536)}
    results = run_accuracy(model, alphabet, fast)
    write_json(args.out / "esm2_accuracy.json",
               {"model": arch, "commit": git_commit(), **environment(), "results": results})
    worst = min(s["min_cosine"] for k, v in results.items() if not k.startswith("_")
                for name, s in v.items() if name == "deepspeed-bf16")
    print(f"deepspeed-bf16 min cosine over all sets: {worst:.7f}")
    return 0 if worst >= COSINE_GATE and math.isfinite(worst) else 1


if __name__ == "__main__":
    sys.exit(main())
