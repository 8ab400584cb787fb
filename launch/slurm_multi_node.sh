#!/usr/bin/env bash
# virnuc-ds on several SLURM nodes, all GPUs of each: one rank per GPU, ranks numbered across nodes.
#
#   sbatch launch/slurm_multi_node.sh
#   sbatch --nodes=4 --export=ALL,INPUT=s1.fa,OUTPUT=s1_out launch/slurm_multi_node.sh
#
# How: `srun` starts one task per node, and each runs
#   deepspeed --hostfile H --no_ssh --node_rank $SLURM_NODEID --master_addr <first node> --master_port P
#             --include <this node's GPUs> --module virnuc_ds.run ...
# which starts that node's ranks. No ssh between nodes is needed (DeepSpeed's default multi-node
# mode logs into every node with pdsh/ssh, which many clusters forbid); srun places the tasks. The
# hostfile (node names and GPU counts, from `scontrol show hostnames`) is only how DeepSpeed learns
# the world size and the global rank of each node's ranks; each node writes its own copy in $TMPDIR.
# OUTPUT must be on a file system every node sees (rank 0 prepares, every rank reads and writes parts).
#
# What to edit:
#   - the #SBATCH lines: partition/account, --nodes, --gpus-per-node (same on every node),
#     --cpus-per-task, --mem, --time;
#   - INPUT, OUTPUT, CONFIG, CLASSIFIER, CHUNK_LENGTH below, or pass them with --export as above;
#   - GPUS: GPUs per node to use (default: all SLURM gave the job on a node);
#   - EXTRA_ARGS: more `virnuc_ds.run` flags; MASTER_ADDR / MASTER_PORT to override the defaults
#     (the first node; a free port on it);
#   - your environment: the job inherits the one you submit from, or activate it below.
#
# Time limit: SLURM sends this script SIGTERM 120 s before --time runs out (--signal=B:TERM@120).
# The script sends SIGUSR1 to srun, which passes it to each node's task; the task sends SIGTERM to
# its node's ranks only (the launchers ignore SIGUSR1). Ranks finish the part in flight and exit
# with code 3; submit the same script again to resume. Stop early, keeping the work:
#   scancel --batch --signal=TERM <jobid>
#
# Exit code: 1 when any node failed (its ranks' exit 1, or a rank killed; the other nodes are then
# stopped after their part in flight); else the highest of the nodes' (srun's rule): 0 done,
# 2 incomplete result, 3 stopped by a signal (resubmit to resume).
#
#SBATCH --job-name=virnuc-ds
#SBATCH --nodes=2
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
OUTPUT=${OUTPUT:-sample_out}                       # output folder on a shared file system
CONFIG=${CONFIG:-ds_configs/virnuc_ds.yaml}        # model paths, dtypes, batch sizes
CLASSIFIER=${CLASSIFIER-500_model.pth}             # 300_model.pth or 500_model.pth; "" = the config's
CHUNK_LENGTH=${CHUNK_LENGTH:-500}                  # 300 or 500: must match the classifier
GPUS=${GPUS:-${SLURM_GPUS_ON_NODE:-$(count_gpus)}}
EXTRA_ARGS=${EXTRA_ARGS:-}
PREBUILD_OPS=${PREBUILD_OPS:-1}                    # build DeepSpeed's inference op once per node first
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

