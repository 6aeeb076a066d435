#!/usr/bin/env bash
# Shared body of the d2v2scale sbatch scripts: rank set-up, NCCL knobs, optional data staging, and a
# dry-run mode; then it hands the job to the supervisor (python -m d2v2scale.resilience.supervisor),
# which runs the training step, restarts it after a crash or a hang, requeues on the time limit and
# stops on a cancel or bad input. Sourced, not run.
#
# Layout: one Slurm task per GPU (srun --ntasks-per-node = GPUs per node). Each task is one
# training rank; d2v2scale reads SLURM_PROCID / SLURM_LOCALID / SLURM_NTASKS itself. This keeps
# Slurm in charge of process placement, signals and exit codes (no ssh/pdsh launcher between nodes,
# no second process supervisor), which is what makes pre-emption and requeue reliable.
#
# Knobs (environment variables; sbatch options such as --nodes and --time are the usual flags):
#   PRESET, DS_CONFIG        what to train (set by the calling script, may be overridden)
#   DATA_PATH                dataset folder / manifest / token prefix (data.path)
#   RUN_DIR                  run directory (default runs/<job name>: the same command continues the same run)
#   TP                       tensor-parallel degree; unset: the planner chooses the layout (below)
#   SCALE_BATCH              none | linear: grow global batch and LR when the GPUs cannot split it
#   AUTO_PLAN                1 (default when TP is unset): `python -m d2v2scale.plan --search` picks TP,
#                            micro-batch, ZeRO stage, activation checkpointing and batch scaling for
#                            this node count, prints what it chose and why, and writes the tuned
#                            DeepSpeed JSON to RUN_DIR/ds_config.plan.json; 0: use TP/DS_CONFIG as given
#   EXTRA                    more section.key=value overrides, space separated
#   STAGE_DATA               1: copy the data set (a folder, or what a prepared index or manifest lists) to
#                            node-local $STAGE_DIR once per node and train on the copy (default 0)
#   STAGE_DIR                node-local scratch (default ${TMPDIR:-/tmp}/d2v2scale-$SLURM_JOB_ID)
#   PYTHON                   interpreter (default: .venv/bin/python if present, else python3)
#   NCCL_SOCKET_IFNAME, NCCL_IB_HCA, NCCL_IB_GID_INDEX, NCCL_DEBUG   passed through when set
#   DRY_RUN                  1: print the batch math, the memory plan and the exact command; launch nothing
#   MAX_RESTARTS             restarts of a crashed or hung training step per job (default 3)
#   RESTART_BACKOFF_S        wait before the first restart, doubled for each next one (default 30)
#   SIGNAL_LEAD_S            ask for a checkpoint this long before the time limit (default 600; a short
#                            limit gets a fifth of itself)
#   NODES, GPUS_PER_NODE     with DRY_RUN outside a job: the sizes to plan for (default 32 and 8)
set -euo pipefail

: "${PRESET:?PRESET must be set}"
: "${DS_CONFIG:?DS_CONFIG must be set}"
if [[ -z "${TP:-}" ]]; then AUTO_PLAN="${AUTO_PLAN:-1}"; else AUTO_PLAN="${AUTO_PLAN:-0}"; fi
TP="${TP:-1}"
SCALE_BATCH="${SCALE_BATCH:-none}"
PLAN_OVERRIDES=""
EXTRA="${EXTRA:-}"
STAGE_DATA="${STAGE_DATA:-0}"
ROOT="${SLURM_SUBMIT_DIR:-$(pwd)}"
cd "$ROOT"
if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
NODES="${SLURM_JOB_NUM_NODES:-${NODES:-32}}"
GPUS_PER_NODE="${SLURM_NTASKS_PER_NODE:-${GPUS_PER_NODE:-8}}"
GPUS_PER_NODE="${GPUS_PER_NODE%%(*}"  # Slurm may report "8(x32)"
RUN_DIR="${RUN_DIR:-runs/${SLURM_JOB_NAME:-d2v2-${PRESET}}}"

