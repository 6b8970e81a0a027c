"""Tensor parallelism for Swin: every block's attention heads and MLP hidden units split over ranks.

Per block, with T tensor-parallel ranks (Megatron's split, with fairscale's layers):
- attention `qkv` is column-parallel and split *by heads*: rank r holds q, k and v of heads
  r*H/T .. (r+1)*H/T, so it attends with its own heads and nothing else. Per-head tables
  follow: the relative position bias table (Swin), the logit scale, q/v biases and the
  output layer of the continuous position bias MLP (SwinV2);
- attention `proj` is row-parallel: partial products are summed over the group;
- MLP `fc1` is column-parallel, `fc2` row-parallel.
Norms, biases of row-parallel layers, patch embedding, patch merging and the head are
replicated; their gradients agree on every rank of the group because the layers' inputs
and output gradients do (fairscale's copy / reduce regions all-reduce them).

Shards are cut from the full model built with the same seed on every rank, so a
tensor-parallel model computes the same function as the single-device one. Parameter
names stay timm's; `SPLITS` says how each split tensor is cut, and `merge` puts shards
back together for export.
"""

from __future__ import annotations

import functools
import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from fairscale.nn.model_parallel.layers import ColumnParallelLinear, RowParallelLinear
from fairscale.nn.model_parallel.mappings import copy_to_model_parallel_region

from pretrain.models.blocks import SWIN_BLOCKS, V2_BLOCK

# Parameter-name suffix -> how the tensor is cut: a dimension split into equal contiguous
# parts, or "qkv" (rows laid out (q|k|v, heads, head_dim): each rank takes its heads of all three).
SPLITS: dict[str, int | str] = {
    "attn.qkv.weight": "qkv",
    "attn.qkv.bias": "qkv",
    "attn.q_bias": 0,
    "attn.v_bias": 0,
    "attn.relative_position_bias_table": 1,  # (positions, heads)
    "attn.logit_scale": 0,  # (heads, 1, 1)
    "attn.cpb_mlp.2.weight": 0,  # (heads, hidden)
    "attn.proj.weight": 1,
    "mlp.fc1.weight": 0,
    "mlp.fc1.bias": 0,
    "mlp.fc2.weight": 1,
}


def split_rule(name: str) -> int | str | None:
    """How parameter `name` is split across tensor-parallel ranks, or None if it is replicated."""
    for suffix, rule in SPLITS.items():
        if name == suffix or name.endswith("." + suffix):
            return rule
    return None


def shard(full: torch.Tensor, rule: int | str, rank: int, size: int) -> torch.Tensor:
    """Rank `rank`'s part of `full` out of `size`."""
    if rule == "qkv":
        return full.unflatten(0, (3, size, -1))[:, rank].flatten(0, 1).clone()
    return full.chunk(size, dim=rule)[rank].clone()


def merge(shards: list[torch.Tensor], rule: int | str) -> torch.Tensor:
    """The full tensor from every rank's shard, in rank order (inverse of `shard`)."""
    if rule == "qkv":
        return torch.stack([s.unflatten(0, (3, -1)) for s in shards], dim=1).flatten(0, 2)
    return torch.cat(shards, dim=rule)


def _parallel_linear(linear: nn.Linear, kind: str, rank: int, size: int, rule: int | str,
                     shapes_only: bool = False) -> nn.Module:
    """fairscale's column- or row-parallel copy of `linear`, holding this rank's shard of its weights
    (`shapes_only`: a plain layer of the shard's shape, which communicates nothing)."""
    if shapes_only:
        out_features, in_features = shard(linear.weight, rule, rank, size).shape
        layer = nn.Linear(in_features, out_features, bias=linear.bias is not None, device=linear.weight.device)
        return layer.requires_grad_(linear.weight.requires_grad)

    keep = lambda weight: weight  # noqa: E731 -- the weights are overwritten with the shard below
    if kind == "column":
        layer = ColumnParallelLinear(linear.in_features, linear.out_features, bias=linear.bias is not None,
                                     gather_output=False, init_method=keep)
    else:
        layer = RowParallelLinear(linear.in_features, linear.out_features, bias=linear.bias is not None,
                                  input_is_parallel=True, init_method=keep)
    with torch.no_grad():
        layer.weight.copy_(shard(linear.weight, rule, rank, size))
        layer.weight.model_parallel = True  # DeepSpeed counts its norm on every rank of the group
        layer.weight.requires_grad_(linear.weight.requires_grad)  # frozen stays frozen
        if linear.bias is not None:
            layer.bias.copy_(shard(linear.bias, rule, rank, size) if kind == "column" else linear.bias)
            layer.bias.model_parallel = kind == "column"
            layer.bias.requires_grad_(linear.bias.requires_grad)
    return layer.to(linear.weight.device)


