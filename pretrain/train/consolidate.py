"""One fp32 state dict from a DeepSpeed checkpoint tag, whatever its layout.

The reading side of `checkpoint.py` (kept in its own module for size): ZeRO partitions,
fp32 master weights of bf16/fp16 runs without ZeRO, pipeline-layer files and
tensor-parallel shards all come back as the module's own key layout, full tensors, fp32.
DeepSpeed's file names inside a tag are known here and nowhere else.

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


def layer_file(layer: int, tp_rank: int) -> str:
    """DeepSpeed's file of one pipeline layer's weights (tensor-parallel shard `tp_rank`)."""
    return f"layer_{layer:02d}-model_{tp_rank:02d}-model_states.pt"


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
        return _zero_state_dict(ckpt_dir, tag)
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
                layer = load_checkpoint_file(tag_dir / layer_file(index, rank))
                shards[rank].update({names[key]: value for key, value in layer.items() if key in names})
    merged = {}
    for name, value in shards[0].items():
        rule = split_rule(name)
        merged[name] = (value if rule is None else merge([s[name] for s in shards], rule)).float()
    return merged
