"""One fp32 state dict from a DeepSpeed checkpoint tag, whatever its layout.

The reading side of `checkpoint.py` (kept in its own module for size): ZeRO partitions,
pipeline-layer files and tensor-parallel shards all come back as the module's own key layout,
full tensors, fp32. DeepSpeed's file names inside a tag are known here and nowhere else.

A bf16/fp16 run's weights are its fp32 master weights, wherever the optimizer kept them (the
module files hold only their rounded 16-bit copies):
- in the model-states file, as `fp32_groups` in parameter-group order: our own optimizer
  (bf16 without ZeRO or model parallelism) and DeepSpeed's unfused one (fp16 without ZeRO,
  bf16 tensor parallelism without ZeRO); the trainer saves the groups' names with them;
- partitioned over the data-parallel ranks, one `*zero_pp_rank_{dp}_mp_rank_{mp}_optim_states.pt`
  per rank and model-parallel rank: DeepSpeed's BF16_Optimizer (bf16 ZeRO-1, bf16 pipelines) and
  its ZeRO-1/2 optimizer. Each holds one flat fp32 partition per parameter group and where each
  parameter's piece sits in it (`param_slice_mappings`: name -> `fragment_address`); a
  parameter is its pieces in data-parallel order. DeepSpeed's `zero_to_fp32` reads these
  files only without model parallelism and only its ZeRO optimizers' (BF16_Optimizer's files,
  named alike, have no ZeRO stage in them), so it is used exactly there.
DeepSpeed numbers the model-parallel ranks of a pipeline x tensor grid stage-major
(`mp = stage * tensor + tensor rank`: ranks of one data-parallel index, in global rank order);
pipeline-layer files carry the tensor rank only.

Checkpoint files are data, never code: every file is read with `torch.load(weights_only=True)`
and an allowlist of exactly the Python types DeepSpeed's checkpoints of this pipeline hold
(`CHECKPOINT_GLOBALS`), including the reads DeepSpeed's own ZeRO consolidation makes, which
ask for `weights_only=False` (`weights_only_loads` overrides them). A file holding anything
else is refused with one line naming it, before any of its objects is built. Exporting a
run directory someone else made therefore runs none of their code.

Importing this module imports DeepSpeed, which picks its accelerator then: entry points
call `launch.env.default_accelerator()` before importing it.
"""

from __future__ import annotations

import json
import os
import pickle
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from deepspeed.checkpoint.constants import (FP32_GROUPS, OPTIMIZER_STATE_DICT, PARAM_SLICE_MAPPINGS, PARTITION_COUNT,
                                            SINGLE_PARTITION_OF_FP32_GROUPS, ZERO_STAGE)
from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
from deepspeed.runtime.zero.config import ZeroStageEnum
from deepspeed.utils.tensor_fragment import fragment_address
from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
from torch.serialization import get_unsafe_globals_in_checkpoint, safe_globals

from pretrain.config import Config
from pretrain.models.objectives import OBJECTIVES
from pretrain.parallel.pipeline import full_names, pipeline_layers
from pretrain.parallel.tensor import merge, split_rule
from pretrain.train.checkpoint import LAYOUT, CheckpointError, RunState


def model_states_file(tp_rank: int = 0) -> str:
    """DeepSpeed's file of the module's weights (or, for a pipeline, only its client state)."""
    return f"mp_rank_{tp_rank:02d}_model_states.pt"


# ZeRO-3's model-states file of data-parallel rank 0 (the weights live in its optimizer files).
ZERO3_MODEL_STATES = "zero_pp_rank_0_mp_rank_00_model_states.pt"


def layer_file(layer: int, tp_rank: int) -> str:
    """DeepSpeed's file of one pipeline layer's weights (tensor-parallel shard `tp_rank`)."""
    return f"layer_{layer:02d}-model_{tp_rank:02d}-model_states.pt"


