"""Launcher-agnostic rank discovery.

Whatever started the process, the result is the environment torch.distributed's `env://`
rendezvous reads (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT):

- `deepspeed` / `torchrun` set these themselves;
- `srun` sets SLURM_PROCID / SLURM_LOCALID / SLURM_NTASKS: the first host of the job's node
  list becomes the master, and the port is derived from the job id (same on every task);
- a lone `python` process is rank 0 of 1 on localhost.
"""

from __future__ import annotations

import os
import re
import socket
from typing import MutableMapping


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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_environment(environ: MutableMapping[str, str] = os.environ) -> str:
    """Fill in the env:// variables from whatever launcher started us; return the launcher's name."""
    if "RANK" in environ and "WORLD_SIZE" in environ:
        environ.setdefault("LOCAL_RANK", "0")
        return "torchrun/deepspeed"
    # Only inside an srun job step: the batch script itself also carries SLURM_PROCID.
    if "SLURM_STEP_ID" in environ and "SLURM_PROCID" in environ and "SLURM_NTASKS" in environ:
        nodes = environ.get("SLURM_STEP_NODELIST") or environ.get("SLURM_JOB_NODELIST", "localhost")
        environ.update(
            RANK=environ["SLURM_PROCID"],
            LOCAL_RANK=environ.get("SLURM_LOCALID", "0"),
            WORLD_SIZE=environ["SLURM_NTASKS"],
        )
        environ.setdefault("MASTER_ADDR", expand_nodelist(nodes)[0])
        environ.setdefault("MASTER_PORT", str(15000 + int(environ.get("SLURM_JOB_ID", "0")) % 20000))
        return "slurm"
    environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
    environ.setdefault("MASTER_ADDR", "127.0.0.1")
    environ.setdefault("MASTER_PORT", str(_free_port()))
    return "single process"
