"""End-to-end scaling of the whole pipeline under the DeepSpeed launcher, N = 1, 2, 4, 8 GPUs.

Real architectures with random weights, written to disk in the real formats and loaded through the
real loaders: ESM-2 3B (fair-esm checkpoint, fp16 like the published file), DNABERT-S 117M (model
folder with a BPE tokenizer), the VirNucPro classifier (pickled whole, as the original saves it).
A coding-rich sample is generated (sense codons on either strand, so frames survive as in real
data). Each N runs `deepspeed --num_gpus N --module virnuc_ds.run` on the same sample; the script
records wall time, the per-stage times of every rank (run_report.json), ESM-2 tokens/s, scaling
efficiency against N=1, the load balance (GPU time of each rank against the mean, and the idle
tail of the slowest rank), and per-frame cosine / label agreement against N=1.

    python benchmarks/scaling.py --gpus 1,2 --workload contigs500 --esm-seconds 60 --out OUTDIR
    # the issue's size (a 5-8 min ESM-2 stage on one GPU): write models and samples once, then run
    # jobs side by side on disjoint GPUs and cores, then combine (see benchmarks/NOTES.md):
    python benchmarks/scaling.py --setup-only --out $OUT/setup
    taskset -c 0-15  python benchmarks/scaling.py --gpus 1 --workload contigs500 --devices 0 --out $OUT/c1 &
    taskset -c 16-31 python benchmarks/scaling.py --gpus 1 --workload reads150 --devices 1 --out $OUT/r1 &
    ...; wait
    python benchmarks/scaling.py --combine $OUT/c1 $OUT/r1 ... --out $OUT/summary

Writes OUTDIR/scaling_raw.json, OUTDIR/scaling_summary.json (records: gpus, workload,
esm2_tokens_per_s, e2e_seconds, per-stage seconds, gpu, commit, ...) and OUTDIR/scaling.png.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SENSE = [a + b + c for a in "ACGT" for b in "ACGT" for c in "ACGT" if a + b + c not in ("TAA", "TAG", "TGA")]
WORKLOADS = {
    # name: (expected length, contig length range, approx ESM-2 tokens per input sequence)
    "contigs500": (500, (500, 3000), 175 * 1750 / 500),
    "reads150": (300, (150, 150), 75),  # ~1.45 frames of ~50 aa per read
}


def write_models(folder: Path, seed: int = 0, tiny: bool = False) -> dict:
    """ESM-2 3B, DNABERT-S 117M and the classifier, random weights, real formats (tiny: the demo
    models, to rehearse the benchmark on a CPU)."""
    if tiny:
        from virnuc_ds.demo import write_demo_models

        if not (folder / "demo.yaml").exists():
            write_demo_models(folder, seed=seed)
        from virnuc_ds.demo import DEMO_CLASSIFIER, DEMO_DNABERT_S

        esm = next(folder.glob("esm2*.pt"))
        return {"esm2": str(esm), "dnabert_s": str(folder / DEMO_DNABERT_S), "classifier": str(folder / DEMO_CLASSIFIER)}
    import argparse as ap

    import torch
    from esm.model.esm2 import ESM2

    from virnuc_ds.classify.mlp import MLPClassifier, save_original_style
    from virnuc_ds.models.demo import write_tiny_dnabert_s

    folder.mkdir(parents=True, exist_ok=True)
    esm_path = folder / "esm2_t36_3B_UR50D.pt"
    if not esm_path.exists():
        torch.manual_seed(seed)
        with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
            model = ESM2(num_layers=36, embed_dim=2560, attention_heads=40, alphabet="ESM-1b", token_dropout=True)
            with torch.no_grad():
                for name, p in model.named_parameters():
                    if "layer_norm" in name and name.endswith("weight"):
                        p.fill_(1.0)
                    else:
                        p.normal_(0, 0.02)
        state = {}
        for key, value in model.state_dict().items():
            if key.startswith("contact_head."):
                continue
            prefix = "encoder." if key.startswith("lm_head.") else "encoder.sentence_encoder."
            state[prefix + key] = value.half().cpu()
        cfg = ap.Namespace(_name="esm2", encoder_layers=36, encoder_embed_dim=2560, encoder_ffn_embed_dim=10240,
                           encoder_attention_heads=40, token_dropout=True, dropout=0.0, attention_dropout=0.0, max_positions=1024)
        torch.save({"model": state, "cfg": {"model": cfg}}, esm_path)
        del model, state
    dna = folder / "DNABERT-S"
    if not (dna / "config.json").exists():
        write_tiny_dnabert_s(dna, seed=seed, init_std=0.02, vocab_size=4096, hidden_size=768, num_hidden_layers=12,
                             num_attention_heads=12, intermediate_size=3072)
    clf = folder / "500_model.pth"
    if not clf.exists():
        torch.manual_seed(seed)
        save_original_style(MLPClassifier().eval(), clf)
    return {"esm2": str(esm_path), "dnabert_s": str(dna), "classifier": str(clf)}


def write_sample(path: Path, workload: str, target_tokens: float, seed: int = 1) -> int:
    _, (lo, hi), tokens_per_seq = WORKLOADS[workload]
    rng = np.random.default_rng(seed)
    n = int(target_tokens / tokens_per_seq) + 1
    comp = str.maketrans("ACGT", "TGCA")
    codons = np.array(SENSE)
    with open(path, "w") as fh:
        for i in range(n):
            length = int(rng.integers(lo, hi + 1))
            seq = "".join(codons[rng.integers(0, len(codons), size=length // 3 + 1)])[:length]
            if i % 2:
                seq = seq.translate(comp)[::-1]
            fh.write(f">{workload}_{i}\n{seq}\n")
    return n


def run_n(n: int, cfg: Path, sample: Path, length: int, out: Path, port: int, devices: list[int]) -> dict:
    # --num_gpus N takes GPUs 0..N-1; other GPUs (a job beside another) through --include
    on_gpus = devices == list(range(n)) or not _cuda()
    select = ["--num_gpus", str(n)] if on_gpus else ["--include", "localhost:" + ",".join(map(str, devices))]
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", *select, "--master_port", str(port),
           "--module", "virnuc_ds.run", "-c", str(cfg), "-i", str(sample), "-m", str(length), "-o", str(out), "--force"]
    env = dict(os.environ, PYTHONPATH=f"{ROOT}:{os.environ.get('PYTHONPATH', '')}")
    env.pop("CUDA_VISIBLE_DEVICES", None)
    t0 = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.time() - t0
    (out.parent / f"run_{out.name}.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        raise SystemExit(f"N={n} failed (exit {proc.returncode}); log: {out.parent / f'run_{out.name}.log'}\n{proc.stderr[-3000:]}")
    report = json.loads((out / "run_report.json").read_text())
    return {"wall": wall, "report": report, "out_dir": str(out), "devices": devices, "command": " ".join(cmd),
            "launcher_events": launcher_events(proc.stdout + proc.stderr, t0)}


LAUNCHER_EVENTS = {  # DeepSpeed's own log lines (millisecond timestamps) marking the launch chain
    "runner_spawns_launch_py": "cmd = ",
    "launch_py_spawns_ranks": "WORLD INFO DICT",
    "last_rank_exit_seen": "exits successfully",
}


def launcher_events(log_text: str, t0: float) -> dict:
    """Seconds from the benchmark's start of the `deepspeed` command to each launcher event (the
    last occurrence of each), read from the timestamps of DeepSpeed's log lines."""
    import datetime as dt

    found = {}
    for line in log_text.splitlines():
        if not line.startswith("[20"):
            continue
        for name, marker in LAUNCHER_EVENTS.items():
            if marker in line:
                try:
                    stamp = dt.datetime.strptime(line[1:24], "%Y-%m-%d %H:%M:%S,%f").timestamp()
                except ValueError:
                    continue
                found[name] = stamp - t0
    return found


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def summarize(n: int, workload: str, res: dict, base: dict | None, agreement: dict, meta: dict) -> dict:
    """One record: the run's throughput, per-stage seconds and where its wall time went.

    Stage times are each rank's own (the slowest rank's); prepare and model load overlap, so the
    wall time of the non-GPU stages is taken from the timeline instead: `setup_seconds` (process
    start to the first GPU batch, less interpreter start-up), plus `finish_seconds` (rank 0 after
    the last part: waiting for the background merge and classification, writing the results)."""
    rep = res["report"]
    ranks = rep["ranks"]
    esm_busy = [r.get("esm2", 0.0) for r in ranks]
    gpu_busy = [r.get("esm2", 0.0) + r.get("dnabert_s", 0.0) for r in ranks]
    tokens = sum(r.get("esm2_tokens", 0) for r in ranks)
    esm_wall = max(esm_busy)
    startup = max(r.get("startup", 0.0) for r in ranks)
    setup = max(r.get("ready", 0.0) - r.get("startup", 0.0) for r in ranks)
    gpu_stage_wall = max(r.get("embedded", 0.0) - r.get("ready", 0.0) for r in ranks)
    rec = {
        "gpus": n,
        "workload": workload,
        "frames": rep["frames"],
        "esm2_tokens": tokens,
        "esm2_tokens_per_s": tokens / esm_wall,
        "esm2_tokens_per_s_per_gpu": tokens / esm_wall / n,
        "e2e_seconds": res["wall"],
        "prepare_seconds": rep["prepare"]["seconds"],
        "model_load_seconds": max(r.get("model_load", 0.0) for r in ranks),
        "dnabert_s_seconds": max(r.get("dnabert_s", 0.0) for r in ranks),
        "part_write_seconds": max(r.get("part_write", 0.0) for r in ranks),  # after each part's last batch
        "esm2_seconds": esm_wall,
        "merge_seconds": rep["merge_seconds"],
        "classify_seconds": rep["classify_seconds"],
        "startup_seconds": startup,
        "setup_seconds": setup,
        "gpu_stage_wall_seconds": gpu_stage_wall,
        "finish_seconds": rep["merge_seconds"],
        "rank_gpu_seconds": gpu_busy,
        "load_balance_max_dev_pct": 100 * (max(gpu_busy) / np.mean(gpu_busy) - 1),
        "slowest_rank_idle_tail_s": max(gpu_busy) - min(gpu_busy),
        "devices": res.get("devices"),
        **agreement,
        **meta,
    }
    # where the fixed costs go: the launch chain, and each rank's start-up and load steps (slowest rank)
    rec["launcher_events"] = res.get("launcher_events", {})
    step_names = sorted({k for r in ranks for k in r if k in ("imports", "process_group") or k.startswith("load_")})
    rec["rank_steps_seconds"] = {k: max(r.get(k, 0.0) for r in ranks) for k in step_names}
    rec["non_gpu_stage_seconds"] = setup + rec["finish_seconds"]
    rec["non_gpu_stage_fraction"] = rec["non_gpu_stage_seconds"] / rec["e2e_seconds"]
    rec["launcher_and_startup_seconds"] = res["wall"] - setup - gpu_stage_wall - rec["finish_seconds"]
    if base is not None:
        add_speedups(rec, base)
    return rec


