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
#
# CPUs: srun of Slurm 22.05-23.02 does not pass the job's --cpus-per-task on to the tasks
# (each would get one CPU for itself and its data workers), so it is passed explicitly and
# OMP_NUM_THREADS defaults to it. Where the cluster can bind (task/affinity or task/cgroup),
# each task's CPUs are whole cores, laid out socket by socket (local ranks 0-3 on the first
# socket, next to GPUs 0-3 on common 8-GPU nodes).
# GPUs are deliberately not bound per task: a process that sees only its own GPU cannot
# map its peers' memory, so NCCL falls back from NVLink to slower paths; every task sees
# the node's GPUs and takes the one of its LOCAL_RANK. A cluster (or SLURM_GPU_BIND, read
# by srun) that binds one GPU per task works too (pretrain/parallel/topology.py).
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

srun_args=(--kill-on-bad-exit=1)
if [ -n "${SLURM_CPUS_PER_TASK:-}" ]; then
    srun_args+=("--cpus-per-task=$SLURM_CPUS_PER_TASK")
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$SLURM_CPUS_PER_TASK}
fi
if scontrol show config 2>/dev/null | grep -qE '^TaskPlugin .*task/(affinity|cgroup)'; then
    srun_args+=(--cpu-bind=cores --distribution=block:block)
fi
echo "srun ${srun_args[*]}"
# The first task of every node reports the CPUs it may run on (nproc without the OMP cap).
report='[ "${SLURM_LOCALID:-0}" = 0 ] && echo "rank $SLURM_PROCID on $(hostname): $(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc) CPUs (SLURM_CPUS_PER_TASK=${SLURM_CPUS_PER_TASK:-unset})"; exec "$@"'
srun "${srun_args[@]}" bash -c "$report" task "$PYTHON" pretrain/main.py --config "$CONFIG" "$@" &
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
