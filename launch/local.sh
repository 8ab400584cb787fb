#!/usr/bin/env bash
# virnuc-ds on this machine: one rank per GPU under the DeepSpeed launcher (one CPU rank if no GPU).
#
#   launch/local.sh
#   INPUT=s1.fa OUTPUT=s1_out GPU_IDS=0,1 launch/local.sh              (no editing needed)
#
# What to edit (or set in the environment as above):
#   - INPUT, OUTPUT, CONFIG, CLASSIFIER, CHUNK_LENGTH below;
#   - GPUS: how many GPUs (default: all that nvidia-smi lists; none = one CPU rank), or
#     GPU_IDS: which ones, as the machine numbers them, e.g. 0,2,3;
#   - EXTRA_ARGS: more `virnuc_ds.run` flags, e.g. "--esm-batch-tokens 32768" (out of memory);
#   - your environment: activate it first (`source /path/to/venv/bin/activate`).
# No time limit here. `virnuc-ds run -c ... -i ... -o ...` does the same without this script.
#
# Ctrl-C or SIGTERM: the ranks finish the part in flight and exit with code 3 (rerun to resume);
# a second Ctrl-C stops everything at once (finished parts are still kept).
#
# Exit code (the runner's): 0 done, 1 failure, 2 incomplete result, 3 stopped (rerun to resume).

set -euo pipefail

# GPUs nvidia-smi lists (0 without nvidia-smi)
count_gpus() { nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true; }

# ---- edit here ---------------------------------------------------------------------------------
INPUT=${INPUT:-sample.fa}                          # nucleotide FASTA (.gz accepted)
OUTPUT=${OUTPUT:-sample_out}                       # output folder; rerunning resumes in it
CONFIG=${CONFIG:-ds_configs/virnuc_ds.yaml}        # model paths, dtypes, batch sizes
CLASSIFIER=${CLASSIFIER-500_model.pth}             # 300_model.pth or 500_model.pth; "" = the config's
CHUNK_LENGTH=${CHUNK_LENGTH:-500}                  # 300 or 500: must match the classifier
GPUS=${GPUS:-$(count_gpus)}
GPU_IDS=${GPU_IDS:-}
EXTRA_ARGS=${EXTRA_ARGS:-}
PREBUILD_OPS=${PREBUILD_OPS:-1}                    # build DeepSpeed's inference op once first
# -------------------------------------------------------------------------------------------------

# SIGTERM to the ranks only: the children of every deepspeed.launcher.launch process under $1.
# (DeepSpeed's launchers, signalled themselves, kill their ranks 30 s later, mid-part.)
# shellcheck disable=SC2329  # called from a trap
signal_ranks() {
    local pid
    for pid in $(pgrep -P "$1"); do
        if [[ $(ps -o args= -p "$pid") == *deepspeed.launcher.launch* ]]; then
            pkill -TERM -P "$pid" || true
        else
            signal_ranks "$pid"
        fi
    done
}

# Wait for process $1 and return its exit code (a trapped signal interrupts `wait`: wait again).
wait_for() {
    local status=0
    wait "$1" || status=$?
    while kill -0 "$1" 2>/dev/null; do
        status=0
        wait "$1" || status=$?
    done
    return "$status"
}

# shellcheck disable=SC2329  # called from a trap
on_signal() {
    stops=$((stops + 1))
    if (( stops == 1 )); then
        echo "virnuc-ds: stopping: the ranks finish the part in flight (Ctrl-C again to stop at once)" >&2
        signal_ranks "$launcher"
    else
        kill -KILL -- "-$launcher" 2>/dev/null || true
    fi
}

read -r -a extra <<< "$EXTRA_ARGS"
run_args=(-c "$CONFIG" -i "$INPUT" -m "$CHUNK_LENGTH" -o "$OUTPUT")
if [[ -n $CLASSIFIER ]]; then
    run_args+=(-p "$CLASSIFIER")
fi
run_args+=(${extra[@]+"${extra[@]}"})

if [[ -n $GPU_IDS ]]; then
    gpu_args=(--include "localhost:$GPU_IDS")
elif (( GPUS > 0 )); then
    gpu_args=(--num_gpus "$GPUS")
else
    gpu_args=(--num_gpus 1)   # no GPU: one CPU rank
fi
master_port=${MASTER_PORT:-$(python -c 'import socket; s = socket.socket(); s.bind(("", 0)); print(s.getsockname()[1])')}

if [[ $PREBUILD_OPS == 1 ]]; then
    virnuc-ds build-ops || echo "virnuc-ds: op build failed; the ranks will report why (or fall back, see esm2.fallback_to_eager)" >&2
fi

# Job control puts the launcher in its own process group: Ctrl-C reaches this script only, which
# stops the ranks gently instead of letting the launchers kill them.
set -m
deepspeed "${gpu_args[@]}" --master_port "$master_port" --module virnuc_ds.run "${run_args[@]}" &
launcher=$!
set +m
stops=0
trap on_signal INT TERM
status=0
wait_for "$launcher" || status=$?
exit "$status"
