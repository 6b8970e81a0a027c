"""Checks across sections that need facts from outside the config, passed in as arguments.

Each takes the facts it needs (the world size, the backbone's shape, what dataset.json
lists, the parameter names, the node's GPUs) so this package stays a leaf; `pretrain.preflight`
gathers the facts and runs them all before any process group starts.
"""

from __future__ import annotations

from typing import Callable, Protocol, Sequence

from pretrain.config.schema import Config, need


class ModelShape(Protocol):
    """What the checks need of a backbone (a row of the table in models/backbones.py)."""

    depths: Sequence[int]
    num_heads: Sequence[int]
    patch_size: int


class NodeGPUs(Protocol):
    """What the checks need of a node's GPUs (launch.env.DeviceFacts)."""

    name: str
    bf16: bool
    gpus_on_node: int
    ranks_on_node: int | None


def data_parallel_size(cfg: Config, world: int) -> int:
    return max(1, world // cfg.parallel.model_parallel)


def check_arch(cfg: Config, known: Sequence[str]) -> None:
    need(cfg.model.arch in known, f"model.arch={cfg.model.arch!r} is unknown (allowed: {', '.join(known)})")


def check_layout(cfg: Config, world: int, shape: ModelShape) -> None:
    """world = data x pipeline x tensor, and what each model-parallel degree allows for this backbone."""
    z = cfg.parallel
    need(world % z.model_parallel == 0,
         f"parallel.pipeline_stages x parallel.tensor_parallel = {z.pipeline_stages} x {z.tensor_parallel} = "
         f"{z.model_parallel} must divide the {world} ranks")
    need(all(h % z.tensor_parallel == 0 for h in shape.num_heads),
         f"parallel.tensor_parallel={z.tensor_parallel} must divide the attention heads of every stage of "
         f"{cfg.model.arch} ({', '.join(map(str, shape.num_heads))})")
    layers = 2 + sum(shape.depths) + len(shape.depths) - 1  # embed, blocks, patch mergings, head
    need(z.pipeline_stages <= layers,
         f"parallel.pipeline_stages={z.pipeline_stages} exceeds the {layers} pipeline layers of {cfg.model.arch}")


def check_model(cfg: Config, shape: ModelShape, img_size: int) -> None:
    """Options that name parts of the backbone: stages of sequential attention, SimMIM's mask patches."""
    stages = len(shape.depths)
    chunked = cfg.parallel.sequential_attention
    bad = [s for s in chunked if not 0 <= s < stages]
    need(not bad, f"parallel.sequential_attention={chunked}: {cfg.model.arch} has stages 0..{stages - 1} (got {bad})")
    o = cfg.objective
    if o.kind == "simmim":
        need(o.mask_patch_size > 0 and img_size % o.mask_patch_size == 0 and o.mask_patch_size % shape.patch_size == 0,
             f"objective.mask_patch_size={o.mask_patch_size} must divide model.img_size={img_size} and be a multiple "
             f"of the model patch size {shape.patch_size}")


def check_batch(cfg: Config, world: int) -> None:
    b, dp = cfg.batch, data_parallel_size(cfg, world)
    per_step = b.micro_batch * dp
    need(b.global_batch >= per_step and b.global_batch % per_step == 0,
         f"batch.global_batch={b.global_batch} must be a multiple of batch.micro_batch x data-parallel ranks "
         f"= {b.micro_batch} x {dp} = {per_step}")


def check_data(cfg: Config, world: int, classes: int, train_shards: int) -> None:
    """Against the shards: enough of them for passes without replacement, and the class count."""
    d, dp = cfg.data, data_parallel_size(cfg, world)
    if not d.resampled:
        need(train_shards >= dp * max(1, d.workers),
             f"data.resampled=false needs at least data-parallel ranks x data.workers = {dp} x {max(1, d.workers)} "
             f"training shards, found {train_shards}; use data.resampled=true or fewer workers")
    n = cfg.objective.num_classes
    need(n in (0, classes), f"objective.num_classes={n} disagrees with the {classes} classes in "
                            f"{cfg.data.root}/dataset.json")


def check_frozen(cfg: Config, names: Sequence[str], matches: Callable[[str, list[str]], bool],
                 trainable_left: bool) -> None:
    """optim.frozen against the backbone's parameter `names`: every prefix names one (`matches(name,
    prefixes)` is the rule the optimizer freezes by), and something is left to train."""
    for prefix in cfg.optim.frozen:
        need(any(matches(n, [prefix]) for n in names), f"optim.frozen: {prefix!r} names no parameter of {cfg.model.arch} (top-level names: "
                               f"{', '.join(dict.fromkeys(n.split('.')[0] for n in names))})")
    need(trainable_left or cfg.objective.kind == "simmim", f"optim.frozen={cfg.optim.frozen} leaves nothing to train")


def check_precision(cfg: Config, on_cuda: bool) -> None:
    need(cfg.precision != "fp16" or on_cuda, "precision=fp16 needs a CUDA device; use precision=bf16 (or fp32) on CPU")


def check_devices(cfg: Config, gpus: NodeGPUs) -> None:
    """Against the GPUs of this node."""
    need(cfg.precision != "bf16" or gpus.bf16,
         f"precision=bf16: {gpus.name} does not compute in bf16; use precision=fp16 or fp32")
    tensor = cfg.parallel.tensor_parallel
    need(tensor <= gpus.gpus_on_node, f"parallel.tensor_parallel={tensor} is larger than the {gpus.gpus_on_node} GPUs "
                                      f"of one node: a tensor-parallel group must stay on a node's fast links")
    need(not (gpus.ranks_on_node and gpus.ranks_on_node > gpus.gpus_on_node),
         f"{gpus.ranks_on_node} ranks on this node but {gpus.gpus_on_node} GPUs: start at most one rank per GPU "
         f"(deepspeed --num_gpus, torchrun --nproc_per_node, srun --ntasks-per-node)")
