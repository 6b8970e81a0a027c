#!/usr/bin/env bash
# A real two-node Slurm cluster on loopback for the tests: Debian's slurm-wlm + munge,
# slurmctld plus slurmd -N node1 / node2 on ports 17001-17002 of this host.
# Idempotent; tear down with .ci/slurm_down.sh.
set -euo pipefail
SUDO=$( [ "$(id -u)" = 0 ] || echo sudo )
if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq slurm-wlm munge >/dev/null
fi
grep -qE '\snode1(\s|$)' /etc/hosts || echo "127.0.0.1 node1 node2" | $SUDO tee -a /etc/hosts >/dev/null

$SUDO mkdir -p /etc/munge /var/log/munge /run/munge /var/lib/munge
[ -s /etc/munge/munge.key ] || $SUDO dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
$SUDO chown -R munge:munge /etc/munge /var/log/munge /run/munge /var/lib/munge 2>/dev/null || true
$SUDO chmod 400 /etc/munge/munge.key
pgrep -x munged >/dev/null || $SUDO -u munge munged 2>/dev/null || $SUDO munged --force

HOST=$(hostname)
CPUS=$(nproc)
MEM=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 / 2 ))
CONF_DIR=/etc/slurm
$SUDO mkdir -p $CONF_DIR /var/spool/slurmctld /var/spool/slurmd /var/log/slurm
$SUDO tee $CONF_DIR/slurm.conf >/dev/null <<CONF
ClusterName=pretrain-ci
SlurmctldHost=$HOST
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
ReturnToService=2
JobRequeue=1
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd/%n
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd-%n.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd-%n.log
KillWait=30
MinJobAge=300
NodeName=node[1-2] NodeHostname=$HOST Port=[17001-17002] CPUs=$CPUS RealMemory=$MEM State=UNKNOWN
PartitionName=debug Nodes=node[1-2] Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4
CONF
$SUDO mkdir -p /var/spool/slurmd/node1 /var/spool/slurmd/node2
pgrep -x slurmctld >/dev/null || $SUDO slurmctld
for n in node1 node2; do
    pgrep -f "slurmd -N $n" >/dev/null || $SUDO slurmd -N $n
done
for _ in $(seq 30); do
    if [ "$(sinfo -h -o '%T' 2>/dev/null | grep -cE '^(idle|mixed|allocated)')" -ge 1 ] && \
       [ "$(sinfo -h -N -o '%N %T' | grep -cE 'idle|mixed|allocated')" = 2 ]; then
        sinfo -N
        exit 0
    fi
    $SUDO scontrol update nodename=node[1-2] state=resume 2>/dev/null || true
    sleep 1
done
echo "slurm cluster did not come up" >&2
sinfo -N >&2 || true
tail -20 /var/log/slurm/slurmctld.log >&2 || true
exit 1
