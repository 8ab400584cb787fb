#!/usr/bin/env bash
# The issue-sized scaling benchmark on one 4-GPU node, in device calls of under 10 minutes each
# (a warm machine keeps models, samples and runs in $WORK between calls):
#
#   bash benchmarks/scaling_side_by_side.sh setup    # models, samples, the op build (~90 s on a fresh
#                                                    # machine; every phase runs it, ~10 s once done)
#   bash benchmarks/scaling_side_by_side.sh phase1   # setup; side by side: N=1 of $N1_WORKLOADS
#                                                    # (default contigs500 on GPU 0, reads150 on GPU 1),
#                                                    # tests/gpu (GPU 2; GPU_TESTS=0: none), then
#                                                    # N=2 (GPUs 2,3) of $N2_WORKLOADS (default none)
#   bash benchmarks/scaling_side_by_side.sh n2       # N=2 of $N2_WORKLOADS (default both) side by side on
#                                                    # GPUs 0,1 and 2,3; COMBINE=1: then the summary
#   bash benchmarks/scaling_side_by_side.sh phase2   # N=4 of $N4_WORKLOADS (N_LARGE="4 8" on an 8-GPU
#                                                    # node: N=8 too), then the combined summary
#                                                    # of every run so far
#   CONTIGS_S=30 bash benchmarks/scaling_side_by_side.sh probe   # fixed costs on a small sample:
#                                                    # import times; N=4 (or every GPU of a smaller machine)
#                                                    # x4, settings A/B/A/B (PROBE_A, PROBE_B: `env`
#                                                    # arguments; default VIRNUC_DS_PRELOAD_KERNELS=0 / =1),
#                                                    # every rank's start-up and load steps
#   PROBE_A="-u PYTHONPYCACHEPREFIX PYTHONDONTWRITEBYTECODE=1" PROBE_B="" ... probe   # bytecode caches
#                                                    # off (the node as it comes) / on
#   SCALING_ARGS="--attention sdpa" OUT=... WORK=... bash ... phase1   # every run with more scaling.py arguments
#   PROBE_A= PROBE_B= PROBE_A_ARGS="--attention deepspeed" PROBE_B_ARGS="--attention sdpa" \
#     PROBE_WORKLOADS="contigs500 reads150" PROBE_RUNS="a1 b1" ... probe   # scaling.py arguments per
#                                                    # setting, on each workload (READS_S sizes reads150)
#
# Every job gets its GPUs' share of the node's cores, as the device kinds are provisioned (16 cores
# per GPU: nvidia-h200 1 GPU, 16 cores; -x4 4 GPUs, 64 cores): a job on GPUs k..k+n-1 is pinned
# (taskset) to their share, so jobs side by side never share a core, and N=all has the whole node. Each phase ends by
# packing its results into $OUT/<phase>.tgz and the agreement samples into $OUT/<phase>_agreement.tgz
# (the device tool returns only a few files, each under a size limit).
# Sizes: CONTIGS_S / READS_S = ESM-2 seconds on one GPU each sample is sized for (the one-GPU run
# takes about 1.1x that plus ~20 s: the defaults make it 7.5-8 min). TINY=1 rehearses everything on a CPU with the demo models
# (with CONTIGS_S=0.3 READS_S=0.3).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/scaling_out}
WORK=${WORK:-/tmp/virnuc_scaling}
CONTIGS_S=${CONTIGS_S:-385}
READS_S=${READS_S:-385}
N1_WORKLOADS=${N1_WORKLOADS:-contigs500 reads150}
N2_WORKLOADS=${N2_WORKLOADS:-}
N4_WORKLOADS=${N4_WORKLOADS:-contigs500 reads150}
N_LARGE=${N_LARGE:-4}
RESULTS=$WORK/results
# Bytecode caches. The lent GPU node's image sets PYTHONDONTWRITEBYTECODE=1 and its torch has no
# __pycache__, so every Python start-up compiled torch again: the launcher's two processes and each
# rank, 3-4 s each (results/python_startup_h200/: import deepspeed 5.4-6.4 s, 2.2 s with caches). A
# pip install on a cluster writes them; here Python writes them under $WORK and setup compiles the
# packages a run imports before any timed run (PYCACHE=0: the node as it comes). Each run records both
# variables in its `environment`.
if [ "${PYCACHE:-1}" != 0 ]; then
    export PYTHONPYCACHEPREFIX=$WORK/pycache
    unset PYTHONDONTWRITEBYTECODE