read -r -a extra_overrides <<< "$EXTRA"
if [[ "$AUTO_PLAN" == "1" ]]; then
    if [[ "${DRY_RUN:-0}" == "1" ]]; then plan_ds="$(mktemp -t d2v2scale-plan-XXXXXX.json)"; trap 'rm -f "$plan_ds"' EXIT; else
        mkdir -p "$RUN_DIR"; plan_ds="$RUN_DIR/ds_config.plan.json"; fi
    echo "# planning ${PRESET} for ${NODES} nodes x ${GPUS_PER_NODE} GPUs (python -m d2v2scale.plan --search):"
    plan_shell="$("$PYTHON" -m d2v2scale.plan --search --shell --preset "$PRESET" --ds_config "$DS_CONFIG" \
        --nodes "$NODES" --gpus_per_node "$GPUS_PER_NODE" --write_ds_config "$plan_ds" "${extra_overrides[@]}")"
    eval "$plan_shell"  # sets TP, SCALE_BATCH, PLAN_OVERRIDES
    DS_CONFIG="$plan_ds"
fi
overrides=("parallel.tp=${TP}" "train.batch_scaling=${SCALE_BATCH}")
read -r -a plan_overrides <<< "$PLAN_OVERRIDES"
overrides+=("${plan_overrides[@]}")
if [[ -n "${DATA_PATH:-}" ]]; then overrides+=("data.path=${DATA_PATH}"); fi
overrides+=("${extra_overrides[@]}")

if [[ "${DRY_RUN:-0}" == "1" ]]; then
    echo "# d2v2scale dry run: ${PRESET} on ${NODES} nodes x ${GPUS_PER_NODE} GPUs (tp=${TP}, batch scaling ${SCALE_BATCH})"
    WORLD_SIZE=$((NODES * GPUS_PER_NODE)) RANK=0 "$PYTHON" launchers/pretrain.py --dry_run \
        --ds_config "$DS_CONFIG" --preset "$PRESET" --run_dir "$RUN_DIR" "${overrides[@]}"
    echo "# memory, communication and step time of this layout:"
    "$PYTHON" -m d2v2scale.plan --preset "$PRESET" --ds_config "$DS_CONFIG" --nodes "$NODES" \
        --gpus_per_node "$GPUS_PER_NODE" --tp "$TP" "${overrides[@]}"
    # Can this node start the job? A login node without GPUs reports blockers here that a GPU node would not
    # have; every node of the job checks itself again before training.
    echo "# this node (python -m d2v2scale.doctor; each node of the job runs it again before training):"
    doctor_args=(--ds_config "$DS_CONFIG" --run_dir "$RUN_DIR" --preset "$PRESET")
    if [[ -n "${DATA_PATH:-}" ]]; then doctor_args+=(--data_path "$DATA_PATH"); fi
    "$PYTHON" -m d2v2scale.doctor "${doctor_args[@]}" "${overrides[@]}" || true
    echo "# command (under $PYTHON -m d2v2scale.resilience.supervisor --run_dir $RUN_DIR --):"
    echo "srun --kill-on-bad-exit=1 --ntasks-per-node=${GPUS_PER_NODE} $PYTHON launchers/pretrain.py" \
         "--ds_config $DS_CONFIG --preset $PRESET --run_dir $RUN_DIR --resume auto ${overrides[*]}"
    exit 0
fi

MASTER_ADDR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"
MASTER_PORT="$((20000 + SLURM_JOB_ID % 20000))"
export MASTER_ADDR MASTER_PORT
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}"
# Surface NCCL failures as errors instead of hangs; everything else NCCL (NCCL_SOCKET_IFNAME,
# NCCL_IB_HCA, NCCL_IB_GID_INDEX, ...) comes from the caller's environment, never hard-coded here.
export TORCH_NCCL_ASYNC_ERROR_HANDLING="${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}"
# The flight recorder keeps each rank's last collectives; the hang watchdog dumps them beside its stacks.
export TORCH_FR_BUFFER_SIZE="${TORCH_FR_BUFFER_SIZE:-2000}"
export NCCL_DEBUG="${NCCL_DEBUG:-WARN}"

