"""The one place where the config's parallelism and memory options are applied to a model.

`prepare_model` takes the single-device model an objective built (a timm Swin, or SimMIM
around one) and changes it in place, always in this order:

1. tensor parallelism: each rank keeps its shard of every block's attention heads and MLP
   hidden units (`parallel/tensor.py`);
2. activation checkpointing of the chosen blocks (through DeepSpeed's checkpointing when its
   kept inputs are partitioned over the tensor-parallel group or kept in CPU memory);
3. sequential attention in the chosen stages;
4. the speed switches: attention kernel, compile (`models/speed.py`).

The order matters: checkpointing wraps the sharded blocks, and compile installs its forward
inside the recompute wrapper. The engine calls this for training; the planner calls it for
one rank's model on the meta device (`topo=None`: the first rank's shard shapes, no speed
switches, which change no memory). Pipeline cutting happens after, in the engine.
"""

from __future__ import annotations

import torch.nn as nn

from pretrain.config import Config
from pretrain.models.speed import CompileSummary, apply_speedups
from pretrain.parallel.activation_ckpt import apply_activation_checkpointing, configure_deepspeed_checkpointing
from pretrain.parallel.sequential_attention import apply_sequential_attention
from pretrain.parallel.tensor import apply_tensor_parallel
from pretrain.parallel.topology import Topology


def prepare_model(model: nn.Module, cfg: Config, topo: Topology | None, checkpointing: bool = True,
                  ) -> CompileSummary | None:
    """Apply steps 1-4 above to `model` in place; returns what compile did (None without it).

    `topo=None` prepares the first tensor-parallel rank's model for planning (shapes only).
    `checkpointing=False` leaves activation checkpointing out (the planner's comparison).
    """
    p = cfg.parallel
    planning = topo is None
    if planning:
        apply_tensor_parallel(model, 0, p.tensor_parallel, shapes_only=True)
    else:
        apply_tensor_parallel(model, topo.tp_rank, topo.tensor)
    by_deepspeed = not planning and (p.partition_activations or p.cpu_checkpointing)
    if by_deepspeed:
        configure_deepspeed_checkpointing(p.partition_activations, p.cpu_checkpointing, topo)
    if checkpointing:
        apply_activation_checkpointing(model, p.activation_checkpointing, p.checkpoint_every_k, by_deepspeed)
    apply_sequential_attention(model, p.sequential_attention, p.attention_chunk_windows)
    if planning:
        return None
    return apply_speedups(model, cfg.speed.sdpa_attention, cfg.speed.compile)