def add_speedups(rec: dict, base: dict) -> None:
    rec["esm2_speedup_vs_1"] = rec["esm2_tokens_per_s"] / base["esm2_tokens_per_s"]
    rec["e2e_speedup_vs_1"] = base["e2e_seconds"] / rec["e2e_seconds"]
    rec["esm2_scaling_efficiency"] = rec["esm2_speedup_vs_1"] / rec["gpus"]


def combine(folders: list[Path], out: Path) -> list[dict]:
    """Records of several calls (jobs run side by side) -> one summary with speed-ups against the
    1-GPU record of the same workload and per-frame agreement against its output."""
    records, raw = [], {}
    for folder in folders:
        records += json.loads((folder / "scaling_summary.json").read_text())
        raw.update(json.loads((folder / "scaling_raw.json").read_text()))
    records.sort(key=lambda r: (r["workload"], r["gpus"]))
    for rec in records:
        base = next((r for r in records if r["workload"] == rec["workload"] and r["gpus"] == 1), None)
        if base is None or base is rec:
            continue
        add_speedups(rec, base)
        a, b = Path(raw[f"{base['workload']}_1"]["out_dir"]), Path(raw[f"{rec['workload']}_{rec['gpus']}"]["out_dir"])
        if (a / "embeddings.h5").exists() and (b / "embeddings.h5").exists():
            rec.update(compare(a, b))
        else:  # the outputs stayed on the machines that made them: compare the runs' samples of them
            samples = [next((f / agreement_sample_name(r) for f in folders if (f / agreement_sample_name(r)).exists()), None)
                       for r in (base, rec)]
            if all(samples):
                rec.update(compare_samples(*samples))
    out.mkdir(parents=True, exist_ok=True)
    (out / "scaling_summary.json").write_text(json.dumps(records, indent=1))
    (out / "scaling_raw.json").write_text(json.dumps(raw, indent=1, default=str))
    plot(records, out / "scaling.png")
    return records


