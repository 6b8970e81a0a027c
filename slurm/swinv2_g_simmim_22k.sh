#!/usr/bin/env bash
# SwinV2-G (3B) SimMIM on ImageNet-22K: 8 nodes x 8 GPUs, ZeRO-1 + activation checkpointing (global batch 2048 = 16 x 64 x 2).
# Submit from the repository root (extra arguments are config overrides):
#   sbatch slurm/swinv2_g_simmim_22k.sh [--set section.key=value ...]
#SBATCH --job-name=swinv2_g_simmim_22k
#SBATCH --nodes=8
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
# 12 CPUs per task (96 per node): the training process and its 10 data workers (data.workers);
# launch/slurm_job.sh hands them to srun and binds them to cores where the cluster can.
#SBATCH --cpus-per-task=12
#SBATCH --time=72:00:00
#SBATCH --signal=B:USR1@180
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%j.out
exec bash "${SLURM_SUBMIT_DIR:-.}/launch/slurm_job.sh" configs/swinv2_g_simmim_22k.yaml "$@"
