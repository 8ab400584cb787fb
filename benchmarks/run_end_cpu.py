"""CPU costs at a run's start and end on a reads150-sized sample, old way and new way side by side.

1. The highest-score table (prediction_results_highestscore.csv) for the sample's frames: the
   per-frame Python loop the merge used to run at the run's end, against SequenceGroups (built
   while the GPUs work, so only `table()` is left for the end).
2. Each rank's frames table after prepare: both prepared FASTA files read into lists (by the
   general reader, and by reading and splitting them as ranks did before), against the
   memory-mapped table (a fresh prep, and a resumed run's with the ids compared).
3. Prepare's reading of the input in its main process, the one step its workers cannot share:
   records parsed one by one by read_fasta, as prepare did before, against the raw blocks of
   whole records it now hands to the workers to parse. Then prepare itself on every core.

    python benchmarks/run_end_cpu.py [--reads 420934] [--repeats 3] [--work /tmp/run_end_cpu]
        [--out benchmarks/results/run_end_cpu.json]

The default sample is the scaling benchmark's reads150 at its default size (626,089 frames).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))


def highest_score_by_loop(ids, probabilities):
    """The table as the merge computed it before SequenceGroups: one dict update per frame."""
    best: dict[str, list[float]] = {}
    for rid, (p0, p1) in zip(ids, probabilities):
        cur = best.setdefault(rid[:-2], [float(p0), float(p1)])
        cur[0], cur[1] = max(cur[0], float(p0)), max(cur[1], float(p1))
    return [(key, best[key][1] >= best[key][0]) for key in sorted(best)]


def read_with_general_reader(prep: Path):
    from virnuc_ds.fasta import read_fasta

    tables = []
    for name in ("identified_nucleotide.fa", "identified_protein.faa"):
        records = [(r.id, r.sequence) for r in read_fasta(prep / name)]
        tables.append(([i for i, _ in records], [s for _, s in records]))
    return tables


def read_by_splitting(prep: Path):
    """The frames table as ranks read it before the memory map (e2cf890): each file read whole and
    split into lines, both files' ids checked equal."""
    tables = []
    for name in ("identified_nucleotide.fa", "identified_protein.faa"):
        lines = (prep / name).read_text().split("\n")
        if lines and lines[-1] == "":
            lines.pop()
        headers, sequences = lines[0::2], lines[1::2]
        assert all(h[:1] == ">" and " " not in h and "\t" not in h for h in headers)
        assert not any(q[:1] == ">" for q in sequences)
        tables.append(([h[1:] for h in headers], sequences))
    assert tables[0][0] == tables[1][0]
    lengths = np.fromiter((len(q) for q in tables[1][1]), dtype=np.int64, count=len(tables[1][1]))
    return tables, lengths


def timed(fn, repeats: int) -> tuple[list[float], object]:
    times, result = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t0)
    return times, result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reads", type=int, default=420_934)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--work", type=Path, default=Path("/tmp/run_end_cpu"))
    p.add_argument("--out", type=Path)
    args = p.parse_args()

    from scaling import WORKLOADS, write_sample
    from virnuc_ds.classify.predict import SequenceGroups
    from virnuc_ds.pipeline.frames_table import read_frames_table
    from virnuc_ds.prep.prepare import prepare

    args.work.mkdir(parents=True, exist_ok=True)
    sample, prep = args.work / "reads150.fa", args.work / "prep"
    write_sample(sample, "reads150", args.reads * WORKLOADS["reads150"][2])
    prepare(sample, 300, prep)
    ids = read_frames_table(prep).ids
    ids = list(ids)
    probabilities = np.random.default_rng(0).random((len(ids), 2), dtype=np.float32)

    seconds: dict[str, list[float]] = {}
    seconds["highest-score table, per-frame loop"], reference = timed(lambda: highest_score_by_loop(ids, probabilities), args.repeats)
    seconds["SequenceGroups build (during the GPU work)"], groups = timed(lambda: SequenceGroups(ids), args.repeats)
    seconds["highest-score table, SequenceGroups.table"], table = timed(lambda: groups.table(probabilities), args.repeats)
    assert table == reference, "the two highest-score tables differ"

    seconds["frames table, general reader (lists)"], _ = timed(lambda: read_with_general_reader(prep), args.repeats)
    seconds["frames table, read and split (before)"], _ = timed(lambda: read_by_splitting(prep), args.repeats)
    seconds["frames table, memory-mapped, fresh prep"], _ = timed(
        lambda: read_frames_table(prep, check_ids=False).protein_lengths(), args.repeats)
    seconds["frames table, memory-mapped, ids compared"], _ = timed(
        lambda: read_frames_table(prep, check_ids=True).protein_lengths(), args.repeats)

    from virnuc_ds.fasta import read_fasta, record_blocks

    seconds["prepare's reader: records by read_fasta (before)"], n_read = timed(
        lambda: sum(1 for _ in read_fasta(sample, check_nucleotides=True)), args.repeats)
    seconds["prepare's reader: raw blocks of records"], _ = timed(lambda: sum(map(len, record_blocks(sample))), args.repeats)
    seconds[f"prepare, {len(os.sched_getaffinity(0))} workers"], stats = timed(
        lambda: prepare(sample, 300, args.work / "prep_again"), args.repeats)
    assert stats.records == n_read

    from provenance import print_medians, provenance

    result = {"frames": len(ids), "sequences": len(groups.keys), "seconds": seconds, **provenance()}
    print(f"{len(ids)} frames, {len(groups.keys)} sequences")
    print_medians("step", seconds)
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
