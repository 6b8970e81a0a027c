"""Launcher-agnostic rank discovery.

Whatever started the process, the result is the environment torch.distributed's `env://`
rendezvous reads (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT), plus
LOCAL_WORLD_SIZE (ranks on this node) where the launcher tells it:

- `deepspeed` / `torchrun` set these themselves (deepspeed names the local count LOCAL_SIZE);
- `srun` sets SLURM_PROCID / SLURM_LOCALID / SLURM_NTASKS / SLURM_STEP_TASKS_PER_NODE: the
  first host of the step's node list becomes the master, and the port is derived from the
  job and step ids (the same on every task of a step, different for each step);
- a lone `python` process is rank 0 of 1 on localhost.

It also picks the CUDA device a rank drives from the devices the process can see: a
cluster may bind one GPU to each task (`srun --gpus-per-task=1`, one GPU per container),
and then LOCAL_RANK is no device index.
"""

from __future__ import annotations

import os
import re
import signal
import socket
from typing import Mapping, MutableMapping


# What Slurm's preemption (--signal=USR1@...) and scancel send to every process of a job step,
# to ask it to stop; a rank checkpoints and stops on either (train/preemption.py).
STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)


class LaunchError(RuntimeError):
    """The processes were started in a way that cannot work; the message is one line naming why."""


def expand_nodelist(nodelist: str) -> list[str]:
    """Slurm's compact host list, e.g. 'gpu[01-03,07],login1' -> ['gpu01', 'gpu02', 'gpu03', 'gpu07', 'login1']."""
    hosts: list[str] = []
    for prefix, ranges, plain in re.findall(r"([^,\[]+)\[([^\]]+)\]|([^,\[\]]+)", nodelist):
        if plain:
            hosts.append(plain)
            continue
        for part in ranges.split(","):
            lo, _, hi = part.partition("-")
            if not hi:
                hosts.append(prefix + lo)
                continue
            width = len(lo)
            hosts += [f"{prefix}{i:0{width}d}" for i in range(int(lo), int(hi) + 1)]
    return hosts


def expand_tasks_per_node(spec: str) -> list[int]:
    """Slurm's compact tasks-per-node list, e.g. '4(x2),3' -> [4, 4, 3]."""
    counts: list[int] = []
    for part in spec.split(","):
        match = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
        if not match:
            raise LaunchError(f"cannot read the tasks per node {spec!r} (expected e.g. '4(x2),3')")
        counts += [int(match.group(1))] * int(match.group(2) or 1)
    return counts


# Rendezvous ports of srun steps. Linux hands out ephemeral ports (outgoing connections,
# NCCL's and gloo's own sockets) from 32768-60999 (net.ipv4.ip_local_port_range): a master
# port in there can be taken by any process of the node. Below 12000 sit the ports
# services commonly listen on. Each job gets STEPS_PER_JOB consecutive ports, so job steps
# started side by side (srun ... & srun ...) and jobs with neighbouring ids never meet.
PORT_LOW, PORT_HIGH = 12000, 32768  # [low, high)
STEPS_PER_JOB = 8


