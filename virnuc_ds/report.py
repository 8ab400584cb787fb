"""`virnuc-ds report OUT`: a short human summary of a finished run, from OUT/run_report.json.

Per-stage times (the slowest rank's, which is the wall time of a stage), ESM-2 tokens/s per rank
(one rank per GPU), sequences / chunks / frames, the predictions, failures (OUT/failed_files.txt,
lines `item|stage|message`) and versions. `summarize(report)` is the same text for run.py to print.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from .errors import InputError

REPORT = "run_report.json"
FAILED_FILES = "failed_files.txt"
HIGHEST_SCORE = "prediction_results_highestscore.csv"
MAX_FAILURES_SHOWN = 10

# (key in each rank's timings, label), in pipeline order
RANK_STAGES = (("prepare", "prepare"), ("plan", "plan"), ("model_load", "model load"),
               ("dnabert_s", "DNABERT-S"), ("esm2", "ESM-2"))


def load_report(output_dir: str | os.PathLike) -> dict:
    out = Path(output_dir)
    path = out / REPORT
    if not out.is_dir():
        raise InputError(out, "no such folder")
    if not path.is_file():
        raise InputError(out, f"no {REPORT}: not a finished virnuc-ds run (run `virnuc-ds run ... -o {out}` first)")
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise InputError(path, f"cannot be read as JSON ({exc})") from None


def read_failures(output_dir: str | os.PathLike) -> list[tuple[str, str, str]]:
    """(item, stage, message) per line of OUT/failed_files.txt; [] when there is no such file."""
    path = Path(output_dir) / FAILED_FILES
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(errors="replace").splitlines():
        if line.strip():
            item, stage, message = (line.split("|", 2) + ["", ""])[:3]
            rows.append((item.strip(), stage.strip(), message.strip()))
    return rows


def count_predictions(output_dir: str | os.PathLike) -> tuple[int, int] | None:
    """(chunks called virus, chunks) from prediction_results_highestscore.csv, or None without it."""
    path = Path(output_dir) / HIGHEST_SCORE
    if not path.is_file():
        return None
    virus = total = 0
    with open(path) as fh:
        next(fh, None)  # header
        for line in fh:
            fields = line.rstrip("\n").split("\t")
            if len(fields) >= 2:
                total += 1
                virus += fields[1] == "True"
    return virus, total


def manifest_facts(output_dir: str | os.PathLike) -> dict:
    """The `facts` of OUT/run_manifest.json (input hash, chunk length, models), or {}."""
    try:
        return json.loads((Path(output_dir) / "run_manifest.json").read_text()).get("facts", {})
    except (OSError, ValueError, AttributeError):
        return {}


def _seconds(value) -> str:
    if value is None:
        return "-"
    value = float(value)
    if value >= 3600:
        return f"{value / 3600:.2f} h"
    if value >= 120:
        return f"{value / 60:.1f} min"
    return f"{value:.1f} s"


def _stage_times(report: dict) -> list[tuple[str, float]]:
    ranks = [r for r in report.get("ranks") or [] if r]
    stages = []
    for key, label in RANK_STAGES:
        values = [r[key] for r in ranks if isinstance(r.get(key), (int, float))]
        if key == "prepare" and not values:
            values = [v for v in [(report.get("prepare") or {}).get("seconds")] if v is not None]
        if values:
            stages.append((label, max(values)))
    for key, label in (("merge_seconds", "merge"), ("classify_seconds", "classify")):
        if report.get(key) is not None:
            stages.append((label, report[key]))
    return stages


def summarize(report: dict, output_dir: str | os.PathLike | None = None) -> str:
    """A short human summary of a run report; with `output_dir`, also its predictions and failures."""
    lines = [f"virnuc-ds run report{f' for {output_dir}' if output_dir else ''}"]
    if output_dir is not None:
        counts = count_predictions(output_dir)
        if counts is not None:
            virus, total = counts
            lines.append(f"  predictions: {virus:,} of {total:,} chunks virus, {total - virus:,} others ({HIGHEST_SCORE})")
        else:
            lines.append("  predictions: none (no classifier configured: embeddings.h5 only)")

    stats = (report.get("prepare") or {}).get("stats") or {}
    length = report.get("expected_length") or (output_dir is not None and manifest_facts(output_dir).get("expected_length"))
    frames = report.get("frames")
    if stats:
        lines.append(f"  input: {stats.get('records', 0):,} sequences, {stats.get('bases', 0):,} bases -> "
                     f"{stats.get('chunks', 0):,} chunks -> {stats.get('frames', frames or 0):,} frames"
                     + (f" (chunk length {length})" if length else ""))
    elif frames is not None:
        lines.append(f"  input: {frames:,} frames (prepared by an earlier run)")

    dtypes = report.get("dtypes") or {}
    if dtypes:
        engine = "DeepSpeed kernels" if dtypes.get("kernels") else "eager"
        lines.append(f"  numerics: {dtypes.get('device', '?')}, ESM-2 {dtypes.get('esm2', '?')} ({engine}), "
                     f"DNABERT-S {dtypes.get('dnabert_s', '?')}")

    stages = _stage_times(report)
    if stages:
        lines.append("  stage times (slowest rank): " + " | ".join(f"{label} {_seconds(v)}" for label, v in stages))

    ranks = report.get("ranks") or []
    if ranks:
        per_gpu = " (one per GPU)" if dtypes.get("device") == "cuda" else ""
        lines.append(f"  ranks: {len(ranks)}{per_gpu}")
        total_tokens = 0
        for r, t in enumerate(ranks):
            t = t or {}
            if "esm2" not in t:
                lines.append(f"    rank {r}: nothing left to compute (its parts were done by an earlier run)")
                continue
            tokens = int(t.get("esm2_tokens", 0))
            total_tokens += tokens
            rate = tokens / t["esm2"] if t["esm2"] else 0.0
            lines.append(f"    rank {r}: ESM-2 {rate:,.0f} tokens/s ({tokens:,} tokens in {_seconds(t['esm2'])}), "
                         f"DNABERT-S {_seconds(t.get('dnabert_s'))}, model load {_seconds(t.get('model_load'))}")
        fell_back = [r for r, t in enumerate(ranks) if (t or {}).get("esm2_fallback_to_eager")]
        if fell_back:
            lines.append(f"  ESM-2 ran eager on rank(s) {', '.join(map(str, fell_back))}: DeepSpeed's kernels could "
                         "not be built there (esm2.fallback_to_eager)")
        truncated = sum(int((t or {}).get("truncated_proteins", 0)) for t in ranks)
        if truncated:
            lines.append(f"  proteins truncated to the ESM-2 limit: {truncated:,}")

    if output_dir is not None:
        failures = read_failures(output_dir)
        if failures:
            lines.append(f"  failures: {len(failures):,} ({FAILED_FILES})")
            for item, stage, message in failures[:MAX_FAILURES_SHOWN]:
                lines.append(f"    {item} [{stage}]: {message}")
            if len(failures) > MAX_FAILURES_SHOWN:
                lines.append(f"    ... and {len(failures) - MAX_FAILURES_SHOWN:,} more")
        else:
            lines.append("  failures: none")

    versions = dict(report.get("versions") or {})
    versions.setdefault("virnuc-ds", report.get("virnuc_ds_version", "?"))
    lines.append("  versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()))
    return "\n".join(lines)


def cmd_report(args) -> int:
    report = load_report(args.output_dir)
    print(summarize(report, args.output_dir))
    return 0
