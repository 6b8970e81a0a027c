#!/usr/bin/env bash
# Swin-B supervised on ImageNet-22K: 2 nodes x 8 GPUs (global batch 4096 = 128 x 16 x 2 accumulation).
# Submit from the repository root (extra arguments are config overrides):
#   sbatch slurm/swin_b_22k.sh [--set section.key=value ...]
#SBATCH --job-name=swin_b_22k
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
# 12 CPUs per task (96 per node): the training process and its 10 data workers (data.workers);
# launch/slurm_job.sh hands them to srun and binds them to cores where the cluster can.
#SBATCH --cpus-per-task=12
#SBATCH --time=48:00:00
#SBATCH --signal=B:USR1@180
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%j.out
exec bash "${SLURM_SUBMIT_DIR:-.}/launch/slurm_job.sh" configs/swin_b_22k.yaml "$@"