AGREEMENT_STRIDE = 997  # every 997th frame's features go into a run's agreement sample (a prime: no
#                         pattern of the part layout lines up with it)


def agreement_sample_name(rec: dict) -> str:
    return f"agreement_{rec['workload']}_{rec['gpus']}.npz"


def write_agreement_sample(run_out: Path, path: Path, stride: int = AGREEMENT_STRIDE) -> None:
    """A small, portable stand-in for a run's outputs, for comparing runs made on different
    machines: every label, and the features of every stride-th frame (float32, ~2 MB for the
    issue-sized reads150 sample)."""
    import h5py

    with h5py.File(run_out / "embeddings.h5") as f:
        ids = np.array([x.decode() if isinstance(x, bytes) else str(x) for x in f["ids"][::stride]])
        features = np.concatenate([f[k][::stride] for k in ("dnabert_s", "esm2")], axis=1).astype(np.float32)
    np.savez_compressed(path, ids=ids, features=features, labels=np.array(run_labels(run_out)))


def run_labels(run_out: Path) -> list[str]:
    """The Prediction column of a run's prediction_results.txt."""
    return [r.split("\t")[1] for r in (run_out / "prediction_results.txt").read_text().splitlines()[1:]]


def min_row_cosine(xa: np.ndarray, xb: np.ndarray) -> float:
    """The smallest cosine between corresponding rows of two [n, D] feature blocks."""
    xa, xb = xa.astype(np.float64), xb.astype(np.float64)
    return float(((xa * xb).sum(1) / (np.linalg.norm(xa, axis=1) * np.linalg.norm(xb, axis=1))).min())


