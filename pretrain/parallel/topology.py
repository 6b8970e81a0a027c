"""Process layout of a run: world = data x pipeline x tensor, and every process group.

Every rank number and process group the rest of the code uses comes from here. Ranks are
ordered the way DeepSpeed's pipeline grid orders them (pipeline stage outermost, then
data, then tensor innermost, so a tensor-parallel group is a block of neighbouring ranks,
the ones that share a node's fast links):

    rank = stage * (data * tensor) + data_rank * tensor + tensor_rank

fairscale's own `initialize_model_parallel` orders ranks data-major, so it is never
called: its tensor-parallel and data-parallel groups are set to the grid's groups here,
and the pipeline module reuses the same grid (pipeline.py): one set of groups per run.

Every group, the default one and each made later by any library, waits at most the run's
`parallel.timeout_minutes` in a collective.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology, PipelineParallelGrid
from fairscale.nn.model_parallel import initialize as fairscale_groups
from torch.distributed import distributed_c10d

from launch.env import local_world_size, pick_cuda_device, rank_environment
from pretrain.config import ParallelConfig


@dataclass
class Topology:
    rank: int
    local_rank: int
    world_size: int
    pipeline: int = 1  # pipeline-parallel degree (stages)
    tensor: int = 1  # tensor-parallel degree
    # DeepSpeed's PipelineParallelGrid over this layout, made by init_distributed when a
    # model-parallel degree is > 1 (None for pure data parallelism); DeepSpeed's `mpu`.
    grid: Any = field(default=None, repr=False)
    local_world: int | None = None  # ranks on this node, when the launcher says (launch/env.py)
    # Where this rank's collectives run: its GPU under NCCL, the CPU under gloo (set by
    # init_distributed). Tensors handed to a collective must live here.
    device: torch.device = torch.device("cpu")

    def __post_init__(self) -> None:
        if self.world_size % (self.pipeline * self.tensor):
            raise ValueError(f"{self.world_size} ranks cannot be split into pipeline {self.pipeline} x "
                             f"tensor {self.tensor} groups")

    @property
    def dp_size(self) -> int:
        """Data-parallel size: replicas of the model, each fed its own share of the data."""
        return self.world_size // (self.pipeline * self.tensor)

    @property
    def stage(self) -> int:
        """Pipeline stage of this rank (0 = first)."""
        return self.rank // (self.dp_size * self.tensor)

    @property
    def dp_rank(self) -> int:
        """Rank within the data-parallel group (selects this rank's share of the data)."""
        return self.rank // self.tensor % self.dp_size

    @property
    def tp_rank(self) -> int:
        """Rank within the tensor-parallel group (selects this rank's heads and hidden units)."""
        return self.rank % self.tensor

    @property
    def model_parallel(self) -> bool:
        return self.pipeline * self.tensor > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def deepspeed_topology(self) -> Any:
        """This layout as DeepSpeed's process topology (axes pipe, data, model)."""
        return PipeModelDataParallelTopology(num_pp=self.pipeline, num_mp=self.tensor, num_dp=self.dp_size)


def discover(pipeline: int = 1, tensor: int = 1) -> Topology:
    """This process's place, from whichever launcher started it (see launch/env.py)."""
    rank_environment()
    return Topology(
        rank=int(os.environ["RANK"]),
        local_rank=int(os.environ.get("LOCAL_RANK", "0")),
        world_size=int(os.environ["WORLD_SIZE"]),
        pipeline=pipeline,
        tensor=tensor,
        local_world=local_world_size(),
    )


def on_gpu() -> bool:
    return torch.cuda.is_available() and os.environ.get("DS_ACCELERATOR", "cuda") == "cuda"


def init_distributed(topo: Topology, timeout_minutes: float = ParallelConfig.timeout_minutes) -> None:
    """Start the default process group (NCCL on GPUs, gloo on CPU) with a collective timeout
    of `timeout_minutes`, and, for model parallelism, every other group of the run."""
    timeout = datetime.timedelta(minutes=timeout_minutes)
    if on_gpu():
        topo.device = torch.device("cuda", _select_gpu(topo))
    deepspeed.init_distributed(dist_backend="nccl" if on_gpu() else "gloo", auto_mpi_discovery=False,
                               timeout=timeout)
    _default_group_timeout(timeout)
    if not on_gpu():
        release_shm_segment(topo)
    if topo.model_parallel:
        _build_groups(topo)


def _select_gpu(topo: Topology) -> int:
    """Bind this process to its GPU (chosen among the ones it can see) and return the index."""
    index = pick_cuda_device(topo.local_rank, torch.cuda.device_count(), topo.local_world,
                             os.environ.get("CUDA_VISIBLE_DEVICES"))
    torch.cuda.set_device(index)
    # DeepSpeed takes LOCAL_RANK as the device index (engine, ZeRO, PipelineModule, NCCL's
    # device binding); with one GPU bound per task that index is 0 on every rank.
    os.environ["LOCAL_RANK"] = str(index)
    return index


def _default_group_timeout(timeout: datetime.timedelta) -> None:
    """Make `timeout` the default of every group created from now on.

    torch.distributed.new_group() without a timeout takes torch's per-backend default (10
    minutes for NCCL), not the default group's; DeepSpeed's grid and engine call it that
    way, so the defaults themselves are set.
    """
    distributed_c10d.default_pg_timeout = timeout
    distributed_c10d.default_pg_nccl_timeout = timeout


def _build_groups(topo: Topology) -> None:
    """DeepSpeed's grid for this layout (every rank creates every group, in the same order),
    and fairscale's tensor-parallel layers pointed at the grid's groups."""
    grid = PipelineParallelGrid(topology=topo.deepspeed_topology())
    assert (grid.get_stage_id(), grid.get_data_parallel_rank(), grid.get_slice_parallel_rank()) == \
        (topo.stage, topo.dp_rank, topo.tp_rank), "rank order differs from DeepSpeed's grid"
    fairscale_groups._MODEL_PARALLEL_GROUP = grid.get_slice_parallel_group()
    fairscale_groups._DATA_PARALLEL_GROUP = grid.get_data_parallel_group()
    fairscale_groups._PIPELINE_PARALLEL_GROUP = grid.get_pipe_parallel_group()
    fairscale_groups._PIPELINE_PARALLEL_RANKS = grid.pp_group
    topo.grid = grid


def release_shm_segment(topo: Topology) -> None:
    """Unlink the /dev/shm buffer DeepSpeed's CPU backend made for this rank.

    DeepSpeed creates one ~70 MB segment per rank and master port and never removes it, so
    every CPU run would leak memory (tmpfs) until the machine runs out. Once every rank has
    passed a barrier, all ranks have mapped each other's segments; the mappings outlive the
    name, so unlinking it here keeps the fast path working and leaves nothing behind, even
    after a kill -9.
    """
    dist.barrier()
    name = "_".join(["deepspeed_allreduce_buffer", str(os.getuid()), os.environ.get("MASTER_ADDR", ""),
                     os.environ.get("MASTER_PORT", ""), str(topo.rank)])
    Path("/dev/shm", name).unlink(missing_ok=True)