def master_port(job_id: int, step_id: int) -> int:
    """The rendezvous port of step `step_id` of Slurm job `job_id` (the same on all its tasks)."""
    return PORT_LOW + (job_id * STEPS_PER_JOB + step_id) % (PORT_HIGH - PORT_LOW)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (for one-node rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def default_accelerator(environ: MutableMapping[str, str] = os.environ) -> None:
    """Point DeepSpeed at the CPU (DS_ACCELERATOR=cpu) on a machine without CUDA, unless
    DS_ACCELERATOR is set already; with CUDA, DeepSpeed picks its accelerator itself.
    Entry points (train, export, plan, bench) call it before DeepSpeed is first imported."""
    # Imported here: the GPU check imports this module before it knows torch imports on its machine.
    import torch

    if not torch.cuda.is_available():
        environ.setdefault("DS_ACCELERATOR", "cpu")


def launch_world_size(environ: Mapping[str, str] = os.environ) -> int:
    """World size announced by the launcher (deepspeed, torchrun, srun), 1 for plain python."""
    for var in ("WORLD_SIZE", "SLURM_NTASKS"):  # deepspeed/torchrun, then srun
        if environ.get(var):
            return int(environ[var])
    return 1


def _in_srun_step(environ: Mapping[str, str]) -> bool:
    # Only inside an srun job step: the batch script itself also carries SLURM_PROCID.
    return all(key in environ for key in ("SLURM_STEP_ID", "SLURM_PROCID", "SLURM_NTASKS"))


def local_world_size(environ: Mapping[str, str] = os.environ) -> int | None:
    """Ranks on this node as the launcher states it (None when it does not).

    torchrun: LOCAL_WORLD_SIZE; deepspeed: LOCAL_SIZE; srun step: this node's entry of
    SLURM_STEP_TASKS_PER_NODE ('4(x2),3': nodes may differ); a lone process: 1.
    """
    for key in ("LOCAL_WORLD_SIZE", "LOCAL_SIZE"):
        if key in environ:
            return int(environ[key])
    if "RANK" in environ and "WORLD_SIZE" in environ:
        return None  # another launcher that gave ranks but no local count
    if _in_srun_step(environ):
        spec = environ.get("SLURM_STEP_TASKS_PER_NODE") or environ.get("SLURM_TASKS_PER_NODE")
        if not spec:
            return None
        counts = expand_tasks_per_node(spec)
        node = int(environ.get("SLURM_NODEID", "0"))
        return counts[node] if node < len(counts) else None
    return 1


def gpus_per_node(visible: int, environ: Mapping[str, str] = os.environ) -> int:
    """GPUs of this node the job may use: Slurm's SLURM_GPUS_ON_NODE, else the ones this
    process sees (`visible`, torch.cuda.device_count()); with one GPU bound to each task the
    process sees 1 of them, which is why Slurm's count comes first."""
    on_node = environ.get("SLURM_GPUS_ON_NODE", "")
    return int(on_node) if on_node.isdigit() and int(on_node) > 0 else visible


def pick_cuda_device(local_rank: int, visible: int, local_world: int | None,
                     cuda_visible_devices: str | None = None) -> int:
    """Index (among the visible devices) of the GPU this rank drives.

    One visible GPU: the launcher bound it to this task, whatever LOCAL_RANK says. Several:
    one per local rank, which needs at least as many as there are ranks on the node.
    """
    shown = "unset" if cuda_visible_devices is None else repr(cuda_visible_devices)
    if visible < 1:
        raise LaunchError(f"LOCAL_RANK {local_rank}: this process sees no GPU (CUDA_VISIBLE_DEVICES {shown})")
    if visible == 1:
        return 0
    ranks = max(local_rank + 1, local_world or 0)
    if ranks > visible:
        raise LaunchError(f"LOCAL_RANK {local_rank} of {local_world or '?'} ranks on this node, but the process "
                          f"sees {visible} GPUs (CUDA_VISIBLE_DEVICES {shown}): start at most one rank per GPU")
    return local_rank


def rank_environment(environ: MutableMapping[str, str] = os.environ) -> str:
    """Fill in the env:// variables from whatever launcher started us; return the launcher's name."""
    local_world = local_world_size(environ)
    if local_world is not None:
        environ.setdefault("LOCAL_WORLD_SIZE", str(local_world))
    if "RANK" in environ and "WORLD_SIZE" in environ:
        environ.setdefault("LOCAL_RANK", "0")
        return "torchrun/deepspeed"
    if _in_srun_step(environ):
        nodes = environ.get("SLURM_STEP_NODELIST") or environ.get("SLURM_JOB_NODELIST", "localhost")
        environ.update(
            RANK=environ["SLURM_PROCID"],
            LOCAL_RANK=environ.get("SLURM_LOCALID", "0"),
            WORLD_SIZE=environ["SLURM_NTASKS"],
        )
        environ.setdefault("MASTER_ADDR", expand_nodelist(nodes)[0])
        environ.setdefault("MASTER_PORT", str(master_port(int(environ.get("SLURM_JOB_ID", "0")),
                                                          int(environ["SLURM_STEP_ID"]))))
        return "slurm"
    environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
    environ.setdefault("MASTER_ADDR", "127.0.0.1")
    environ.setdefault("MASTER_PORT", str(free_port()))
    return "single process"