fi
mkdir -p "$OUT" "$RESULTS"
cores=$(nproc)
node_gpus=4
if [ -z "${TINY:-}" ]; then node_gpus=$(nvidia-smi -L 2> /dev/null | wc -l); fi
if [ "$node_gpus" -lt 1 ]; then node_gpus=4; fi
per_gpu=$((cores / node_gpus))
TINY_FLAG=()
[ -n "${TINY:-}" ] && TINY_FLAG=(--tiny)
# SCALING_ARGS: more scaling.py arguments for every run, e.g. "--attention sdpa" (a run set of its own:
# give it its own OUT and WORK)
read -r -a scaling_args <<< "${SCALING_ARGS:-}"
COMMON=(--work "$WORK" "${TINY_FLAG[@]}" "${scaling_args[@]}")
# pin a job on GPUs $1 .. $1+$2-1 to their share of the cores (not on a machine of fewer cores than GPUs)
pin() {
    if [ "$per_gpu" -ge 1 ] && command -v taskset > /dev/null; then
        echo taskset -c "$(($1 * per_gpu))-$((($1 + $2) * per_gpu - 1))"
    fi
}
scaling() { python3 benchmarks/scaling.py "${COMMON[@]}" "$@"; }

# the bytecode of every package a run imports (the launcher's and the ranks'), as pip would have
# compiled it at install time; a few seconds on a node's cores, once per machine
compile_bytecode() {
    [ "${PYCACHE:-1}" != 0 ] || return 0
    [ -f "$WORK/pycache.done" ] && return 0
    local dirs
    # every package the launcher's and a rank's entry modules import, whole (a rank imports more of
    # them later: the first timed run must not compile what later runs find cached)
    mapfile -t dirs < <(python3 -c "
import sys
import deepspeed.launcher.launch, deepspeed.launcher.runner, esm, virnuc_ds.pipeline.runner, virnuc_ds.embed.esm2_kernels
for name, module in sorted(sys.modules.items()):   # with a cache prefix, the standard library's too
    if '.' in name:
        continue
    if getattr(module, '__path__', None):
        print(list(module.__path__)[0])
    elif (getattr(module, '__file__', None) or '').endswith('.py'):
        print(module.__file__)")
    /usr/bin/time -f "compileall: %e s" python3 -m compileall -q -j 0 "${dirs[@]}" > "$RESULTS/compileall.log" 2>&1 || true
    touch "$WORK/pycache.done"
}

setup() {
    compile_bytecode
    # the op builds (~50 s, CPU) while the models are written (GPU)
    python3 -c "from virnuc_ds.embed.esm2_kernels import prebuild_inference_op as b; b()" > "$RESULTS/opbuild.log" 2>&1 &
    scaling --setup-only --workload contigs500 --esm-seconds "$CONTIGS_S" --out "$RESULTS/setup_contigs500"
    scaling --setup-only --workload reads150 --esm-seconds "$READS_S" --out "$RESULTS/setup_reads150"
    wait
}

gpu_tests() {
    CUDA_VISIBLE_DEVICES=$1 timeout 240 python3 -m pytest -q -ra tests/gpu > "$RESULTS/gpu_pytest.txt" 2>&1 || true
}

pack() {
    for d in "$WORK"/out_*; do cp "$d/run_report.json" "$RESULTS/$(basename "$d")_report.json" 2>/dev/null || true; done
    cp "$WORK"/run_out_*.log "$RESULTS/" 2>/dev/null || true
    rm -rf "$OUT/results_$1"
    cp -r "$RESULTS" "$OUT/results_$1"
    # the agreement samples (.npz, MBs each) in a tar of their own: with them, a phase's tar was
    # over the device tool's size limit and nothing came back
    (cd "$OUT" && find "results_$1" -name '*.npz' -print0 | tar czf "$1_agreement.tgz" --null -T -)
    tar czf "$OUT/$1.tgz" -C "$OUT" --exclude='*.npz' "results_$1" && rm -rf "$OUT/results_$1"
}

# a phase cut short by its caller's time limit (SIGTERM, e.g. `timeout 575 bash ...`) still packs
# what its finished runs left
pack_on_term() {
    # shellcheck disable=SC2064 # the phase name is fixed when the trap is set
    trap "echo 'stopped by SIGTERM: packing what is done' >&2; kill \$(jobs -p) 2> /dev/null; pack $1; exit 124" TERM
}

# the summary of every run so far in $RESULTS/summary, with each run's report and launcher log
combine() {
    folders=()
    for f in "$RESULTS"/c1 "$RESULTS"/r1 "$RESULTS"/c2 "$RESULTS"/r2 "$RESULTS"/c4 "$RESULTS"/r4 "$RESULTS"/c8 "$RESULTS"/r8; do
        if [ -f "$f/scaling_summary.json" ]; then folders+=("$f"); fi
    done
    mkdir -p "$RESULTS/summary"
    scaling --combine "${folders[@]}" --out "$RESULTS/summary" | tee "$RESULTS/summary/table.txt"
}

case "${1:-}" in
setup)
    pack_on_term setup
    setup
    pack setup
    ;;