def optim_states_file(dp_rank: int, mp_rank: int, precision: str) -> str:
    """DeepSpeed's file of one data-parallel partition of the optimizer state (ZeRO, BF16_Optimizer)."""
    return f"{'bf16_' if precision == 'bf16' else ''}zero_pp_rank_{dp_rank}_mp_rank_{mp_rank:02d}_optim_states.pt"


# Besides tensors, containers and numbers (which torch allows by itself), the only Python types
# in DeepSpeed's checkpoints of the layouts this pipeline writes: found by saving the demo under
# ZeRO 0 (fp32, bf16), ZeRO 1-3 and a pipeline and listing what weights_only=True refuses.
CHECKPOINT_GLOBALS = [
    fragment_address,  # ZeRO 1/2 optimizer files: where each parameter sits in its flat partition
    ZeroStageEnum,  # ZeRO 1-3 optimizer files: the stage
    LossScaler,  # ZeRO 1-3 optimizer files of bf16/fp32 runs (a static scale of 1)
    DynamicLossScaler,  # the same of fp16 runs (CUDA only: read from DeepSpeed's CreateLossScaler)
]

_FORCE = "TORCH_FORCE_WEIGHTS_ONLY_LOAD"
_FORCE_NOT = "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"


@contextmanager
def weights_only_loads() -> Iterator[None]:
    """Every `torch.load` inside loads weights only, with `CHECKPOINT_GLOBALS` allowed.

    DeepSpeed's `zero_to_fp32` passes `weights_only=False` explicitly; torch's own switch
    `TORCH_FORCE_WEIGHTS_ONLY_LOAD` overrides that, so its reads get the same allowlist as ours.
    """
    saved = {name: os.environ.pop(name, None) for name in (_FORCE, _FORCE_NOT)}
    os.environ[_FORCE] = "1"
    try:
        with safe_globals(CHECKPOINT_GLOBALS):
            yield
    finally:
        for name, value in saved.items():
            os.environ.pop(name, None)
            if value is not None:
                os.environ[name] = value


def _refusal(path: Path) -> CheckpointError:
    """The one-line error for a checkpoint file that weights_only loading refused."""
    with safe_globals(CHECKPOINT_GLOBALS):
        try:
            found = get_unsafe_globals_in_checkpoint(path)  # reads the pickle's opcodes, runs nothing
        except Exception:
            found = []
    what = f" ({', '.join(found[:3])}{', ...' if len(found) > 3 else ''})" if found else ""
    return CheckpointError(f"checkpoint file {path} holds Python objects other than tensors and DeepSpeed's "
                           f"own types{what}: refused to load it (checkpoints are data, never code)")


def load_checkpoint_file(path: Path, mmap: bool = False) -> Any:
    """One file of a DeepSpeed checkpoint, tensors on the CPU; a one-line error if it is not just data."""
    try:
        with weights_only_loads():
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError:
        raise _refusal(path) from None
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint file {path} is missing") from None
    except (RuntimeError, OSError, EOFError, ValueError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise CheckpointError(f"checkpoint file {path} cannot be read: {first}") from None


def _load_model_states(path: Path) -> dict[str, Any]:
    """DeepSpeed's model-states file (tensors, numbers, names and the client state)."""
    return load_checkpoint_file(path)


def _zero_state_dict(ckpt_dir: Path, tag: str) -> dict[str, torch.Tensor]:
    """DeepSpeed's own ZeRO 1-3 consolidation, its file reads held to weights only."""
    try:
        with weights_only_loads():
            return get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir), tag=tag)
    except pickle.UnpicklingError as e:
        # Name the file: check each of the tag's files the same way (mapped, so cheaply).
        for path in sorted((ckpt_dir / tag).glob("*.pt")):
            load_checkpoint_file(path, mmap=True)
        raise CheckpointError(f"checkpoint {ckpt_dir / tag}: a file was refused while loading it "
                              f"(checkpoints are data, never code): {str(e).splitlines()[-1][:200]}") from None


