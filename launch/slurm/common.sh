#!/usr/bin/env bash
# Shared by the sbatch scripts: checkout root, Python environment or container, rendezvous address,
# ranks per node. Sourced by launch/slurm/*.sbatch after they find the checkout.
source "$DSSO_ROOT/launch/common.sh"
need_var SLURM_JOB_ID "submit this script with sbatch (or run it inside salloc)"
need_var SLURM_JOB_NODELIST "not inside a SLURM allocation"
need_cmd scontrol "SLURM's client tools must be on PATH in the job"
need_cmd srun "SLURM's client tools must be on PATH in the job"
cd "$DSSO_ROOT"

# Where to run Python: CONTAINER=<image.sif> (Apptainer/Singularity) or the checkout's .venv, else PATH.
in_container=()
if [[ -n "${CONTAINER:-}" ]]; then
    need_file "$CONTAINER" "CONTAINER must be an Apptainer image (apptainer build dsso.sif docker/ds_structopt.def)"
    runtime="${CONTAINER_RUNTIME:-apptainer}"
    need_cmd "$runtime" "CONTAINER is set but the runtime is missing (set CONTAINER_RUNTIME=singularity if that is yours)"
    # shellcheck disable=SC2206  # word-splitting the extra flags is intended
    in_container=("$runtime" exec ${CONTAINER_ARGS:---nv} --bind "$DSSO_ROOT" --pwd "$DSSO_ROOT" "$CONTAINER")
elif [[ -x "$DSSO_ROOT/.venv/bin/python" ]]; then
    export PATH="$DSSO_ROOT/.venv/bin:$PATH"
fi

# Rendezvous on the first node of the allocation; its NodeAddr (defaults to its hostname) is what
# other nodes can reach. The port is derived from the job id so two jobs sharing a node do not clash.
first_node="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"
[[ -n "$first_node" ]] || die "could not expand SLURM_JOB_NODELIST='$SLURM_JOB_NODELIST'"
if [[ -z "${MASTER_ADDR:-}" ]]; then
    MASTER_ADDR="$(scontrol show node "$first_node" -o | tr ' ' '\n' | sed -n 's/^NodeAddr=//p')"
    MASTER_ADDR="${MASTER_ADDR:-$first_node}"
fi
export MASTER_ADDR
export MASTER_PORT="${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}"
NNODES="${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-1}}"

# Ranks per node: NPROC_PER_NODE, else the GPUs SLURM gave each node (--gpus-per-node / --gres=gpu:N).
gpus_per_node() {
    local g="${SLURM_GPUS_ON_NODE:-${SLURM_GPUS_PER_NODE:-}}"
    g="${g##*:}"; g="${g%%(*}"
    [[ "$g" =~ ^[0-9]+$ ]] && echo "$g"
    return 0
}

# One OpenMP thread pool per rank over the node's CPUs (oversubscribing cores slows LAPACK ~100x).
omp_threads_for() {
    local cpus="${SLURM_CPUS_ON_NODE:-1}"
    export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(( cpus / $1 > 0 ? cpus / $1 : 1 ))}"
}

train_args_or_default() {
    TRAIN_ARGS=("$@")
    (( ${#TRAIN_ARGS[@]} )) || TRAIN_ARGS=("${default_train_args[@]}" --output-dir "runs/slurm-$SLURM_JOB_ID")
    # A requeued job (preempted, node failure, or requeue_if_preempted below) continues its own run:
    # without --resume the entry point would refuse (or with --overwrite delete) the checkpoints.
    if (( ${SLURM_RESTART_COUNT:-0} > 0 )) && [[ " ${TRAIN_ARGS[*]} " != *" --resume "* ]]; then
        echo "dsso: restart ${SLURM_RESTART_COUNT} of job $SLURM_JOB_ID: adding --resume"
        TRAIN_ARGS+=(--resume)
    fi
    OUTPUT_DIR=runs/train  # the entry point's default
    local i
    for (( i = 0; i < ${#TRAIN_ARGS[@]}; i++ )); do
        case "${TRAIN_ARGS[i]}" in
            --output-dir|--output_dir) OUTPUT_DIR="${TRAIN_ARGS[i + 1]:-$OUTPUT_DIR}" ;;
            --output-dir=*|--output_dir=*) OUTPUT_DIR="${TRAIN_ARGS[i]#*=}" ;;
        esac
    done
    LATEST_BEFORE="$(cat "$OUTPUT_DIR/checkpoints/latest" 2>/dev/null || true)"
    STARTED="$(date +%s)"
}

# After the launcher returned 0: if the ranks stopped for a signal (#SBATCH --signal=USR1@300 ahead
# of the time limit) they saved a checkpoint and wrote "preempted" to result.json; put the job
# back in the queue (same job id, SLURM_RESTART_COUNT + 1) so it resumes. Only when this attempt
# published a newer checkpoint: a job that cannot make progress is not requeued forever.
requeue_if_preempted() {
    local result="$OUTPUT_DIR/result.json" latest
    [[ -f "$result" ]] && (( $(stat -c %Y "$result") >= STARTED )) || return 0
    grep -q '"preempted": {' "$result" || return 0
    latest="$(cat "$OUTPUT_DIR/checkpoints/latest" 2>/dev/null || true)"
    if [[ -z "$latest" || "$latest" == "$LATEST_BEFORE" ]]; then
        echo "dsso: preempted without a new checkpoint (newest: ${latest:-none}); not requeueing" >&2
        return 0
    fi
    echo "dsso: preempted at $latest; requeueing job $SLURM_JOB_ID (it resumes from there)"
    scontrol requeue "$SLURM_JOB_ID" || die "scontrol requeue failed; resubmit with --resume to continue"
}