probe)
    pack_on_term probe
    # fixed costs on a small sample: import times of the launch chain, then N=4 (every GPU on a
    # machine of fewer) four times, alternating settings A and B (by default VIRNUC_DS_PRELOAD_KERNELS=0/1:
    # DeepSpeed imported beside the weight load or after it), with every rank's start-up and load steps; tests/gpu
    # beside the setup on a machine of 4 GPUs
    gpus=4
    if [ -z "${TINY:-}" ]; then gpus=$(nvidia-smi -L | wc -l); fi
    if [ "$gpus" -gt 4 ]; then gpus=4; fi
    compile_bytecode
    if [ "$gpus" -ge 4 ]; then gpu_tests 3 & fi
    for mod in torch deepspeed deepspeed.launcher.runner; do
        python3 -c "import $mod" 2> /dev/null   # warm the page cache
        /usr/bin/time -f "import $mod: %e s" python3 -c "import $mod" 2>> "$RESULTS/import_seconds.txt"
    done
    # the launcher processes only ask whether CUDA is there: does torch's NVML-based check (no CUDA
    # context) shorten their start-up?
    PYTORCH_NVML_BASED_CUDA_CHECK=1 /usr/bin/time -f "import deepspeed.launcher.runner, NVML check: %e s" \
        python3 -c "import deepspeed.launcher.runner" 2>> "$RESULTS/import_seconds.txt"
    python3 -c "import time, torch; t = time.time(); torch.cuda.init(); print('torch.cuda.init: %.2f s' % (time.time() - t))" \
        >> "$RESULTS/import_seconds.txt" 2>&1 || true
    python3 -X importtime -c "import deepspeed" 2> "$RESULTS/importtime_deepspeed.txt" || true
    python3 -X importtime -m virnuc_ds.run --help > /dev/null 2> "$RESULTS/importtime_rank.txt" || true
    python3 -c "from virnuc_ds.embed.esm2_kernels import prebuild_inference_op as b; b()" > "$RESULTS/opbuild.log" 2>&1 || true
    read -r -a workloads <<< "${PROBE_WORKLOADS:-contigs500}"
    for workload in "${workloads[@]}"; do
        seconds=$CONTIGS_S
        [ "$workload" = reads150 ] && seconds=$READS_S
        scaling --setup-only --workload "$workload" --esm-seconds "$seconds" --out "$RESULTS/setup_$workload"
    done
    wait
    port=29600
    # runs alternating settings A and B (`env` arguments, default the kernel preload off/on; and
    # scaling.py arguments, default none), on each workload in turn
    read -r -a setting_a <<< "${PROBE_A-VIRNUC_DS_PRELOAD_KERNELS=0}"
    read -r -a setting_b <<< "${PROBE_B-VIRNUC_DS_PRELOAD_KERNELS=1}"
    read -r -a args_a <<< "${PROBE_A_ARGS:-}"
    read -r -a args_b <<< "${PROBE_B_ARGS:-}"
    names=()
    for workload in "${workloads[@]}"; do
        for run in ${PROBE_RUNS:-a1 b1 a2 b2}; do
            name=p_$run
            [ "${#workloads[@]}" -gt 1 ] && name=p_${run}_$workload
            names+=("$name")
            if [ "${run:0:1}" = a ]; then setting=("${setting_a[@]}") args=("${args_a[@]}")
            else setting=("${setting_b[@]}") args=("${args_b[@]}"); fi
            echo "$name: env ${setting[*]}; scaling.py ${args[*]}" >> "$RESULTS/probe_settings.txt"
            # shellcheck disable=SC2046
            env "${setting[@]}" $(pin 0 "$gpus") python3 benchmarks/scaling.py "${COMMON[@]}" \
                --gpus "$gpus" --workload "$workload" --port $port "${args[@]}" --out "$RESULTS/$name" \
                > "$RESULTS/$name.log" 2>&1 || tail -n 20 "$RESULTS/$name.log"
            port=$((port + 20))
        done
    done
    cat "$RESULTS/import_seconds.txt" "$RESULTS/probe_settings.txt"
    tail -n 3 "$RESULTS/gpu_pytest.txt" 2> /dev/null || true
    python3 - "$RESULTS" "${names[@]}" <<'PY' || true
