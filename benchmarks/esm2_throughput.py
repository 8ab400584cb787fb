"""ESM-2 3B throughput on one GPU, configurations side by side in one run, same random weights.

Configurations:
  original-fp32   fair-esm fp32 (no TF32), 2048 padded tokens a batch, as the original tool ran
  eager-bf16      fair-esm cast to bf16, 65536 padded tokens a batch
  deepspeed-bf16  virnuc_ds.embed.esm2_kernels: DeepSpeed v1 kernels, bf16, 65536 tokens a batch
Workloads (benchmarks/common.py): chunk500, read150, mixed. Batches are length-sorted, longest
first; tokenisation is done before timing (the product does it on CPU workers), the host-to-device
copy and the pooling are timed. original-fp32 is timed on an evenly spaced subset of the batches
(about --fp32-tokens tokens) to bound the run; the others on every batch. Tokens are real tokens
(residues + BOS + EOS), padding excluded. TFLOP/s counts useful FLOPs (common.esm2_flops) against
a bf16 8192^3 matrix product measured in the same run.

Also: pooled-embedding accuracy against fp32 (esm2_accuracy.py), a torch-profiler table of the
kernel path, and DNABERT-S (117M) bf16 batched against fp32 one sequence at a time.

    python benchmarks/esm2_throughput.py --out $OUT          # on the GPU machine
    python benchmarks/esm2_throughput.py --plot-only benchmarks/results/esm2_summary.json
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks import esm2_accuracy  # noqa: E402
from benchmarks.common import (WORKLOADS, Tokenizer, cosine_and_rel_l2,  # noqa: E402
                               environment, esm2_flops, git_commit, make_workload,
                               matmul_peak_tflops, mean_over_residues, plan_batches, write_json)

GIB = 2**30


def log(*parts):
    print(f"[{time.strftime('%H:%M:%S')}]", *parts, flush=True)


def param_bytes(module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def select_batches(batches, lengths, target_tokens):
    """Evenly spaced batches (across the length-sorted order) holding about target_tokens."""
    if not target_tokens:
        return list(range(len(batches)))
    total = sum(int(lengths[b].sum()) for b in batches)
    step = max(1, round(total / target_tokens))
    return list(range(step // 2, len(batches), step)) or [0]


@torch.inference_mode()
def time_config(encode, tokenizer, proteins, toks_per_batch, *, target_tokens=None):
    """Run one configuration over a workload. Returns (metrics, {protein index: pooled [E]})."""
    token_counts = np.array([len(p) + 2 for p in proteins])
    batches = plan_batches(token_counts, toks_per_batch)
    chosen = [batches[i] for i in select_batches(batches, token_counts, target_tokens)]
    prepared = []
    for idx in chosen:
        tokens, counts = tokenizer([proteins[i] for i in idx])
        prepared.append((idx, tokens.pin_memory(), counts.pin_memory()))
    # warm-up: the longest batch, untimed (cuBLAS heuristics, allocator, workspace layout)
    encode(prepared[0][1].cuda(non_blocking=True))
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    pooled = []
    started = time.perf_counter()
    for idx, tokens, counts in prepared:
        reps = encode(tokens.cuda(non_blocking=True))
        pooled.append(mean_over_residues(reps, counts.cuda(non_blocking=True)))
    torch.cuda.synchronize()
    elapsed = time.perf_counter() - started
    done = np.concatenate([idx for idx, _, _ in prepared])
    pooled = torch.cat(pooled).cpu()
    finite = bool(torch.isfinite(pooled).all())
    metrics = {"wall_s": elapsed, "proteins": int(len(done)), "batches": len(prepared),
               "batches_in_workload": len(batches), "tokens": int(token_counts[done].sum()),
               "padded_tokens": int(sum(t.numel() for _, t, _ in prepared)),
               "activation_peak_bytes": torch.cuda.max_memory_allocated() - base,
               "all_finite": finite}
    metrics["tokens_per_s"] = metrics["tokens"] / elapsed
    metrics["sequences_per_s"] = metrics["proteins"] / elapsed
    return metrics, dict(zip(done.tolist(), pooled))


def profile_kernels(encoders, tokenizer, proteins, out_dir: Path, batches=2):
    """torch profiler over a few chunk500 batches per configuration: kernel table + JSON."""
    from torch.profiler import ProfilerActivity, profile

    report = {}
    token_counts = np.array([len(p) + 2 for p in proteins])
    plan = plan_batches(token_counts, 65536)
    plan = plan[1:1 + batches] or plan[:batches]  # skip the longest (warm-up) batch if we can
    inputs = [tokenizer([proteins[i] for i in idx])[0].cuda() for idx in plan]
    for name, encode in encoders.items():
        with torch.inference_mode():
            encode(inputs[0])
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                for tokens in inputs:
                    encode(tokens)
                torch.cuda.synchronize()
        events = prof.key_averages()
        rows = []
        for e in events:
            device_us = getattr(e, "self_device_time_total", None)
            if device_us is None:
                device_us = getattr(e, "self_cuda_time_total", 0)
            if device_us:
                rows.append({"name": e.key, "self_device_us": float(device_us), "count": e.count})
        rows.sort(key=lambda r: -r["self_device_us"])
        total = sum(r["self_device_us"] for r in rows)
        for r in rows:
            r["share"] = r["self_device_us"] / total
        report[name] = {"tokens": int(sum(token_counts[idx].sum() for idx in plan)),
                        "device_us_total": total, "kernels": rows[:60]}
        try:
            table = events.table(sort_by="self_device_time_total", row_limit=40, max_name_column_width=90)
        except Exception:  # noqa: BLE001 - older key name
            table = events.table(sort_by="self_cuda_time_total", row_limit=40)
        (out_dir / f"esm2_profile_{name}.txt").write_text(table)
        log(f"profile {name}: {total / 1e3:.1f} ms device time over {len(plan)} batches; top:",
            ", ".join(f"{r['name'][:40]} {r['share']:.1%}" for r in rows[:6]))
    return report


@torch.inference_mode()
def bench_dnabert(peak_tflops, *, count=4000, fp32_count=400, device="cuda"):
    """DNABERT-S 117M: bf16 batched (65536 tokens) vs fp32 one sequence at a time (the original).
    Token ids are random (the BPE vocabulary's range), lengths as the product's inputs give them
    (about 5 bp a token): chunk500 frames 60-110 tokens, read150 frames 25-40 tokens."""
    try:
        from virnuc_ds.embed.dnabert_s import mean_over_tokens
        from virnuc_ds.models.dnabert_s import DnabertSConfig, DnabertSModel
    except ImportError as error:
        log(f"DNABERT-S skipped: {error}")
        return []
    config = DnabertSConfig()
    torch.manual_seed(0)
    with torch.device(device):
        fp32 = DnabertSModel(config).eval().requires_grad_(False)
    bf16 = copy.deepcopy(fp32).to(torch.bfloat16)
    H, I, L = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    records = []
    for workload, (low, high) in {"chunk500": (60, 110), "read150": (25, 40)}.items():
        rng = np.random.default_rng([7, low])
        lengths = rng.integers(low, high + 1, size=count)
        seqs = [np.concatenate([[1], rng.integers(5, config.vocab_size, size=n - 2), [2]])
                for n in lengths]

        def batch(rows):
            T = max(len(seqs[i]) for i in rows)
            ids = torch.full((len(rows), T), 3, dtype=torch.long)
            mask = torch.zeros((len(rows), T), dtype=torch.long)
            for r, i in enumerate(rows):
                ids[r, :len(seqs[i])] = torch.from_numpy(seqs[i])
                mask[r, :len(seqs[i])] = 1
            return ids.to(device, non_blocking=True), mask.to(device, non_blocking=True)

        def run(model, plan):
            prepared = [(rows, *batch(rows)) for rows in plan]
            model(*prepared[0][1:])
            torch.cuda.synchronize()
            out = {}
            started = time.perf_counter()
            for rows, ids, mask in prepared:
                pooled = mean_over_tokens(model(ids, mask), mask)
                out.update(zip(rows.tolist() if hasattr(rows, "tolist") else rows, pooled))
            torch.cuda.synchronize()
            return time.perf_counter() - started, out

        one_at_a_time = [np.array([i]) for i in range(fp32_count)]
        t32, ref = run(fp32, one_at_a_time)
        t16, fast = run(bf16, plan_batches(lengths, 65536))
        idx = list(range(fp32_count))
        cosine, rel_l2 = cosine_and_rel_l2(torch.stack([fast[i].float().cpu() for i in idx]),
                                           torch.stack([ref[i].float().cpu() for i in idx]))
        for name, wall, n in (("dnabert-fp32-one-at-a-time", t32, fp32_count),
                              ("dnabert-bf16-batched", t16, count)):
            tokens = float(lengths[:n].sum())
            # per token and layer: 2 (H*3H + H*H + H*2I + I*H) = 8H^2 + 6HI; attention 4 T H
            flops = L * (8 * H * H + 6 * H * I) * tokens
            flops += L * 4 * H * float((lengths[:n].astype(np.float64) ** 2).sum())
            record = {"model": "DNABERT-S 117M (random init)", "workload": workload,
                      "configuration": name, "tokens_per_s": tokens / wall,
                      "sequences_per_s": n / wall, "tflops": flops / wall / 1e12,
                      "pct_of_bf16_peak": flops / wall / 1e12 / peak_tflops * 100,
                      "proteins": n, "tokens": int(tokens), "wall_s": wall,
                      "min_cosine_vs_fp32": 1.0 if "fp32" in name else float(cosine.min()),
                      "max_rel_l2_vs_fp32": 0.0 if "fp32" in name else float(rel_l2.max())}
            records.append(record)
            log(f"dnabert {workload:9s} {name:28s} {record['tokens_per_s']:12,.0f} tok/s "
                f"{record['sequences_per_s']:9,.0f} seq/s  min cos {record['min_cosine_vs_fp32']:.7f}")
    return records


def plot(summary: list[dict], path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    esm = [r for r in summary if r.get("model", "").startswith("ESM-2")]
    workloads = list(dict.fromkeys(r["workload"] for r in esm))
    configs = list(dict.fromkeys(r["configuration"] for r in esm))
    fig, ax = plt.subplots(figsize=(9, 4.8))
    width = 0.8 / len(configs)
    for j, config in enumerate(configs):
        values = [next((r["tokens_per_s"] for r in esm if r["workload"] == w
                        and r["configuration"] == config), 0) for w in workloads]
        bars = ax.bar(np.arange(len(workloads)) + (j - (len(configs) - 1) / 2) * width, values,
                      width, label=config)
        ax.bar_label(bars, labels=[f"{v / 1e3:.1f}k" for v in values], fontsize=8)
    roofline = esm[0].get("roofline_tokens_per_s")
    if roofline:
        ax.axhline(roofline, color="grey", ls="--", lw=1)
        ax.text(len(workloads) - 0.5, roofline, f"bf16 matmul roofline (chunk500) "
                f"{roofline / 1e3:.0f}k", ha="right", va="bottom", fontsize=8, color="grey")
    ax.set_xticks(np.arange(len(workloads)), workloads)
    ax.set_ylabel("tokens / s (one GPU)")
    first = esm[0]
    ax.set_title(f"{first['model']} on one {first['gpu']}, commit {first['commit'][:10]}",
                 fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=130)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--small", action="store_true", help="6-layer 320-wide model (smoke test)")
    parser.add_argument("--workloads", nargs="+", default=list(WORKLOADS))
    parser.add_argument("--toks-per-batch", type=int, default=65536)
    parser.add_argument("--fp32-tokens", type=int, default=40000,
                        help="tokens original-fp32 is timed on per workload (0: all)")
    parser.add_argument("--repeat", type=int, default=2, help="timed runs of the bf16 configs "
                        "on chunk500 (the spread is reported)")
    parser.add_argument("--no-accuracy", action="store_true")
    parser.add_argument("--no-profile", action="store_true")
    parser.add_argument("--no-dnabert", action="store_true")
    parser.add_argument("--no-sdpa", action="store_true", help="skip deepspeed-bf16-sdpa")
    parser.add_argument("--plot-only", type=Path, help="redraw the chart from a summary JSON")
    args = parser.parse_args(argv)
    if args.plot_only:
        plot(json.loads(args.plot_only.read_text()), args.plot_only.with_name("esm2_throughput.png"))
        return 0

    args.out.mkdir(parents=True, exist_ok=True)
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32, as in the original tool
    torch.backends.cudnn.allow_tf32 = False
    from virnuc_ds.embed.esm2_kernels import build_kernel_encoder, prebuild_inference_op

    env, commit = environment(), git_commit()
    log("environment", json.dumps(env))
    started = time.perf_counter()
    prebuild_inference_op()
    op_build_s = time.perf_counter() - started
    log(f"transformer_inference op ready in {op_build_s:.1f} s")
    peak = matmul_peak_tflops()
    log(f"bf16 8192^3 matmul: {peak:.0f} TFLOP/s")

    model, alphabet, arch = esm2_accuracy.build_models(args.small)
    bf16 = copy.deepcopy(model).to(torch.bfloat16)
    started = time.perf_counter()
    kernels = build_kernel_encoder(model, alphabet, dtype=torch.bfloat16,
                                   max_tokens=args.toks_per_batch)
    kernel_build_s = time.perf_counter() - started
    log(f"kernel encoder built in {kernel_build_s:.1f} s: {json.dumps(kernels.memory)}")
    configs = {  # name: (encode, toks per batch, resident bytes of this configuration)
        "deepspeed-bf16": (kernels, args.toks_per_batch,
                           kernels.memory["weights_bytes"] + kernels.memory["workspace_bytes"]),
        "eager-bf16": (esm2_accuracy.fair_esm_encoder(bf16), args.toks_per_batch, param_bytes(bf16)),
        "original-fp32": (esm2_accuracy.fair_esm_encoder(model), 2048, param_bytes(model)),
    }
    if not args.no_sdpa:  # the same DeepSpeed layers with Triton rotary + torch SDPA attention
        try:
            sdpa = build_kernel_encoder(model, alphabet, dtype=torch.bfloat16,
                                        max_tokens=args.toks_per_batch, attention="sdpa")
            configs = {"deepspeed-bf16-sdpa": (sdpa, args.toks_per_batch,
                                               sdpa.memory["weights_bytes"]
                                               + kernels.memory["workspace_bytes"]), **configs}
            log(f"sdpa encoder built: {json.dumps(sdpa.memory)}")
        except Exception as error:  # noqa: BLE001 - an experiment must not stop the run
            log(f"deepspeed-bf16-sdpa not built: {type(error).__name__}: {error}")
    tokenizer = Tokenizer(alphabet)
    name_of_model = "ESM-2 3B (random init)" if not args.small else "ESM-2 small (random init)"
    E, L = arch["embed_dim"], arch["num_layers"]
    raw, records = {}, []
    for workload in args.workloads:
        proteins = make_workload(workload).proteins
        pooled = {}
        for name, (encode, toks, resident) in configs.items():
            target = args.fp32_tokens if name == "original-fp32" else None
            repeats = args.repeat if workload == "chunk500" and target is None else 1
            runs = []
            try:
                for _ in range(repeats):
                    metrics, pooled[name] = time_config(encode, tokenizer, proteins, toks,
                                                        target_tokens=target)
                    runs.append(metrics)
            except Exception as error:  # noqa: BLE001 - report it, keep the other configurations
                if name in ("deepspeed-bf16", "eager-bf16", "original-fp32"):
                    raise
                log(f"{workload} {name} failed: {type(error).__name__}: {error}")
                pooled.pop(name, None)
                continue
            metrics = max(runs, key=lambda m: m["tokens_per_s"])
            metrics["repeats_tokens_per_s"] = [m["tokens_per_s"] for m in runs]
            done = np.array(sorted(pooled[name]))
            lengths = np.array([len(proteins[i]) + 2 for i in done])
            metrics["tflops"] = esm2_flops(lengths, L, E) / metrics["wall_s"] / 1e12
            metrics["pct_of_bf16_peak"] = metrics["tflops"] / peak * 100
            metrics["peak_mem_gib"] = (resident + metrics["activation_peak_bytes"]) / GIB
            metrics["toks_per_batch"] = toks
            raw[f"{workload}/{name}"] = metrics
            log(f"{workload:9s} {name:15s} {metrics['tokens_per_s']:10,.0f} tok/s "
                f"{metrics['sequences_per_s']:8,.1f} seq/s {metrics['tflops']:6.1f} TFLOP/s "
                f"({metrics['pct_of_bf16_peak']:.0f}% peak) {metrics['peak_mem_gib']:.1f} GiB "
                f"runs {[round(r) for r in metrics['repeats_tokens_per_s']]}")
        # the fp32 subset also gives an accuracy check on the throughput runs themselves
        ref_idx = sorted(pooled["original-fp32"])
        ref = torch.stack([pooled["original-fp32"][i] for i in ref_idx])
        for name in pooled:
            test = torch.stack([pooled[name][i] for i in ref_idx])
            cosine, rel_l2 = cosine_and_rel_l2(test, ref)
            raw[f"{workload}/{name}"]["throughput_overlap_min_cosine"] = float(cosine.min())
            raw[f"{workload}/{name}"]["throughput_overlap_max_rel_l2"] = float(rel_l2.max())
        flops_per_token = esm2_flops([np.mean([len(p) + 2 for p in proteins])], L, E) / \
            np.mean([len(p) + 2 for p in proteins])
        for name in pooled:
            m = raw[f"{workload}/{name}"]
            records.append({
                "model": name_of_model, "workload": workload, "configuration": name,
                "tokens_per_s": m["tokens_per_s"], "sequences_per_s": m["sequences_per_s"],
                "tflops": m["tflops"], "pct_of_bf16_peak": m["pct_of_bf16_peak"],
                "bf16_peak_tflops": peak, "peak_mem_gib": m["peak_mem_gib"],
                "toks_per_batch": m["toks_per_batch"], "proteins_timed": m["proteins"],
                "tokens_timed": m["tokens"], "wall_s": m["wall_s"],
                "repeats_tokens_per_s": m["repeats_tokens_per_s"],
                "min_cosine_vs_fp32": None, "max_rel_l2_vs_fp32": None,
                "throughput_overlap_min_cosine": m["throughput_overlap_min_cosine"],
                "roofline_tokens_per_s": peak * 1e12 / flops_per_token,
                "gpu": env["gpu"], "commit": commit, "versions": env["versions"],
                "command": env["command"], "date_utc": env["date_utc"]})
    for r in records:
        base = {c: next(x["tokens_per_s"] for x in records if x["workload"] == r["workload"]
                        and x["configuration"] == c) for c in ("eager-bf16", "original-fp32")}
        r["speedup_vs_eager_bf16"] = r["tokens_per_s"] / base["eager-bf16"]
        r["speedup_vs_original_fp32"] = r["tokens_per_s"] / base["original-fp32"]
    write_json(args.out / "esm2_throughput_raw.json",
               {"model": arch, "commit": commit, **env, "op_build_s": op_build_s,
                "kernel_build_s": kernel_build_s, "kernel_memory": kernels.memory,
                "workspace_reallocations": kernels.workspace.reallocations,
                "bf16_peak_tflops": peak, "runs": raw})

    if not args.no_profile and "chunk500" in args.workloads:
        report = profile_kernels({name: configs[name][0] for name in configs
                                  if name != "original-fp32"},
                                 tokenizer, make_workload("chunk500").proteins, args.out)
        write_json(args.out / "esm2_profile.json", report)

    if not args.no_accuracy:
        fast = {name: configs[name][0] for name in configs if name != "original-fp32"}
        references = {}
        accuracy = esm2_accuracy.run_accuracy(model, alphabet, fast, reference_cache=references,
                                              log=log)
        try:  # the product's eager engine keeps fp32 rotary tables: measure that too
            from virnuc_ds.embed.esm2 import keep_rotary_tables_fp32

            keep_rotary_tables_fp32(bf16)
            extra = esm2_accuracy.run_accuracy(
                model, alphabet, {"eager-bf16-rotary-fp32": configs["eager-bf16"][0]},
                tanh_sample=0, reference_cache=references, log=log)
            for key, value in extra.items():
                if key != "_per_protein":
                    accuracy[key].update(value)
        except ImportError as error:
            log(f"eager-bf16-rotary-fp32 skipped: {error}")
        write_json(args.out / "esm2_accuracy.json",
                   {"model": arch, "commit": commit, **env, "results": accuracy})
        for r in records:
            if r["configuration"] == "original-fp32":
                r["min_cosine_vs_fp32"], r["max_rel_l2_vs_fp32"] = 1.0, 0.0  # the reference
                continue
            s = accuracy[r["workload"]].get(r["configuration"])
            if s is None:
                continue
            r["min_cosine_vs_fp32"], r["max_rel_l2_vs_fp32"] = s["min_cosine"], s["max_rel_l2"]
            r["accuracy_proteins"] = s["n"]
            if r["workload"] == "mixed":
                r["min_cosine_vs_fp32_long1022"] = \
                    accuracy["long1022"][r["configuration"]]["min_cosine"]

    if not args.no_dnabert:
        records += bench_dnabert(peak)
        for r in records:
            r.setdefault("gpu", env["gpu"])
            r.setdefault("commit", commit)
            r.setdefault("versions", env["versions"])
            r.setdefault("command", env["command"])
    write_json(args.out / "esm2_summary.json", records)
    try:
        plot(records, args.out / "esm2_throughput.png")
    except Exception as error:  # noqa: BLE001 - the chart can be redrawn with --plot-only
        log(f"chart not drawn: {error}")

    print("\nworkload  configuration                 tokens/s    seq/s  TFLOP/s  %peak  min cos   vs eager  vs fp32")
    for r in records:
        cos = r.get("min_cosine_vs_fp32")
        print(f"{r['workload']:9s} {r['configuration']:28s} {r['tokens_per_s']:9,.0f} "
              f"{r['sequences_per_s']:8,.0f} {r['tflops']:7.1f} {r['pct_of_bf16_peak']:5.1f} "
              f"{cos if cos is None else round(cos, 7)!s:9s} "
              f"{r.get('speedup_vs_eager_bf16', float('nan')):6.2f}x "
              f"{r.get('speedup_vs_original_fp32', float('nan')):6.1f}x")
    ok = all(math.isfinite(r["tokens_per_s"]) for r in records)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
