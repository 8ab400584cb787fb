#!/usr/bin/env bash
# The costs around the GPU stages, this version against another, side by side on one GPU machine:
#   1. benchmarks/run_end_cpu.py on the node's CPU (this version): the run's end and the frames
#      table at reads150's full size (626k frames), prepare's reader, prepare on every core;
#   2. prepare alone on that full-size reads150 sample, other version and this one alternating
#      ($REPEATS times each, every core);
#   3. the whole pipeline at N=1 on a small reads150 sample ($READS_S s of ESM-2), alternating.
# The other version is a tree of its files, e.g. for commit C:
#   mkdir ab_old && git archive C virnuc_ds benchmarks/scaling.py | tar -x -C ab_old
#   OLD=ab_old OLD_COMMIT=C NEW_COMMIT=$(git rev-parse HEAD) bash benchmarks/fixed_costs_ab.sh
# Results in $OUT (run_end.*, prepare_ab.txt, e2e_ab.txt, each run's scaling_raw.json); a table last.
# SKIP_RUN_END=1 leaves out step 1.
set -euo pipefail
cd "$(dirname "$0")/.."
OLD=${OLD:?a tree of the other version}
OLD=$(cd "$OLD" && pwd)
OUT=$(mkdir -p "${OUT:-ab_out}" && cd "${OUT:-ab_out}" && pwd)
WORK=$(mkdir -p "${WORK:-/tmp/virnuc_ab}" && cd "${WORK:-/tmp/virnuc_ab}" && pwd)
READS_S=${READS_S:-20}
REPEATS=${REPEATS:-2}
FULL_READS=${FULL_READS:-420934}   # reads150 at the scaling benchmark's default size
TINY_FLAG=()
[ -n "${TINY:-}" ] && TINY_FLAG=(--tiny)   # TINY=1 FULL_READS=2000 READS_S=0.3: a CPU rehearsal with the demo models
mkdir -p "$OUT" "$WORK/full"

HERE=$PWD
if [ -z "${SKIP_RUN_END:-}" ]; then
    VIRNUC_DS_COMMIT=${NEW_COMMIT:-} python3 benchmarks/run_end_cpu.py --work "$WORK/full" --reads "$FULL_READS" --repeats "$REPEATS" \
        --out "$OUT/run_end.json" > "$OUT/run_end.txt" 2>&1
fi
[ -f "$WORK/full/reads150.fa" ] || python3 -c "
import sys; sys.path.insert(0, 'benchmarks')
from scaling import WORKLOADS, write_sample
write_sample(__import__('pathlib').Path(sys.argv[1]), 'reads150', int(sys.argv[2]) * WORKLOADS['reads150'][2])
" "$WORK/full/reads150.fa" "$FULL_READS"

# Each version runs from its own tree: `python -c` and `-m` put the working directory first on the
# module path, ahead of PYTHONPATH, so a run started here would import this tree's virnuc_ds.
prepare_once() {  # $1: tree, $2: label (a -c program: prepare's spawned workers cannot re-import a stdin one)
    cd "$1" && PYTHONPATH="$1:${PYTHONPATH:-}" python3 -c "
import sys, time
from virnuc_ds.prep.prepare import prepare
t = time.perf_counter()
stats = prepare(sys.argv[1], 300, sys.argv[2])
import virnuc_ds
print(f'{sys.argv[3]} {time.perf_counter() - t:.2f} s {stats.frames} frames ({virnuc_ds.__file__})')
" "$WORK/full/reads150.fa" "$WORK/prep_$2" "$2"
    cd "$HERE"
}
for i in $(seq "$REPEATS"); do
    prepare_once "$OLD" old >> "$OUT/prepare_ab.txt"
    prepare_once "$PWD" new >> "$OUT/prepare_ab.txt"
done
for f in chunked.fa identified_nucleotide.fa identified_protein.faa; do
    cmp "$WORK/prep_old/$f" "$WORK/prep_new/$f" && echo "prepare outputs equal: $f" >> "$OUT/prepare_ab.txt"
done

python3 benchmarks/scaling.py --work "$WORK/small" "${TINY_FLAG[@]}" --setup-only --workload reads150 --esm-seconds "$READS_S" \
    --out "$WORK/small/setup" > "$OUT/setup.txt" 2>&1
port=29800
for i in $(seq "$REPEATS"); do
    for version in old new; do
        tree=$PWD commit=${NEW_COMMIT:-unknown}
        if [ "$version" = old ]; then tree=$OLD commit=${OLD_COMMIT:-unknown}; fi
        (cd "$tree" && VIRNUC_DS_COMMIT=$commit python3 benchmarks/scaling.py --work "$WORK/small" "${TINY_FLAG[@]}" --gpus 1 \
            --workload reads150 --port $port --out "$OUT/e2e_${version}_$i" > "$OUT/e2e_${version}_$i.log" 2>&1) \
            || tail -n 20 "$OUT/e2e_${version}_$i.log"
        port=$((port + 20))
    done
done

python3 - "$OUT" <<'PY' | tee "$OUT/e2e_ab.txt"
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
print((out / "prepare_ab.txt").read_text().rstrip())
print("run          e2e s  ready s  prepare s  model load s  plan s  GPU stage s  finish s  after exit s")
runs = sorted(out.glob("e2e_*/scaling_raw.json"), key=lambda f: (int(f.parent.name.split("_")[2]), f.parent.name.split("_")[1] != "old"))
for f in runs:  # in the order they ran
    res = next(iter(json.loads(f.read_text()).values()))
    r, rep = res["report"]["ranks"][0], res["report"]
    print("%-11s %6.1f %8.2f %10.2f %13.2f %7.2f %12.1f %9.2f %13.2f" % (
        f.parent.name, res["wall"], r["ready"], rep["prepare"]["seconds"], r["model_load"], r.get("plan", 0.0),
        r["embedded"] - r["ready"], rep["merge_seconds"], res["wall"] - res["launcher_events"].get("last_rank_exit_seen", res["wall"])))
PY
tail -n 12 "$OUT/run_end.txt" 2> /dev/null || true