# Once per node, before anything starts: can this node run the job (python -m d2v2scale.doctor: GPUs, CUDA and
# driver, DeepSpeed ops, DALI's CUDA flavour, InfiniBand, NCCL_*, the ds_config, the run directory's space, the
# data set)? Every node answers, so one log names every node with a blocker; then the job fails here, exit 2,
# with their FAIL lines. The first node's report is printed in full, the others' verdicts.
echo "[slurm] checking every node (python -m d2v2scale.doctor)"
doctor_args=(--ds_config "$DS_CONFIG" --run_dir "$RUN_DIR" --preset "$PRESET")
if [[ -n "${DATA_PATH:-}" ]]; then doctor_args+=(--data_path "$DATA_PATH"); fi
doctor_rc=0
doctor="$(srun --nodes="$NODES" --ntasks="$NODES" --ntasks-per-node=1 --kill-on-bad-exit=0 --label "$PYTHON" \
    -m d2v2scale.doctor "${doctor_args[@]}" "${overrides[@]}" 2>&1)" || doctor_rc=$?
printf '%s\n' "$doctor" | grep -E '^ *0: ' || true                             # the first node in full
printf '%s\n' "$doctor" | grep -E '^ *[1-9][0-9]*: [a-zA-Z]+ +verdict: ' || true  # the others' verdicts
if [[ "$doctor_rc" != 0 ]]; then
    printf '%s\n' "$doctor" | grep -E '^ *[1-9][0-9]*: FAIL ' | grep -v ' verdict: ' >&2 || true
    echo "[slurm] a node cannot start this job (python -m d2v2scale.doctor, above); nothing launched" >&2
    exit 2
fi

if [[ "$STAGE_DATA" == "1" && -n "${DATA_PATH:-}" ]]; then
    # Once per node: what DATA_PATH consists of (a folder, or every file a prepared index or manifest lists),
    # copied to node-local storage with an index that points at the copy; a refusal (no space, missing
    # files) is one line and fails the job here, before training starts. A requeue reuses what is there.
    STAGE_DIR="${STAGE_DIR:-${TMPDIR:-/tmp}/d2v2scale-${SLURM_JOB_ID}}"
    echo "[slurm] staging ${DATA_PATH} to ${STAGE_DIR} on every node"
    staged="$(srun --nodes="$NODES" --ntasks="$NODES" --ntasks-per-node=1 --kill-on-bad-exit=1 "$PYTHON" \
        -m d2v2scale.data.stage "$DATA_PATH" "$STAGE_DIR")"
    printf '%s\n' "$staged" | grep '^stage:' || true
    overrides+=("data.path=$(printf '%s\n' "$staged" | tail -n 1)")
fi

mkdir -p "$RUN_DIR"
echo "[slurm] job ${SLURM_JOB_ID} restart ${SLURM_RESTART_COUNT:-0}: ${NODES} nodes, master ${MASTER_ADDR}:${MASTER_PORT}, run dir ${RUN_DIR}"

# The supervisor becomes the batch shell (exec): Slurm's signals reach it, and it decides what a finished,
# failed, hung or signalled training step means for the job (see d2v2scale/resilience/supervisor.py).
exec "$PYTHON" -m d2v2scale.resilience.supervisor --run_dir "$RUN_DIR" -- \
    srun --kill-on-bad-exit=1 --ntasks-per-node="$GPUS_PER_NODE" "$PYTHON" launchers/pretrain.py \
    --ds_config "$DS_CONFIG" --preset "$PRESET" --run_dir "$RUN_DIR" --resume auto "${overrides[@]}"
