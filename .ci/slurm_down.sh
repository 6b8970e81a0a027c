#!/usr/bin/env bash
# Stop the loopback Slurm cluster started by .ci/slurm_up.sh.
SUDO=$( [ "$(id -u)" = 0 ] || echo sudo )
scancel --user "$(id -un)" 2>/dev/null || true
$SUDO pkill -x slurmd 2>/dev/null || true
$SUDO pkill -x slurmctld 2>/dev/null || true
sleep 1
exit 0