# One node's part, run by srun on every node: hostfile, GPU ids, build the op, start the launcher.
# shellcheck disable=SC2329  # called by srun, on every node
node_main() {
    local -a hosts own include=()
    local node=${SLURM_NODEID:?node_main runs under srun} hostfile slots i ids
    read -r -a hosts <<< "$NODE_HOSTS"
    if [[ -n ${CUDA_VISIBLE_DEVICES:-} ]]; then   # the GPU ids SLURM gave this node's task
        IFS=, read -r -a own <<< "$CUDA_VISIBLE_DEVICES"
        own=("${own[@]:0:$GPUS}")
    else
        read -r -a own <<< "$(seq -s ' ' 0 $((GPUS - 1)))"
    fi
    if (( ${#own[@]} != GPUS )); then
        echo "virnuc-ds: node $node ($(hostname)) has ${#own[@]} GPU(s) (CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-}), expected $GPUS" >&2
        node_failed "$node" 1
        return
    fi
    # slots cover the largest id; every node lists its GPUs, the others' count only
    slots=$GPUS
    for i in "${own[@]}"; do
        if (( i + 1 > slots )); then slots=$((i + 1)); fi
    done
    hostfile="${TMPDIR:-/tmp}/virnuc-ds-hostfile.${SLURM_JOB_ID:-0}.$node"
    : > "$hostfile"
    for i in "${!hosts[@]}"; do
        echo "${hosts[$i]} slots=$slots" >> "$hostfile"
        if (( i == node )); then
            ids=$(IFS=,; echo "${own[*]}")
        else
            ids=$(seq -s , 0 $((GPUS - 1)))
        fi
        include+=("${hosts[$i]}:$ids")
    done
    if [[ $PREBUILD_OPS == 1 ]]; then
        virnuc-ds build-ops || echo "virnuc-ds: op build failed on $(hostname); the ranks will report why" >&2
    fi
    # The launchers (and the ranks) ignore SIGUSR1: it is this task's cue to SIGTERM its ranks.
    (trap '' USR1; exec deepspeed --hostfile "$hostfile" --no_ssh --node_rank "$node" \
        --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" \
        --include "$(IFS=@; echo "${include[*]}")" --module virnuc_ds.run "$@") &
    local launcher=$!
    # shellcheck disable=SC2064  # expand $launcher now
    trap "signal_ranks $launcher" USR1 TERM
    local status=0
    wait_for "$launcher" || status=$?
    rm -f "$hostfile"
    if (( status != 0 && status != 2 && status != 3 )); then
        node_failed "$node" "$status"   # 1, or a rank killed (e.g. by the host's out-of-memory killer: 247)
        return
    fi
    return "$status"
}

# A node failed: stop the other nodes' ranks after their part in flight (instead of computing on and
# then waiting for this node at the run's end until the collective timeout), and return NODE_FAILED,
# above the stopped nodes' 3, so srun's highest exit code says "failed". The node is named in the log.
# shellcheck disable=SC2329  # called by node_main
node_failed() {
    echo "virnuc-ds: node $1 ($(hostname)) failed with exit code $2: stopping the other nodes" >&2
    if [[ -n ${SLURM_STEP_ID:-} ]] && command -v scancel > /dev/null; then
        scancel --signal=USR1 "${SLURM_JOB_ID}.${SLURM_STEP_ID}" || true
    fi
    return "$NODE_FAILED"
}

read -r -a extra <<< "$EXTRA_ARGS"
run_args=(-c "$CONFIG" -i "$INPUT" -m "$CHUNK_LENGTH" -o "$OUTPUT")
if [[ -n $CLASSIFIER ]]; then
    run_args+=(-p "$CLASSIFIER")
fi
run_args+=(${extra[@]+"${extra[@]}"})

mapfile -t hosts < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
if (( ${#hosts[@]} == 0 )); then
    echo "virnuc-ds: no nodes from 'scontrol show hostnames \$SLURM_JOB_NODELIST': run this under sbatch" >&2
    exit 1
fi
NODE_HOSTS="${hosts[*]}"
MASTER_ADDR=${MASTER_ADDR:-${hosts[0]}}
# this script runs on the first node, where rank 0 will listen
MASTER_PORT=${MASTER_PORT:-$(python -c 'import socket; s = socket.socket(); s.bind(("", 0)); print(s.getsockname()[1])')}
NODE_FAILED=4   # a failed node's task exit code (the job then exits 1)
export NODE_HOSTS MASTER_ADDR MASTER_PORT GPUS PREBUILD_OPS NODE_FAILED

echo "virnuc-ds: job ${SLURM_JOB_ID:-?}: ${#hosts[@]} node(s) (${NODE_HOSTS}) x $GPUS GPU(s), master $MASTER_ADDR:$MASTER_PORT; output $OUTPUT"
# not --kill-on-bad-exit=1: srun would end the step on any non-zero exit (3 too, a node that stopped on a
# signal) and signal the launchers, which kill their ranks mid-part; node_main stops the others itself
srun_args=(--nodes="${#hosts[@]}" --ntasks-per-node=1 --kill-on-bad-exit=0 --label)
if [[ -n ${SLURM_CPUS_PER_TASK:-} ]]; then
    srun_args+=(--cpus-per-task="$SLURM_CPUS_PER_TASK")   # srun no longer inherits it from sbatch
fi
# SLURM runs a copy of this file on the first node only: node_main travels to every node as text.
srun "${srun_args[@]}" bash -c "$(declare -f signal_ranks wait_for node_main node_failed); node_main \"\$@\"" node_main "${run_args[@]}" &
srun_pid=$!
trap 'echo "virnuc-ds: SIGTERM: the ranks stop after the part in flight; resubmit to resume" >&2; kill -USR1 "$srun_pid"' TERM
status=0
wait_for "$srun_pid" || status=$?
if (( status > 3 )); then   # a node failed (NODE_FAILED), whatever the stopped nodes returned
    status=1
fi
echo "virnuc-ds: exit code $status"
exit "$status"