def agreement(min_cos: float, la, lb) -> dict:
    la, lb = np.asarray(la), np.asarray(lb)
    same_shape = la.shape == lb.shape
    return {"min_cosine_vs_1gpu": min_cos, "labels_identical_vs_1gpu": bool(same_shape and (la == lb).all()),
            "label_agreement_vs_1gpu": float(np.mean(la == lb)) if same_shape else 0.0}


def compare_samples(a: Path, b: Path) -> dict:
    """compare() on two agreement samples: the same frames' cosine, every label."""
    sa, sb = np.load(a), np.load(b)
    assert sa["ids"].shape == sb["ids"].shape and (sa["ids"] == sb["ids"]).all(), "frame ids differ between runs"
    return dict(agreement(min_row_cosine(sa["features"], sb["features"]), sa["labels"], sb["labels"]),
                agreement_from=f"a sample of every {AGREEMENT_STRIDE}th frame's features ({len(sa['ids'])} frames) and every label")


def compare(a: Path, b: Path, rows_per_block: int = 65536) -> dict:
    """Per-frame cosine of the two runs' features and their labels (read in blocks: the
    embeddings of a large sample do not fit twice in memory)."""
    import h5py

    min_cos = 1.0
    with h5py.File(a / "embeddings.h5") as fa, h5py.File(b / "embeddings.h5") as fb:
        assert fa["ids"].shape == fb["ids"].shape and (fa["ids"][()] == fb["ids"][()]).all(), "frame ids differ between runs"
        for start in range(0, fa["ids"].shape[0], rows_per_block):
            xa, xb = (np.concatenate([f[k][start:start + rows_per_block] for k in ("dnabert_s", "esm2")], axis=1) for f in (fa, fb))
            min_cos = min(min_cos, min_row_cosine(xa, xb))
    return agreement(min_cos, run_labels(a), run_labels(b))


