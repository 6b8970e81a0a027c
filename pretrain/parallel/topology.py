"""Process layout of a run: who am I, how many of us, and which ranks share data.

Every rank number the rest of the code uses comes from here. Today the layout is pure
data parallelism (world = data-parallel size); pipeline and tensor degrees will be
factored out of the world here, and only here.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from launch.env import rank_environment


@dataclass(frozen=True)
class Topology:
    rank: int
    local_rank: int
    world_size: int

    @property
    def dp_rank(self) -> int:
        """Rank within the data-parallel group (selects this rank's share of the data)."""
        return self.rank

    @property
    def dp_size(self) -> int:
        return self.world_size

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def discover() -> Topology:
    """This process's place, from whichever launcher started it (see launch/env.py)."""
    rank_environment()
    return Topology(
        rank=int(os.environ["RANK"]),
        local_rank=int(os.environ.get("LOCAL_RANK", "0")),
        world_size=int(os.environ["WORLD_SIZE"]),
    )


def on_gpu() -> bool:
    return torch.cuda.is_available() and os.environ.get("DS_ACCELERATOR", "cuda") == "cuda"


def init_distributed(topo: Topology) -> None:
    """Start the default process group: NCCL on GPUs, gloo on CPU."""
    import deepspeed

    if on_gpu():
        torch.cuda.set_device(topo.local_rank)
    deepspeed.init_distributed(dist_backend="nccl" if on_gpu() else "gloo", auto_mpi_discovery=False)
    if not on_gpu():
        release_shm_segment(topo)


def release_shm_segment(topo: Topology) -> None:
    """Unlink the /dev/shm buffer DeepSpeed's CPU backend made for this rank.

    DeepSpeed creates one ~70 MB segment per rank and master port and never removes it, so
    every CPU run would leak memory (tmpfs) until the machine runs out. Once every rank has
    passed a barrier, all ranks have mapped each other's segments; the mappings outlive the
    name, so unlinking it here keeps the fast path working and leaves nothing behind, even
    after a kill -9.
    """
    import torch.distributed as dist

    dist.barrier()
    name = "_".join(["deepspeed_allreduce_buffer", str(os.getuid()), os.environ.get("MASTER_ADDR", ""),
                     os.environ.get("MASTER_PORT", ""), str(topo.rank)])
    Path("/dev/shm", name).unlink(missing_ok=True)