def saved_run_state(tag_dir: Path) -> RunState:
    """The run state the checkpoint in `tag_dir` recorded (in rank 0's model-states file, which
    ZeRO-3, partitioning the weights, names after its data-parallel rank)."""
    path = tag_dir / model_states_file()
    if not path.is_file() and (tag_dir / ZERO3_MODEL_STATES).is_file():
        path = tag_dir / ZERO3_MODEL_STATES
    return RunState.from_client_state(_load_model_states(path))


def consolidated_state_dict(cfg: Config, ckpt_dir: Path, tag: str) -> dict[str, torch.Tensor]:
    """fp32 weights of checkpoint `tag` (a bf16/fp16 run's master weights), as one state dict in
    the module's own key layout."""
    tag_dir = ckpt_dir / tag
    layout_file = tag_dir / LAYOUT
    layout = json.loads(layout_file.read_text()) if layout_file.is_file() else {}
    if layout.get("pipeline_stages", 1) * layout.get("tensor_parallel", 1) > 1:
        return _model_parallel_state_dict(cfg, tag_dir, layout["pipeline_stages"], layout["tensor_parallel"])
    if cfg.parallel.zero_stage > 0 and (cfg.precision == "fp32" or _is_zero_checkpoint(tag_dir, cfg.precision)):
        return _zero_state_dict(ckpt_dir, tag)
    states = _load_model_states(tag_dir / model_states_file())
    module = dict(states["module"])
    if cfg.precision != "fp32":
        _place(module, _masters(tag_dir, 0, cfg.precision, states, {}), tag_dir / model_states_file())
    return {k: v.float() for k, v in module.items()}


def _model_parallel_state_dict(cfg: Config, tag_dir: Path, stages: int, tensor: int) -> dict[str, torch.Tensor]:
    """The whole model from pipeline-layer files and tensor-parallel shards.

    These files hold the module's weights in the training precision; for bf16/fp16 the fp32
    masters replace them shard by shard, before the shards are merged.
    """
    shards: list[dict[str, torch.Tensor]] = [{} for _ in range(tensor)]
    states: dict[int, dict[str, Any]] = {}  # model-states files read already, by model-parallel rank
    renamed: dict[str, str] = {}  # DeepSpeed's names of a pipeline's parameters -> the model's
    if stages == 1:
        for rank in range(tensor):
            states[rank] = _load_model_states(tag_dir / model_states_file(rank))
            shards[rank] = dict(states[rank]["module"])
    else:
        with torch.device("meta"):  # only the names: which layer file holds which tensor
            model = OBJECTIVES[cfg.objective.kind](cfg, saved_run_state(tag_dir).num_classes).build_model()
        for index, names in enumerate(full_names(model, pipeline_layers(model))):
            renamed.update({f"{index}.{key}": name for key, name in names.items()})  # PipelineModule's naming
            for rank in range(tensor):
                layer = load_checkpoint_file(tag_dir / layer_file(index, rank))
                shards[rank].update({names[key]: value for key, value in layer.items() if key in names})
    if cfg.precision != "fp32":
        for mp in range(stages * tensor):  # stage-major: tensor rank mp % tensor (module docstring)
            saved = states[mp] if mp in states else _load_model_states(tag_dir / model_states_file(mp))
            _place(shards[mp % tensor], _masters(tag_dir, mp, cfg.precision, saved, renamed),
                   tag_dir / model_states_file(mp))
    merged = {}
    for name, value in shards[0].items():
        rule = split_rule(name)
        merged[name] = (value if rule is None else merge([s[name] for s in shards], rule)).float()
    return merged


def _optimizer_state(saved: Any, path: Path) -> dict[str, Any]:
    """The optimizer's own state in a partition file, or a one-line error naming the file."""
    state = saved.get(OPTIMIZER_STATE_DICT) if isinstance(saved, dict) else None
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint file {path} holds no optimizer state ({OPTIMIZER_STATE_DICT})")
    return state