def plot(records: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    # the timeline of the run's wall time (prepare and model load overlap inside "setup")
    def timeline(r):
        other_gpu = max(0.0, r.get("gpu_stage_wall_seconds", 0.0) - r["dnabert_s_seconds"] - r["esm2_seconds"])
        return {"launcher + interpreter start": r.get("launcher_and_startup_seconds", 0.0),
                "setup: prepare || model load, plan": r.get("setup_seconds", 0.0),
                "DNABERT-S": r["dnabert_s_seconds"], "ESM-2": r["esm2_seconds"], "part writes, gaps": other_gpu,
                "finish: merge + classify tail": r.get("finish_seconds", 0.0)}
    stages = list(timeline(records[0]))
    colors = dict(zip(stages, plt.get_cmap("tab10").colors))
    labels = []
    for wl in sorted({r["workload"] for r in records}):
        rs = sorted((r for r in records if r["workload"] == wl), key=lambda r: r["gpus"])
        g = [r["gpus"] for r in rs]
        ax1.plot(g, [r["esm2_tokens_per_s"] / rs[0]["esm2_tokens_per_s"] for r in rs], "o-", label=f"{wl} ESM-2 stage")
        ax1.plot(g, [rs[0]["e2e_seconds"] / r["e2e_seconds"] for r in rs], "s--", label=f"{wl} end to end")
        for r in rs:
            x = len(labels)
            labels.append(f"{wl}\n{r['gpus']} GPU")
            bottom = 0.0
            for st, v in timeline(r).items():
                ax2.bar(x, v, bottom=bottom, color=colors[st], label=st if x == 0 else None)
                bottom += v
            ax2.plot([x - 0.4, x + 0.4], [r["e2e_seconds"]] * 2, "k-", label="end to end (wall)" if x == 0 else None)
    ax2.set_xticks(range(len(labels)), labels, fontsize=8)
    top = max(r["gpus"] for r in records)
    ax1.plot([1, top], [1, top], ":", color="gray", label="ideal")
    ax1.set_xlabel("GPUs")
    ax1.set_ylabel("speed-up over 1 GPU")
    ax1.legend(fontsize=8)
    ax2.set_ylabel("seconds of wall time (slowest rank)")
    ax2.legend(fontsize=8)
    fig.suptitle(f"virnuc-ds scaling, {records[0]['gpu']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def print_table(records: list[dict]) -> None:
    print("\ngpus workload   ESM2 tok/s  speedup  e2e s  e2e speedup  non-GPU%  balance%  min cos  labels")
    for r in records:
        print(f"{r['gpus']:>4} {r['workload']:<10} {r['esm2_tokens_per_s']:>10.0f}  {r.get('esm2_speedup_vs_1', 1):>6.2f}x "
              f"{r['e2e_seconds']:>6.1f}  {r.get('e2e_speedup_vs_1', 1):>10.2f}x  {100 * r['non_gpu_stage_fraction']:>7.1f}  "
              f"{r['load_balance_max_dev_pct']:>7.2f}  {_compared(r)}")


def _compared(r: dict) -> str:
    """The agreement columns; '-' where the run was not compared with a one-GPU output (the one-GPU
    record itself, or outputs left on another machine)."""
    if r["gpus"] == 1 or "min_cosine_vs_1gpu" not in r:
        return "       -  -"
    return f"{r['min_cosine_vs_1gpu']:.6f}  {r['labels_identical_vs_1gpu']}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gpus", default="1,2,4")
    p.add_argument("--workload", default="contigs500", help=f"comma-separated, of {sorted(WORKLOADS)}")
    p.add_argument("--esm-seconds", type=float, default=360.0, help="size the sample for about this long an ESM-2 stage on one GPU")
    p.add_argument("--tokens-per-s", type=float, default=82_000, help="one GPU's ESM-2 rate used for sizing")
    p.add_argument("--work", default="/tmp/virnuc_scaling")
    p.add_argument("--out", required=True)
    p.add_argument("--devices", help="GPU ids the runs use, e.g. 2,3 (default: 0..N-1); a job beside another takes other GPUs")
    p.add_argument("--port", type=int, default=29600, help="first rendezvous port (jobs side by side need their own)")
    p.add_argument("--setup-only", action="store_true", help="write the models and the --workload samples, build the op, stop")
    p.add_argument("--combine", nargs="+", type=Path, help="output folders of earlier calls: one summary, speed-ups, agreement, plot")
    p.add_argument("--tiny", action="store_true", help="the demo models instead of the real architectures (a CPU rehearsal)")
    p.add_argument("--attention", default=None, help="esm2.attention to set in the config (default: the product default)")
    args = p.parse_args()
    out = Path(args.out)
    if args.combine:
        print_table(combine(args.combine, out))
        return
    import torch

    from virnuc_ds.config import Esm2Config

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    models = write_models(work / "models", tiny=args.tiny)
    models_s = time.time() - t0
    t0 = time.time()
    if torch.cuda.is_available():
        subprocess.run([sys.executable, "-c", "from virnuc_ds.embed.esm2_kernels import prebuild_inference_op as b; b()"], check=True,
                       env=dict(os.environ, PYTHONPATH=f"{ROOT}:{os.environ.get('PYTHONPATH', '')}"))
    build_s = time.time() - t0
    workloads = args.workload.split(",")
    for workload in workloads:
        sample = work / f"{workload}.fa"
        target = work / f"{workload}.fa.target_tokens"  # a sample of another size is written again
        tokens = str(int(args.esm_seconds * args.tokens_per_s))
        if args.setup_only and sample.exists() and (not target.exists() or target.read_text() != tokens):
            sample.unlink()
        if not sample.exists():
            write_sample(sample, workload, args.esm_seconds * args.tokens_per_s)
            target.write_text(tokens)
    if args.setup_only:
        (out / "setup.json").write_text(json.dumps({"model_write_seconds": models_s, "kernel_build_seconds_once": build_s}))
        print(f"models written in {models_s:.1f} s, op built in {build_s:.1f} s, samples in {work}")
        return
    # the device copy of the tree has no .git: the caller passes the commit in VIRNUC_DS_COMMIT
    commit = os.environ.get("VIRNUC_DS_COMMIT") or subprocess.run(
        ["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout.strip() or "unknown"
    meta = {
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu (rehearsal)", "commit": commit, "torch": torch.__version__,
        "deepspeed": __import__("deepspeed").__version__, "python": platform.python_version(),
        "kernel_build_seconds_once": build_s, "model_write_seconds": models_s, "command": " ".join(sys.argv),
        "cpus": len(os.sched_getaffinity(0)),
        "esm2_attention": args.attention or Esm2Config.attention,
        # settings the ranks read from the environment (e.g. VIRNUC_DS_PRELOAD_KERNELS), and where
        # Python's bytecode caches are (the start-ups' cost depends on them)
        "environment": {k: v for k, v in sorted(os.environ.items())
                        if (k.startswith("VIRNUC_DS_") and k != "VIRNUC_DS_COMMIT")
                        or k in ("PYTHONDONTWRITEBYTECODE", "PYTHONPYCACHEPREFIX")},
    }
    records, raw = [], {}
    for w, workload in enumerate(workloads):
        length = WORKLOADS[workload][0]
        sample = work / f"{workload}.fa"
        n_seqs = sum(1 for line in open(sample) if line.startswith(">"))
        cfg = work / f"scaling_{workload}_{args.port}.json"
        esm_cfg = {"toks_per_batch": 65536}
        if args.attention:
            esm_cfg["attention"] = args.attention
        cfg.write_text(json.dumps({"models": models, "esm2": esm_cfg, "run": {"frames_per_part": 2048}}))
        base_rec = base_out = None  # the first run of this call is the others' reference (--combine for runs of several calls)
        for i, n in enumerate(int(x) for x in args.gpus.split(",")):
            devices = [int(d) for d in args.devices.split(",")][:n] if args.devices else list(range(n))
            run_out = work / f"out_{workload}_{n}"
            res = run_n(n, cfg, sample, length, run_out, args.port + 10 * w + i, devices)
            raw[f"{workload}_{n}"] = res
            write_agreement_sample(run_out, out / f"agreement_{workload}_{n}.npz")
            agreement = compare(base_out, run_out) if base_out else {}
            rec = summarize(n, workload, res, base_rec, agreement, dict(meta, input_sequences=n_seqs))
            records.append(rec)
            base_out, base_rec = base_out or run_out, base_rec or rec
            print(json.dumps({k: rec[k] for k in ("gpus", "workload", "esm2_tokens_per_s", "e2e_seconds", "esm2_seconds",
                                                  "model_load_seconds", "setup_seconds", "finish_seconds")}), flush=True)
            # written after every run, so a run cut short still leaves its records
            (out / "scaling_raw.json").write_text(json.dumps(raw, indent=1, default=str))
            (out / "scaling_summary.json").write_text(json.dumps(records, indent=1))
    plot(records, out / "scaling.png")
    print_table(records)


if __name__ == "__main__":
    main()
