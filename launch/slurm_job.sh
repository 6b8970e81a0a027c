#!/usr/bin/env bash
# Body of every slurm/*.sh batch script: one training process per task (one per GPU) via
# srun, and requeue after a preemption-triggered checkpoint.
#   launch/slurm_job.sh CONFIG [--set section.key=value ...]
#
# Ranks find each other from Slurm's environment (launch/env.py: SLURM_PROCID, SLURM_NTASKS,
# first host of SLURM_JOB_NODELIST as master). On preemption Slurm sends SIGUSR1 to this
# shell 180 s before the end (--signal=B:USR1@180); it is forwarded to the tasks, every rank
# agrees to stop, a checkpoint is written, rank 0 leaves RUN_DIR/stopped_on_signal, the
# tasks exit with code 3 and the job requeues itself. A signal sent straight to the tasks (scancel --signal=USR1) ends the same way.
# The requeued job resumes from the run's latest checkpoint.
set -uo pipefail
CONFIG=$1
shift
cd "${SLURM_SUBMIT_DIR:-$(pwd)}"
PYTHON=${PYTHON:-.venv/bin/python}
EXIT_PREEMPTED=3

if ! "$PYTHON" -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
    export DS_ACCELERATOR=cpu   # a CPU-only cluster (or the CI's loopback one): gloo
fi
RUN_DIR=$("$PYTHON" -m pretrain.config --run-dir --config "$CONFIG" "$@") || exit 2
mkdir -p "$RUN_DIR"
JOB_OUT="$PWD/slurm-${SLURM_JOB_NAME:-job}-${SLURM_JOB_ID:-0}.out"
[ -f "$JOB_OUT" ] && ln -sf "$JOB_OUT" "$RUN_DIR/"
echo "job ${SLURM_JOB_ID:-?} (restart ${SLURM_RESTART_COUNT:-0}) on ${SLURM_JOB_NODELIST:-?}: $CONFIG -> $RUN_DIR"

preempted=0
srun_pid=
rm -f "$RUN_DIR/stopped_on_signal"
on_signal() {
    preempted=1
    echo "batch shell got a stop signal: asking every rank to checkpoint"
    [ -n "$srun_pid" ] && kill -USR1 "$srun_pid" 2>/dev/null
}
trap on_signal USR1 TERM

srun --kill-on-bad-exit=1 "$PYTHON" pretrain/main.py --config "$CONFIG" "$@" &
srun_pid=$!
status=0
# `wait` returns early when a trapped signal arrives; keep waiting until srun is done.
while true; do
    wait "$srun_pid"
    status=$?
    kill -0 "$srun_pid" 2>/dev/null || break
done

if [ "$preempted" = 1 ] || [ "$status" = "$EXIT_PREEMPTED" ] || [ -f "$RUN_DIR/stopped_on_signal" ]; then
    echo "checkpoint written; requeueing job ${SLURM_JOB_ID}"
    scontrol requeue "$SLURM_JOB_ID"
    exit 0
fi
exit "$status"
