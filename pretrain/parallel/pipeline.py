"""Pipeline parallelism: a Swin model (classifier or SimMIM) cut into a DeepSpeed PipelineModule.

The model is flattened into a list of layers, in forward order:

    embed (patch embedding [+ SimMIM mask token]) -> [patch merging] -> block -> ... -> head
    (final norm + classifier head, or final norm + SimMIM decoder)

and each pipeline stage gets a consecutive run of them (`parallel.pipeline_partition`):
balanced by forward FLOPs (counted once on the meta device; Swin's blocks cost about the
same in every stage while their parameter counts grow 4x per stage, so this balances the
stages' compute), by parameter count (balances weights and optimizer state), or by layer
count. The layers wrap the model's own modules, so activation checkpointing, sequential
attention and tensor parallelism applied to the blocks before the cut still hold.

A micro-batch travels through the pipeline as one tuple `(x, *carry)`: `carry` holds the
loss targets (and, in evaluation, the valid-row mask), passed along unchanged from the
first stage to the last. Only the first stage reads data, so augmentation and Mixup
happen once and the last stage computes the loss on exactly the targets that go with
the images, whatever each stage's random state.

Process groups: DeepSpeed's PipelineModule builds a copy of the world group and a grid of
its own; here it is handed the run's grid (topology.py) and the world group instead, so a
pipeline run holds one set of groups (each NCCL group keeps its own buffers on the GPU).

Parameter names: each layer maps its own state-dict keys to the full model's
(`full_names`), which export uses to put the per-layer checkpoint files back together.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator

import torch
import torch.nn as nn
from deepspeed.pipe import PipelineModule
from deepspeed.runtime.pipe import module as pipe_module
from deepspeed.runtime.utils import partition_balanced, partition_uniform
from torch.utils.flop_counter import FlopCounterMode

from pretrain.data.shards import Batch
from pretrain.models.objectives import Objective
from pretrain.models.simmim import with_mask_tokens


class Embed(nn.Module):
    """Patch embedding; for SimMIM, masked tokens replaced by the learned mask token."""

    def __init__(self, patch_embed: nn.Module, mask_token: nn.Parameter | None, model_inputs: int):
        super().__init__()
        self.patch_embed = patch_embed
        self.mask_token = mask_token
        self.model_inputs = model_inputs  # leading tuple entries that are model inputs, not carry

    def forward(self, inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        x = self.patch_embed(inputs[0])
        if self.mask_token is not None:
            x = with_mask_tokens(x, inputs[1], self.mask_token)
        # DeepSpeed runs backward on every floating-point output of a stage and sends back the
        # gradient of every floating-point input, carried targets included (a pass-through).
        carry = tuple(t.requires_grad_() if t.is_floating_point() and t.is_leaf else t
                      for t in inputs[self.model_inputs:])
        return (x, *carry)


class Carried(nn.Module):
    """One module of the trunk (a Swin block or a patch merging) applied to the activation."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module

    def forward(self, inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        return (self.module(inputs[0]), *inputs[1:])


class Head(nn.Module):
    """Final norm, then the classifier head (NHWC in) or the SimMIM decoder (NCHW in)."""

    def __init__(self, norm: nn.Module, output: nn.Module, channels_first: bool):
        super().__init__()
        self.norm = norm
        self.output = output
        self.channels_first = channels_first

    def forward(self, inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        x = self.norm(inputs[0])
        x = self.output(x.permute(0, 3, 1, 2) if self.channels_first else x)
        return (x, *inputs[1:])


def pipeline_layers(model: nn.Module) -> list[nn.Module]:
    """`model` (a timm Swin classifier, or SimMIM around one) as a list of pipeline layers."""
    simmim = hasattr(model, "encoder")
    backbone = model.encoder if simmim else model
    layers: list[nn.Module] = [Embed(backbone.patch_embed, model.mask_token if simmim else None,
                                     model_inputs=2 if simmim else 1)]
    for stage in backbone.layers:
        if not isinstance(stage.downsample, nn.Identity):
            layers.append(Carried(stage.downsample))
        layers.extend(Carried(block) for block in stage.blocks)
    layers.append(Head(backbone.norm, model.decoder if simmim else backbone.head, channels_first=simmim))
    return layers


def example_inputs(model: nn.Module, micro: int, dtype: torch.dtype, device: Any = None) -> tuple[torch.Tensor, ...]:
    """A first-stage micro-batch of blank inputs for `model`: images (and SimMIM masks)."""
    encoder = getattr(model, "encoder", model)
    img = encoder.patch_embed.img_size[0]
    inputs: tuple[torch.Tensor, ...] = (torch.zeros(micro, 3, img, img, device=device, dtype=dtype),)
    if hasattr(model, "encoder"):
        grid = img // encoder.patch_embed.patch_size[0]
        inputs += (torch.zeros(micro, grid, grid, device=device, dtype=torch.uint8),)
    return inputs


def layer_flops(model: nn.Module) -> list[int]:
    """Forward FLOPs of each pipeline layer of `model` (built on the meta device) for one image."""
    x = example_inputs(model, 1, next(model.parameters()).dtype, device="meta")
    costs = []
    for layer in pipeline_layers(model):
        with FlopCounterMode(display=False) as counter:
            x = layer(x)
        costs.append(counter.get_total_flops())
    return costs


def stage_bounds(method: str, layers: list[nn.Module], stages: int, flops: list[int] | None = None) -> list[int]:
    """Where the stages start: stage s holds layers bounds[s] .. bounds[s+1]-1 (`flops` for method "flops")."""
    if method == "uniform":
        return partition_uniform(num_items=len(layers), num_parts=stages)
    if method == "parameters":
        weights = [sum(p.numel() for p in layer.parameters() if p.requires_grad) for layer in layers]
    else:
        weights = flops
    return partition_balanced(weights=weights, num_parts=stages)


def full_names(model: nn.Module, layers: list[nn.Module]) -> list[dict[str, str]]:
    """For every layer, its state-dict keys -> the same tensors' keys in `model`."""
    by_tensor = {id(t): name for name, t in model.state_dict(keep_vars=True).items()}
    return [{key: by_tensor[id(t)] for key, t in layer.state_dict(keep_vars=True).items()} for layer in layers]


class PipelineLoss:
    """The objective's loss on the last stage, on the targets carried with the activations.

    In evaluation (`evaluating = True`) it returns the objective's evaluation sums instead,
    with the valid-row mask as the last carried tensor.
    """

    def __init__(self, objective: Objective):
        self.objective = objective
        self.evaluating = False

    def __call__(self, outputs: tuple[torch.Tensor, ...], _labels: Any) -> torch.Tensor:
        out, *carry = outputs
        if self.evaluating:
            return self.objective.eval_sums(out, unpack(carry[:-1]), carry[-1]).to(out.device)
        return self.objective.loss(out, unpack(carry))


# What a pipeline stage that reads no data hands DeepSpeed as a micro-batch (inputs, labels).
NO_DATA = (torch.zeros(1), torch.zeros(1))


def padded(batch: Batch, valid: torch.Tensor, size: int) -> tuple[Batch, torch.Tensor]:
    """`batch` and its valid-row weights grown to `size` rows with zero-weight blank rows."""
    pad = size - batch.labels.shape[0]
    if pad <= 0:
        return batch, valid

    def grow(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else torch.cat([t, t.new_zeros((pad, *t.shape[1:]))])

    return batch._replace(images=grow(batch.images), labels=grow(batch.labels), masks=grow(batch.masks)), \
        grow(valid)


def pack(inputs: tuple[torch.Tensor, ...], targets: Any) -> tuple[torch.Tensor, ...]:
    """A first-stage micro-batch: the model inputs followed by the targets, flattened."""
    return (*inputs, *(targets if isinstance(targets, tuple) else (targets,)))


def unpack(carry: list[torch.Tensor]) -> Any:
    return carry[0] if len(carry) == 1 else tuple(carry)


class _ReuseWorldGroup:
    """DeepSpeed's comm module, except that a new group of every rank is the world group."""

    def __init__(self, comm: Any):
        self._comm = comm

    def __getattr__(self, name: str) -> Any:
        return getattr(self._comm, name)

    def new_group(self, ranks: Any) -> Any:
        if list(ranks) == list(range(self._comm.get_world_size())):
            return self._comm.get_world_group()
        return self._comm.new_group(ranks)


@contextmanager
def _existing_groups(grid: Any) -> Iterator[None]:
    """While a PipelineModule is built: its grid is `grid` and its world group is the world.

    PipelineModule.__init__ has no parameter for either; it builds both from the names it
    imported, so those names are pointed at the existing groups for the constructor's run.
    """
    saved = pipe_module.PipelineParallelGrid, pipe_module.dist
    pipe_module.PipelineParallelGrid = lambda topology=None, process_group=None: grid
    pipe_module.dist = _ReuseWorldGroup(saved[1])
    try:
        yield
    finally:
        pipe_module.PipelineParallelGrid, pipe_module.dist = saved


class SwinPipeline(PipelineModule):
    """DeepSpeed's PipelineModule over an existing grid, cut at the given stage bounds (see `stage_bounds`)."""

    def __init__(self, layers: list[nn.Module], bounds: list[int], grid: Any, **kwargs: Any):
        self.bounds = bounds  # read by _partition_layers, which PipelineModule.__init__ calls
        with _existing_groups(grid):
            super().__init__(layers=layers, topology=grid.topology(), **kwargs)

    def _partition_layers(self, method: str = "") -> None:
        self.parts = self.bounds
        self._set_bounds(start=self.parts[self.stage_id], stop=self.parts[self.stage_id + 1])


def build_pipeline(model: nn.Module, objective: Objective, topo: Any, partition: str) -> SwinPipeline:
    """`model` as a DeepSpeed pipeline over `topo`'s stages (and its grid), cut by method `partition`."""
    layers = pipeline_layers(model)
    flops = None
    if partition == "flops":
        with torch.device("meta"):
            flops = layer_flops(objective.build_model())
    return SwinPipeline(layers, stage_bounds(partition, layers, topo.pipeline, flops), topo.grid,
                        loss_fn=PipelineLoss(objective), activation_checkpoint_interval=0)
