"""Our config -> the DeepSpeed config dict. No hand-written DeepSpeed JSON anywhere else."""

from __future__ import annotations

from typing import Any

from pretrain.config import Config
from pretrain.parallel.topology import Topology


def uses_fused_mixed_precision(cfg: Config, topo: Topology) -> bool:
    """Whether this run's fp32 masters live in `MixedPrecisionAdamW` rather than in DeepSpeed."""
    return (cfg.precision == "bf16" and cfg.parallel.zero_stage == 0 and topo.pipeline == 1
            and topo.tensor == 1)


def accumulation_steps(cfg: Config, topo: Topology) -> int:
    """Micro-batches per optimizer step on each rank: global / (micro x data-parallel size)."""
    return cfg.batch.global_batch // (cfg.batch.micro_batch * topo.dp_size)


def deepspeed_config(cfg: Config, topo: Topology, load_universal: bool = False) -> dict[str, Any]:
    """`load_universal`: the checkpoint to resume was converted for another layout."""
    # bf16 without ZeRO or model parallelism: the module is already bf16 and our optimizer
    # keeps the fp32 masters and clips (train/mixed_precision.py); DeepSpeed averages gradients.
    own_masters = uses_fused_mixed_precision(cfg, topo)
    # DeepSpeed's default buckets (5e8 elements) hold about 1 GB per rank at bf16 whatever the
    # model size; ours are a config value that the memory planner accounts for.
    p = cfg.parallel
    on_cuda = topo.device.type == "cuda"
    zero: dict[str, Any] = {"stage": p.zero_stage, "reduce_bucket_size": p.bucket_size,
                            "allgather_bucket_size": p.bucket_size,
                            # Reduce gradient buckets while the backward pass goes on, not after it.
                            "overlap_comm": p.overlap_comm and p.zero_stage > 0}
    if p.offload_optimizer:
        # Pageable host buffers make every host<->GPU copy synchronous.
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": p.pin_memory and on_cuda}
    ds: dict[str, Any] = {
        "train_batch_size": cfg.batch.global_batch,
        "train_micro_batch_size_per_gpu": cfg.batch.micro_batch,
        "gradient_accumulation_steps": accumulation_steps(cfg, topo),
        "gradient_clipping": 0.0 if own_masters else cfg.optim.clip_grad,
        "zero_optimization": zero,
        "bf16": {"enabled": cfg.precision == "bf16" and not own_masters},
        "fp16": {"enabled": cfg.precision == "fp16", "initial_scale_power": 16},
        # We log our own metrics; DeepSpeed's periodic prints would interleave with ours.
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
        "checkpoint": {"load_universal": load_universal},
    }
    if topo.pipeline > 1:
        # DeepSpeed can split the activations sent between stages over the tensor-parallel
        # ranks, but only when nothing else travels with them; ours carry the loss targets.
        ds["pipeline"] = {"pipe_partitioned": False, "grad_partitioned": False}
    if cfg.precision == "bf16" and not own_masters:
        # DeepSpeed's defaults accumulate and average bf16 gradients in bf16 (README, Precision).
        ds["data_types"] = {"grad_accum_dtype": p.grad_accum_dtype}
        ds["communication_data_type"] = p.comm_dtype
    if cfg.precision != "fp32" and not own_masters:
        # DeepSpeed casts parameters but leaves float buffers in fp32; Swin's attention
        # mask and SwinV2's coordinate table must match the activations' dtype.
        ds.setdefault("data_types", {})["buffer_dtype"] = cfg.precision
    return ds
