#!/usr/bin/env bash
# virnuc-ds on all GPUs of one SLURM node: one rank per GPU under the DeepSpeed launcher.
#
#   sbatch launch/slurm_single_node.sh
#   sbatch --export=ALL,INPUT=s1.fa,OUTPUT=s1_out launch/slurm_single_node.sh   (no editing needed)
#
# What to edit:
#   - the #SBATCH lines: partition/account of your site, --gpus-per-node (the GPUs), --cpus-per-task
#     (prepare uses every core it gets), --mem, and --time (the wall-time limit);
#   - INPUT, OUTPUT, CONFIG, CLASSIFIER, CHUNK_LENGTH below, or pass them with --export as above;
#   - GPUS: how many of the job's GPUs to use (default: all SLURM gave the job);
#   - EXTRA_ARGS: more `virnuc_ds.run` flags, e.g. "--esm-batch-tokens 32768" (out of memory);
#   - your environment: the job inherits the one you submit from (sbatch exports it); or activate
#     it below (`source /path/to/venv/bin/activate`, `module load ...`).
# Submit from the folder the relative paths are relative to.
#
# Time limit: SLURM sends this script SIGTERM 120 s before --time runs out (--signal=B:TERM@120).
# The script passes it on to the ranks only; they finish the part in flight, keep every finished
# part, and exit with code 3. Submit the same script again to resume. If one part takes longer than
# 120 s (run.frames_per_part frames a rank), raise the 120. To stop a job early and keep its work:
#   scancel --batch --signal=TERM <jobid>
#
# Exit code (the runner's): 0 done, 1 failure (bad input, missing model, bad config), 2 incomplete
# result, 3 stopped by a signal (resubmit to resume).
#
#SBATCH --job-name=virnuc-ds
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=4
#SBATCH --cpus-per-task=32
#SBATCH --mem=256G
#SBATCH --time=24:00:00
#SBATCH --signal=B:TERM@120
#SBATCH --output=virnuc-ds-%j.log

set -euo pipefail

# GPUs nvidia-smi lists (0 without nvidia-smi)
count_gpus() { nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true; }

# ---- edit here ---------------------------------------------------------------------------------
INPUT=${INPUT:-sample.fa}                          # nucleotide FASTA (.gz accepted)
OUTPUT=${OUTPUT:-sample_out}                       # output folder; rerunning resumes in it
CONFIG=${CONFIG:-ds_configs/virnuc_ds.yaml}        # model paths, dtypes, batch sizes
CLASSIFIER=${CLASSIFIER-500_model.pth}             # 300_model.pth or 500_model.pth; "" = the config's
CHUNK_LENGTH=${CHUNK_LENGTH:-500}                  # 300 or 500: must match the classifier
GPUS=${GPUS:-${SLURM_GPUS_ON_NODE:-$(count_gpus)}}
EXTRA_ARGS=${EXTRA_ARGS:-}
PREBUILD_OPS=${PREBUILD_OPS:-1}                    # build DeepSpeed's inference op once first
# source /path/to/venv/bin/activate
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

read -r -a extra <<< "$EXTRA_ARGS"
run_args=(-c "$CONFIG" -i "$INPUT" -m "$CHUNK_LENGTH" -o "$OUTPUT")
if [[ -n $CLASSIFIER ]]; then
    run_args+=(-p "$CLASSIFIER")
fi
run_args+=(${extra[@]+"${extra[@]}"})

# The GPUs: SLURM names the job's GPUs in CUDA_VISIBLE_DEVICES; keep those ids (--num_gpus would
# renumber them from 0).
if [[ -n ${CUDA_VISIBLE_DEVICES:-} ]]; then
    IFS=, read -r -a visible <<< "$CUDA_VISIBLE_DEVICES"
    ids=$(IFS=,; echo "${visible[*]:0:$GPUS}")
    gpu_args=(--include "localhost:$ids")
else
    gpu_args=(--num_gpus "$GPUS")
fi
master_port=${MASTER_PORT:-$(python -c 'import socket; s = socket.socket(); s.bind(("", 0)); print(s.getsockname()[1])')}

echo "virnuc-ds: job ${SLURM_JOB_ID:-?} on $(hostname), $GPUS GPU(s): ${gpu_args[*]}; output $OUTPUT"
if [[ $PREBUILD_OPS == 1 ]]; then
    virnuc-ds build-ops || echo "virnuc-ds: op build failed; the ranks will report why (or fall back, see esm2.fallback_to_eager)" >&2
fi

deepspeed "${gpu_args[@]}" --master_port "$master_port" --module virnuc_ds.run "${run_args[@]}" &
launcher=$!
trap 'echo "virnuc-ds: SIGTERM: the ranks stop after the part in flight; resubmit to resume" >&2; signal_ranks "$launcher"' TERM
status=0
wait_for "$launcher" || status=$?
echo "virnuc-ds: exit code $status"
exit "$status"
