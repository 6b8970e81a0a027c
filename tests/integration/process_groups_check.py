"""Run by test_process_groups under the deepspeed launcher (2 processes, pipeline 2): the
process groups of a pipeline run.

Prints, rank 0 for both ranks:
  groups <rank> init <n> training <n> stock-pipeline <n> timeouts <seconds,...> device <device>
- init: groups this rank belongs to after init_distributed (default group + the grid);
- training: groups the whole engine build (pipeline module, DeepSpeed engine) added;
- stock-pipeline: groups DeepSpeed's own PipelineModule adds when left to itself;
- timeouts: the distinct collective timeouts of all groups of this rank;
- device: the topology's communication device.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed import distributed_c10d

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
os.environ.setdefault("DS_ACCELERATOR", "cpu")

from pretrain.config import load_config  # noqa: E402
from pretrain.parallel.topology import discover, init_distributed  # noqa: E402
from pretrain.train.engine import build_training  # noqa: E402

TIMEOUT_MINUTES = 4.5  # neither of torch's defaults (10 NCCL, 30 gloo); long enough for a slow start


def groups() -> set:
    return set(distributed_c10d._world.pg_map)


def main() -> None:
    topo = discover(pipeline=2)
    init_distributed(topo, TIMEOUT_MINUTES)
    after_init = groups()
    cfg = load_config("configs/demo.yaml", ["parallel.pipeline_stages=2", "parallel.zero_stage=1",
                                            "precision=fp32", "batch.global_batch=64"])
    build_training(cfg, topo, num_classes=10)
    after_training = groups()

    from deepspeed.pipe import PipelineModule

    PipelineModule(layers=[torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)], topology=topo.deepspeed_topology())
    stock = groups() - after_training

    timeouts = sorted({pg._get_backend(torch.device("cpu")).options._timeout.total_seconds() for pg in groups()})
    line = (f"groups {topo.rank} init {len(after_init)} training {len(after_training - after_init)} "
            f"stock-pipeline {len(stock)} timeouts {','.join(f'{t:g}' for t in timeouts)} device {topo.device}")
    lines: list = [None] * topo.world_size
    dist.all_gather_object(lines, line)
    if topo.rank == 0:
        print("\n".join(lines), flush=True)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
