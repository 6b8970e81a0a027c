"""One fp32 state dict from a DeepSpeed checkpoint tag, whatever its layout.

The reading side of `checkpoint.py` (kept in its own module for size): ZeRO partitions,
fp32 master weights of bf16/fp16 runs without ZeRO, pipeline-layer files and
tensor-parallel shards all come back as the module's own key layout, full tensors, fp32.
DeepSpeed's file names inside a tag are known here and nowhere else.

Importing this module imports DeepSpeed, which picks its accelerator then: entry points
call `launch.env.default_accelerator()` before importing it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

from pretrain.config import Config
from pretrain.models.objectives import OBJECTIVES
from pretrain.parallel.pipeline import full_names, pipeline_layers
from pretrain.parallel.tensor import merge, split_rule
from pretrain.train.checkpoint import LAYOUT, CheckpointError, RunState


def model_states_file(tp_rank: int = 0) -> str:
    """DeepSpeed's file of the module's weights (or, for a pipeline, only its client state)."""
    return f"mp_rank_{tp_rank:02d}_model_states.pt"


def layer_file(layer: int, tp_rank: int) -> str:
    """DeepSpeed's file of one pipeline layer's weights (tensor-parallel shard `tp_rank`)."""
    return f"layer_{layer:02d}-model_{tp_rank:02d}-model_states.pt"


def _load_model_states(path: Path) -> dict[str, Any]:
    """DeepSpeed's model-states file: tensors only if possible, else the trusted file this run wrote."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception:
        # DeepSpeed stores Python objects (loss scaler, client state) next to the tensors.
        # The file was written by our own training run, so unpickling it is trusted here.
        return torch.load(path, map_location="cpu", weights_only=False)


def saved_run_state(tag_dir: Path) -> RunState:
    """The run state the checkpoint in `tag_dir` recorded."""
    return RunState.from_client_state(_load_model_states(tag_dir / model_states_file()))


def consolidated_state_dict(cfg: Config, ckpt_dir: Path, tag: str) -> dict[str, torch.Tensor]:
    """fp32 weights of checkpoint `tag`, as one state dict in the module's own key layout."""
    tag_dir = ckpt_dir / tag
    layout_file = tag_dir / LAYOUT
    layout = json.loads(layout_file.read_text()) if layout_file.is_file() else {}
    if layout.get("pipeline_stages", 1) * layout.get("tensor_parallel", 1) > 1:
        return _model_parallel_state_dict(cfg, tag_dir, layout["pipeline_stages"], layout["tensor_parallel"])
    if cfg.parallel.zero_stage > 0:
        return get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir), tag=tag)
    states = _load_model_states(tag_dir / model_states_file())
    module = {k: v.float() for k, v in states["module"].items()}
    if cfg.precision == "fp32":
        return module
    # bf16/fp16 without ZeRO: the fp32 master weights live in the optimizer state, in the
    # order of the parameter groups, whose names the trainer saved with the checkpoint.
    names = RunState.from_client_state(states).param_group_names
    if names is None:
        raise CheckpointError(f"checkpoint {tag_dir} does not name its parameter groups: its fp32 master "
                              f"weights cannot be placed (saved by an older version)")
    masters = states["optimizer"]["fp32_groups"]
    for group_names, tensors in zip(names, masters):
        for name, tensor in zip(group_names, tensors):
            module[name] = tensor.float().view_as(module[name])
    return module


def _model_parallel_state_dict(cfg: Config, tag_dir: Path, stages: int, tensor: int) -> dict[str, torch.Tensor]:
    """The whole model from pipeline-layer files and tensor-parallel shards.

    These are the module's weights as trained, in the training precision (bf16 runs keep
    their fp32 master copy only in DeepSpeed's partitioned optimizer state).
    """
    shards: list[dict[str, torch.Tensor]] = [{} for _ in range(tensor)]
    if stages == 1:
        for rank in range(tensor):
            shards[rank] = _load_model_states(tag_dir / model_states_file(rank))["module"]
    else:
        with torch.device("meta"):  # only the names: which layer file holds which tensor
            model = OBJECTIVES[cfg.objective.kind](cfg, saved_run_state(tag_dir).num_classes).build_model()
        for index, names in enumerate(full_names(model, pipeline_layers(model))):
            for rank in range(tensor):
                layer = torch.load(tag_dir / layer_file(index, rank), map_location="cpu", weights_only=True)
                shards[rank].update({names[key]: value for key, value in layer.items() if key in names})
    merged = {}
    for name, value in shards[0].items():
        rule = split_rule(name)
        merged[name] = (value if rule is None else merge([s[name] for s in shards], rule)).float()
    return merged
