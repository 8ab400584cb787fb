#!/usr/bin/env bash
# virnuc-ds on all GPUs of one PBS Pro / OpenPBS node: one rank per GPU under the DeepSpeed launcher.
#
#   qsub launch/pbs_single_node.sh
#   qsub -v INPUT=s1.fa,OUTPUT=s1_out launch/pbs_single_node.sh      (no editing needed)
#
# What to edit:
#   - the #PBS lines: queue/project of your site, ngpus (the GPUs), ncpus (prepare uses every core),
#     mem, walltime. Torque spells the resources `-l nodes=1:ppn=32:gpus=4`;
#   - INPUT, OUTPUT, CONFIG, CLASSIFIER, CHUNK_LENGTH below, or pass them with qsub -v as above;
#   - GPUS: how many GPUs to use (default: those PBS gave the job, else every GPU nvidia-smi lists);
#   - EXTRA_ARGS: more `virnuc_ds.run` flags, e.g. "--esm-batch-tokens 32768" (out of memory);
#   - your environment: activate it below (`source /path/to/venv/bin/activate`, `module load ...`).
# Relative paths are relative to the folder qsub was run from.
#
# Time limit: PBS signals every process of the job at walltime and kills them soon after (its
# kill_delay, often 10 s), too soon to finish a part. So this script stops the ranks itself
# STOP_MARGIN seconds (default 600) before the walltime it reads from `qstat -f`, or after
# RUN_SECONDS if you set that: the ranks finish the part in flight and exit with code 3. Submit the
# same script again to resume. `qdel` (SIGTERM) is passed on to the ranks the same way.
#
# Exit code (the runner's): 0 done, 1 failure, 2 incomplete result, 3 stopped (resubmit to resume).
#
#PBS -N virnuc-ds
#PBS -l select=1:ncpus=32:ngpus=4:mem=256gb
#PBS -l walltime=24:00:00
#PBS -j oe

set -euo pipefail

# GPUs nvidia-smi lists (0 without nvidia-smi)
count_gpus() { nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true; }

# ---- edit here ---------------------------------------------------------------------------------
INPUT=${INPUT:-sample.fa}                          # nucleotide FASTA (.gz accepted)
OUTPUT=${OUTPUT:-sample_out}                       # output folder; rerunning resumes in it
CONFIG=${CONFIG:-ds_configs/virnuc_ds.yaml}        # model paths, dtypes, batch sizes
CLASSIFIER=${CLASSIFIER-500_model.pth}             # 300_model.pth or 500_model.pth; "" = the config's
CHUNK_LENGTH=${CHUNK_LENGTH:-500}                  # 300 or 500: must match the classifier
GPUS=${GPUS:-}                                     # default: all the job's GPUs
EXTRA_ARGS=${EXTRA_ARGS:-}
RUN_SECONDS=${RUN_SECONDS:-}                       # default: walltime - STOP_MARGIN
STOP_MARGIN=${STOP_MARGIN:-600}
PREBUILD_OPS=${PREBUILD_OPS:-1}                    # build DeepSpeed's inference op once first
# source /path/to/venv/bin/activate
# -------------------------------------------------------------------------------------------------

if [[ -n ${PBS_O_WORKDIR:-} ]]; then
    cd "$PBS_O_WORKDIR"
fi

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

# The job's walltime in seconds, from qstat (empty when unknown).
walltime_seconds() {
    local hms
    hms=$(qstat -f "${PBS_JOBID:-}" 2>/dev/null | sed -n 's/^ *Resource_List.walltime = //p' | head -n 1)
    if [[ $hms =~ ^([0-9]+):([0-9]+):([0-9]+)$ ]]; then
        echo $((10#${BASH_REMATCH[1]} * 3600 + 10#${BASH_REMATCH[2]} * 60 + 10#${BASH_REMATCH[3]}))
    fi
}

read -r -a extra <<< "$EXTRA_ARGS"
run_args=(-c "$CONFIG" -i "$INPUT" -m "$CHUNK_LENGTH" -o "$OUTPUT")
if [[ -n $CLASSIFIER ]]; then
    run_args+=(-p "$CLASSIFIER")
fi
run_args+=(${extra[@]+"${extra[@]}"})

# The GPUs: keep the ids PBS gave the job in CUDA_VISIBLE_DEVICES (--num_gpus would renumber them).
if [[ -n ${CUDA_VISIBLE_DEVICES:-} ]]; then
    IFS=, read -r -a visible <<< "$CUDA_VISIBLE_DEVICES"
    GPUS=${GPUS:-${#visible[@]}}
    ids=$(IFS=,; echo "${visible[*]:0:$GPUS}")
    gpu_args=(--include "localhost:$ids")
else
    GPUS=${GPUS:-$(count_gpus)}
    gpu_args=(--num_gpus "$GPUS")
fi
master_port=${MASTER_PORT:-$(python -c 'import socket; s = socket.socket(); s.bind(("", 0)); print(s.getsockname()[1])')}
if [[ -z $RUN_SECONDS ]]; then
    walltime=$(walltime_seconds)
    if [[ -n $walltime ]]; then
        RUN_SECONDS=$((walltime > STOP_MARGIN ? walltime - STOP_MARGIN : walltime / 2))
    fi
fi

echo "virnuc-ds: job ${PBS_JOBID:-?} on $(hostname), $GPUS GPU(s): ${gpu_args[*]}; output $OUTPUT; stop after ${RUN_SECONDS:-(no limit)} s"
if [[ $PREBUILD_OPS == 1 ]]; then
    virnuc-ds build-ops || echo "virnuc-ds: op build failed; the ranks will report why (or fall back, see esm2.fallback_to_eager)" >&2
fi

deepspeed "${gpu_args[@]}" --master_port "$master_port" --module virnuc_ds.run "${run_args[@]}" &
launcher=$!
trap 'echo "virnuc-ds: SIGTERM: the ranks stop after the part in flight; resubmit to resume" >&2; signal_ranks "$launcher"' TERM
timer=
if [[ -n $RUN_SECONDS ]]; then
    { sleep "$RUN_SECONDS" && echo "virnuc-ds: $RUN_SECONDS s are up: the ranks stop after the part in flight; resubmit to resume" >&2 \
        && signal_ranks "$launcher"; } &
    timer=$!
fi
status=0
wait_for "$launcher" || status=$?
if [[ -n $timer ]]; then
    pkill -P "$timer" 2>/dev/null || true
    kill "$timer" 2>/dev/null || true
fi
echo "virnuc-ds: exit code $status"
exit "$status"