def _is_zero_checkpoint(tag_dir: Path, precision: str) -> bool:
    """Whether DeepSpeed's zero_to_fp32 reads this (data-parallel) tag: its ZeRO optimizers record their
    stage; its BF16_Optimizer (bf16 ZeRO-1 with fp32 gradient accumulation) writes like-named files without."""
    path = tag_dir / optim_states_file(0, 0, precision)
    return ZERO_STAGE in _optimizer_state(load_checkpoint_file(path, mmap=True), path)


def _masters(tag_dir: Path, mp: int, precision: str, states: dict[str, Any],
             renamed: dict[str, str]) -> dict[str, torch.Tensor]:
    """fp32 master weights of model-parallel rank `mp` by the model's names, flat or shaped.

    `states`: that rank's model-states file; `renamed`: DeepSpeed's parameter names -> the model's.
    """
    optimizer = states.get("optimizer")
    if isinstance(optimizer, dict) and FP32_GROUPS in optimizer:
        return _grouped_masters(states, tag_dir / model_states_file(mp))
    return _partitioned_masters(tag_dir, mp, precision, renamed)


def _grouped_masters(states: dict[str, Any], path: Path) -> dict[str, torch.Tensor]:
    """The masters an unpartitioned optimizer saved in parameter-group order, named by the groups'
    names the trainer saved with them."""
    names = RunState.from_client_state(states).param_group_names
    if names is None:
        raise CheckpointError(f"checkpoint file {path} does not name its parameter groups: its fp32 master "
                              f"weights cannot be placed (saved by an older version)")
    groups = states["optimizer"][FP32_GROUPS]
    if len(groups) != len(names):  # DeepSpeed drops empty groups from a client optimizer (ours keeps them)
        names = [group for group in names if group]
    if [len(g) for g in groups] != [len(n) for n in names]:
        raise CheckpointError(f"checkpoint file {path}: its fp32 master weights ({[len(g) for g in groups]} per "
                              f"group) do not match its parameter-group names ({[len(n) for n in names]})")
    return {name: tensor for group, tensors in zip(names, groups) for name, tensor in zip(group, tensors)}


def _partitioned_masters(tag_dir: Path, mp: int, precision: str, renamed: dict[str, str]) -> dict[str, torch.Tensor]:
    """Model-parallel rank `mp`'s masters, each put together from its pieces in every data-parallel
    partition (flat; in data-parallel order they make the whole parameter)."""
    pieces: dict[str, list[torch.Tensor]] = {}
    dp, partitions = 0, 1
    while dp < partitions:
        path = tag_dir / optim_states_file(dp, mp, precision)
        # Mapped: only the masters' pages are read, not the optimizer moments beside them.
        state = _optimizer_state(load_checkpoint_file(path, mmap=True), path)
        try:
            counts = state[PARTITION_COUNT]
            partitions = max(counts) if isinstance(counts, list) else int(counts)
            for flat, where in zip(state[SINGLE_PARTITION_OF_FP32_GROUPS], state[PARAM_SLICE_MAPPINGS], strict=True):
                for name, at in where.items():
                    pieces.setdefault(renamed.get(name, name), []).append(flat.narrow(0, at.start, at.numel))
        except (KeyError, TypeError, ValueError, AttributeError, RuntimeError) as e:
            raise CheckpointError(f"checkpoint file {path} does not hold partitioned fp32 master weights as "
                                  f"DeepSpeed writes them ({type(e).__name__}: {str(e)[:100]})") from None
        dp += 1
    return {name: torch.cat(parts).float() for name, parts in pieces.items()}


def _place(module: dict[str, torch.Tensor], masters: dict[str, torch.Tensor], where: Path) -> None:
    """Replace `module`'s 16-bit weights by their fp32 masters (frozen ones, which have none, stay)."""
    for name, master in masters.items():
        current = module.get(name)
        if current is None or current.numel() != master.numel():
            raise CheckpointError(f"checkpoint {where}: fp32 master weight {name} ({master.numel()} elements) "
                                  f"matches no saved weight of the module")
        module[name] = master.float().reshape(current.shape)