def _split_parameter(module: nn.Module, attr: str, rank: int, size: int, rule: int) -> None:
    full = getattr(module, attr)
    part = nn.Parameter(shard(full.detach(), rule, rank, size), requires_grad=full.requires_grad)
    part.model_parallel = True
    setattr(module, attr, part)


def _swinv2_attention(attn: nn.Module, x: torch.Tensor, mask: Optional[torch.Tensor] = None,
                      communicate: bool = True) -> torch.Tensor:
    """SwinV2 window attention over this rank's heads (timm's computation; its own forward
    assumes all heads are local and bypasses the qkv layer's module)."""
    b, n, _ = x.shape
    if communicate:
        x = copy_to_model_parallel_region(x)  # identity forward; all-reduces the input's gradient
    bias = None if attn.q_bias is None else torch.cat((attn.q_bias, attn.k_bias, attn.v_bias))
    qkv = F.linear(x, attn.qkv.weight, bias).reshape(b, n, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    scores = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1)
    scores = scores * torch.clamp(attn.logit_scale, max=math.log(1.0 / 0.01)).exp()
    table = attn.cpb_mlp(attn.relative_coords_table).view(-1, attn.num_heads)
    area = attn.window_size[0] * attn.window_size[1]
    position_bias = table[attn.relative_position_index.view(-1)].view(area, area, -1).permute(2, 0, 1)
    scores = scores + 16 * torch.sigmoid(position_bias).unsqueeze(0)
    if mask is not None:
        windows = mask.shape[0]
        scores = scores.view(-1, windows, attn.num_heads, n, n) + mask.unsqueeze(1).unsqueeze(0)
        scores = scores.view(-1, attn.num_heads, n, n)
    scores = attn.attn_drop(scores.softmax(dim=-1))
    x = (scores @ v).transpose(1, 2).reshape(b, n, -1)
    return attn.proj_drop(attn.proj(x))


def apply_tensor_parallel(model: nn.Module, rank: int, size: int, shapes_only: bool = False) -> list[str]:
    """Replace every Swin block's attention and MLP of `model` by rank `rank`'s shard; returns
    the names of the modules changed. A no-op for `size` 1.

    `shapes_only` builds a rank's shapes without fairscale's communicating layers, for the
    memory planner, which traces one rank's model in a single process.
    """
    if size == 1:
        return []
    changed = []
    for name, module in list(model.named_modules()):
        kind = type(module).__name__
        if kind in SWIN_BLOCKS:
            _split_attention(module.attn, rank, size, kind == V2_BLOCK, shapes_only)
            mlp = module.mlp
            mlp.fc1 = _parallel_linear(mlp.fc1, "column", rank, size, SPLITS["mlp.fc1.weight"], shapes_only)
            mlp.fc2 = _parallel_linear(mlp.fc2, "row", rank, size, SPLITS["mlp.fc2.weight"], shapes_only)
            changed.append(name)
    return changed


def _split_attention(attn: nn.Module, rank: int, size: int, is_v2: bool, shapes_only: bool) -> None:
    if attn.num_heads % size:
        raise ValueError(f"{attn.num_heads} attention heads cannot be split over {size} tensor-parallel ranks")
    attn.qkv = _parallel_linear(attn.qkv, "column", rank, size, "qkv", shapes_only)
    attn.proj = _parallel_linear(attn.proj, "row", rank, size, SPLITS["attn.proj.weight"], shapes_only)
    attn.num_heads //= size
    if not is_v2:
        _split_parameter(attn, "relative_position_bias_table", rank, size, 1)
        return
    _split_parameter(attn, "logit_scale", rank, size, 0)
    if attn.q_bias is not None:
        _split_parameter(attn, "q_bias", rank, size, 0)
        _split_parameter(attn, "v_bias", rank, size, 0)
        attn.register_buffer("k_bias", torch.zeros_like(attn.q_bias.detach()), persistent=False)
    attn.cpb_mlp[2] = _parallel_linear(attn.cpb_mlp[2], "column", rank, size, 0, shapes_only)
    attn.forward = functools.partial(_swinv2_attention, attn, communicate=not shapes_only)
