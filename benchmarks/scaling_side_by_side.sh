#!/usr/bin/env bash
# The issue-sized scaling benchmark on one 4-GPU node in two device calls (each under 10 minutes):
#
#   bash benchmarks/scaling_side_by_side.sh phase1   # setup; N=1 contigs500 (GPU 0), N=1 reads150
#                                                    # (GPU 1) and N=2 of both (GPUs 2,3) side by side
#   bash benchmarks/scaling_side_by_side.sh phase2   # N=4 of both, the combined summary, then tests/gpu
#
# Every job is pinned to its own quarter of the node's cores (taskset), N=4 included, so each run
# has the same CPU budget whatever its GPU count. Writes under $OUT (the device tool's result
# folder; default ./scaling_out) and keeps models, samples and run folders in $WORK between calls.
# TINY=1 rehearses the whole thing on a CPU with the demo models (CONTIGS_S=0.3 READS_S=0.3).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/scaling_out}
WORK=${WORK:-/tmp/virnuc_scaling}
CONTIGS_S=${CONTIGS_S:-360}   # ESM-2 seconds on one GPU the contigs500 sample is sized for
READS_S=${READS_S:-300}       # the same for reads150
mkdir -p "$OUT" "$WORK"
cores=$(nproc)
quarter=$((cores / 4))
TINY_FLAG=()
[ -n "${TINY:-}" ] && TINY_FLAG=(--tiny)
# pin job k to the k-th quarter of the cores (not on a machine with fewer than 4)
pin() {
    if [ "$quarter" -ge 1 ] && command -v taskset > /dev/null; then
        echo taskset -c "$(($1 * quarter))-$((($1 + 1) * quarter - 1))"
    fi
}
scaling() { python3 benchmarks/scaling.py --work "$WORK" "${TINY_FLAG[@]}" "$@"; }

setup() {
    scaling --setup-only --workload contigs500 --esm-seconds "$CONTIGS_S" --out "$OUT/setup_contigs500"
    scaling --setup-only --workload reads150 --esm-seconds "$READS_S" --out "$OUT/setup_reads150"
}

case "${1:-}" in
phase1)
    nvidia-smi topo -m > "$OUT/topology.txt" 2>&1 || true
    setup
    # shellcheck disable=SC2046 # pin's words are meant to split
    $(pin 0) python3 benchmarks/scaling.py --work "$WORK" "${TINY_FLAG[@]}" --gpus 1 --workload contigs500 --devices 0 \
        --port 29500 --out "$OUT/c1" > "$OUT/c1.log" 2>&1 &
    # shellcheck disable=SC2046
    $(pin 1) python3 benchmarks/scaling.py --work "$WORK" "${TINY_FLAG[@]}" --gpus 1 --workload reads150 --devices 1 \
        --port 29520 --out "$OUT/r1" > "$OUT/r1.log" 2>&1 &
    # shellcheck disable=SC2046
    ($(pin 2) python3 benchmarks/scaling.py --work "$WORK" "${TINY_FLAG[@]}" --gpus 2 --workload contigs500 --devices 2,3 \
        --port 29540 --out "$OUT/c2" && \
     $(pin 2) python3 benchmarks/scaling.py --work "$WORK" "${TINY_FLAG[@]}" --gpus 2 --workload reads150 --devices 2,3 \
        --port 29560 --out "$OUT/r2") > "$OUT/n2.log" 2>&1 &
    status=0
    for job in $(jobs -p); do wait "$job" || status=1; done
    mkdir -p "$WORK/phase1" && cp -r "$OUT"/c1 "$OUT"/r1 "$OUT"/c2 "$OUT"/r2 "$WORK/phase1/" 2>/dev/null || true
    tail -n 3 "$OUT"/c1.log "$OUT"/r1.log "$OUT"/n2.log
    exit $status
    ;;
phase2)
    [ -f "$WORK/contigs500.fa" ] || setup   # a fresh machine: same seeds, same samples
    # shellcheck disable=SC2046
    $(pin 0) python3 benchmarks/scaling.py --work "$WORK" "${TINY_FLAG[@]}" --gpus 4 --workload contigs500 \
        --port 29600 --out "$OUT/c4" > "$OUT/c4.log" 2>&1 || tail -n 20 "$OUT/c4.log"
    # shellcheck disable=SC2046
    $(pin 0) python3 benchmarks/scaling.py --work "$WORK" "${TINY_FLAG[@]}" --gpus 4 --workload reads150 \
        --port 29620 --out "$OUT/r4" > "$OUT/r4.log" 2>&1 || tail -n 20 "$OUT/r4.log"
    folders=()
    for f in "$WORK"/phase1/c1 "$WORK"/phase1/r1 "$WORK"/phase1/c2 "$WORK"/phase1/r2 "$OUT"/c4 "$OUT"/r4; do
        if [ -f "$f/scaling_summary.json" ]; then folders+=("$f"); fi
    done
    mkdir -p "$OUT/summary"
    scaling --combine "${folders[@]}" --out "$OUT/summary" | tee "$OUT/summary/table.txt"
    CUDA_VISIBLE_DEVICES=0 timeout 240 python3 -m pytest -q -ra tests/gpu > "$OUT/gpu_pytest.txt" 2>&1 || true
    tail -n 4 "$OUT/gpu_pytest.txt"
    ;;
*)
    echo "usage: $0 phase1|phase2" >&2
    exit 2
    ;;
esac