import json, sys
from pathlib import Path
print("run    e2e   launcher->ranks  imports  ready  after-exit  GPU-stage  ESM-2 tok/s  per rank: model_load weights embedder kernels (op import+load) kernels_wait (preloaded)")
for name in sys.argv[2:]:
    folder = Path(sys.argv[1]) / name
    if not (folder / "scaling_raw.json").exists():
        print(name, "missing"); continue
    res = next(iter(json.loads((folder / "scaling_raw.json").read_text()).values()))
    rec = json.loads((folder / "scaling_summary.json").read_text())[0]
    events = res.get("launcher_events", {})
    ranks = res["report"]["ranks"]
    steps = lambda k: " ".join("%.2f" % r.get(k, 0.0) for r in ranks)
    print("%-5s %6.1f %8.2f %12.2f %7.2f %8.2f %9.2f %10.0f   load [%s] weights [%s] embedder [%s] kernels [%s] wait [%s]" % (
        name, res["wall"], events.get("launch_py_spawns_ranks", float("nan")), max(r.get("imports", 0.0) for r in ranks),
        max(r.get("ready", 0.0) for r in ranks), res["wall"] - events.get("last_rank_exit_seen", float("nan")),
        rec["gpu_stage_wall_seconds"], rec["esm2_tokens_per_s"],
        steps("model_load"), steps("load_esm2_weights"), steps("load_esm2_embedder"), steps("load_kernels"),
        steps("load_kernels_wait")))
PY
    pack probe
    ;;
phase1)
    pack_on_term phase1
    nvidia-smi topo -m > "$RESULTS/topology.txt" 2>&1 || true
    setup
    # N=1 of each of $N1_WORKLOADS side by side on GPUs 0 and 1 (16 cores each), and on GPUs 2,3:
    # tests/gpu (unless GPU_TESTS=0), then N=2 of $N2_WORKLOADS
    gpu=0
    for workload in $N1_WORKLOADS; do
        # shellcheck disable=SC2046 # pin's words are meant to split
        $(pin $gpu 1) python3 benchmarks/scaling.py "${COMMON[@]}" --gpus 1 --workload "$workload" \
            --devices $gpu --port $((29500 + 20 * gpu)) --out "$RESULTS/${workload:0:1}1" > "$RESULTS/${workload:0:1}1.log" 2>&1 &
        gpu=$((gpu + 1))
    done
    (
        if [ "${GPU_TESTS:-1}" != 0 ]; then gpu_tests 2; fi
        port=29540
        for workload in $N2_WORKLOADS; do
            # shellcheck disable=SC2046
            $(pin 2 2) python3 benchmarks/scaling.py "${COMMON[@]}" --gpus 2 --workload "$workload" \
                --devices 2,3 --port $port --out "$RESULTS/${workload:0:1}2" || true
            port=$((port + 20))
        done
    ) > "$RESULTS/n2.log" 2>&1 &
    status=0
    for job in $(jobs -p); do wait "$job" || status=1; done
    tail -n 4 "$RESULTS"/?1.log "$RESULTS"/n2.log "$RESULTS/gpu_pytest.txt" 2> /dev/null || true
    pack phase1
    exit $status
    ;;
n2)
    pack_on_term n2
    [ -f "$WORK/contigs500.fa" ] || setup   # a fresh machine: same seeds, same samples
    pair=0
    for workload in ${N2_WORKLOADS:-contigs500 reads150}; do   # side by side, GPUs 0,1 then 2,3
        # shellcheck disable=SC2046
        $(pin $((2 * pair)) 2) python3 benchmarks/scaling.py "${COMMON[@]}" --gpus 2 --workload "$workload" \
            --devices $((2 * pair)),$((2 * pair + 1)) --port $((29540 + 20 * pair)) --out "$RESULTS/${workload:0:1}2" \
            > "$RESULTS/${workload:0:1}2.log" 2>&1 &
        pair=$((pair + 1))
    done
    status=0
    for job in $(jobs -p); do wait "$job" || status=1; done
    tail -n 4 "$RESULTS"/?2.log
    [ -n "${COMBINE:-}" ] && combine
    pack n2
    exit $status
    ;;
phase2)
    pack_on_term phase2
    setup   # a fresh machine: same seeds, same samples (written once: a warm machine reuses them)
    port=29600
    for n in $N_LARGE; do
        for workload in $N4_WORKLOADS; do
            name=${workload:0:1}$n
            # shellcheck disable=SC2046
            $(pin 0 "$n") python3 benchmarks/scaling.py "${COMMON[@]}" --gpus "$n" --workload "$workload" \
                --port $port --out "$RESULTS/$name" > "$RESULTS/$name.log" 2>&1 || tail -n 20 "$RESULTS/$name.log"
            port=$((port + 20))
        done
    done
    combine
    pack phase2
    ;;
*)
    echo "usage: $0 setup|probe|phase1|n2|phase2" >&2
    exit 2
    ;;
esac
