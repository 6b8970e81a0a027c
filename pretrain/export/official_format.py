"""The official format: `model.pth` holding `{"model": state_dict}` as microsoft/Swin-Transformer saves it.

The official repository's `SwinTransformer` (models/swin_transformer.py) and `SwinTransformerV2`
(models/swin_transformer_v2.py) load it with strict=True, and it is the layout that the Swin
converters of mmdet (`convert_weights=True`) and mmseg (`swin2mmseg.py`) expect. It differs from
timm's in names, order and buffers:

- patch merging ends stage i there (`layers.{i}.downsample`), where timm starts stage i+1 with it;
- the classifier is `head`, not `head.fc`;
- the window buffers are persistent there (`relative_position_index`, V2's `relative_coords_table`,
  `attn_mask` of shifted blocks), so the file holds them, with the values the official code computes;
- tensors follow the official registration order (V2 blocks: norm1 before attn, norm2 before mlp;
  V1 patch merging: reduction before norm).

Patch merging concatenates the four 2x2 neighbours in the same order in both (top-left, bottom-left,
top-right, bottom-right), so `reduction`/`norm` weights are copied as they are.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
from timm.models import swin_transformer as timm_swin
from timm.models import swin_transformer_v2 as timm_swin_v2

from pretrain.export.exported import Exported, ExportError, check_close
from pretrain.models.backbones import build_backbone

FILE = "model.pth"

Tensors = dict[str, torch.Tensor]
# The names the official modules register as buffers (timm's are non-persistent or absent).
BUFFERS = ("attn_mask", "relative_position_index", "relative_coords_table")


@dataclass(frozen=True)
class Family:
    """One official model class: its attention's tensors in order, and timm's converter back from it."""

    official: str  # the class in the official repository
    attn_params: tuple[str, ...]  # the attention's own parameters, listed before its buffers
    attn_children: tuple[str, ...]  # the tensors of its submodules, which follow the buffers
    coords_table: bool  # V2's continuous position bias input
    timm_filter: Callable[[Tensors, nn.Module], Tensors]  # timm's loader of official checkpoints


FAMILIES: dict[type[nn.Module], Family] = {
    timm_swin.SwinTransformer: Family(
        "SwinTransformer", ("relative_position_bias_table",),
        ("qkv.weight", "qkv.bias", "proj.weight", "proj.bias"), False, timm_swin.checkpoint_filter_fn),
    # qkv has no bias there: q_bias and v_bias are parameters, k's bias is zero (timm's k_bias buffer).
    timm_swin_v2.SwinTransformerV2: Family(
        "SwinTransformerV2", ("logit_scale", "q_bias", "v_bias"),
        ("cpb_mlp.0.weight", "cpb_mlp.0.bias", "cpb_mlp.2.weight", "qkv.weight", "proj.weight", "proj.bias"),
        True, timm_swin_v2.checkpoint_filter_fn),
}


def family_of(model: nn.Module) -> Family:
    family = FAMILIES.get(type(model))
    if family is None:
        raise ExportError(f"the official format has no layout for {type(model).__name__} "
                          f"(only {', '.join(c.__name__ for c in FAMILIES)})")
    return family


def relative_position_index(win: int) -> torch.Tensor:
    """Row of the (2w-1)^2 bias table for each (query, key) pair of a w x w window (int64)."""
    rows, cols = torch.meshgrid(torch.arange(win), torch.arange(win), indexing="ij")
    rows, cols = rows.flatten(), cols.flatten()
    dy = rows[:, None] - rows[None, :] + win - 1
    dx = cols[:, None] - cols[None, :] + win - 1
    return dy * (2 * win - 1) + dx


def relative_coords_table(win: int, pretrained_win: int) -> torch.Tensor:
    """V2's log-spaced relative offsets, (1, 2w-1, 2w-1, 2) float32, in the official operation order."""
    # The official code divides by w-1 unguarded: a 1x1 window gives 0/0 and an official model whose
    # outputs are NaN. Its only offset is 0, so 0 is the limit, timm's value, and what lets that model run.
    span = max((pretrained_win if pretrained_win > 0 else win) - 1, 1)
    offsets = torch.arange(-(win - 1), win, dtype=torch.float32)
    table = torch.stack(torch.meshgrid(offsets, offsets, indexing="ij"), dim=-1).unsqueeze(0)
    table = table / span * 8
    return torch.sign(table) * torch.log2(table.abs() + 1.0) / math.log2(8)


def attn_mask(res: int, win: int, shift: int) -> torch.Tensor:
    """(windows, w*w, w*w) float32: -100 between tokens that the cyclic shift brought from different regions."""
    band = torch.zeros(res, dtype=torch.long)
    band[res - win:] = 1
    band[res - shift:] = 2
    region = band[:, None] * 3 + band[None, :]
    n = res // win
    windows = region.view(n, win, n, win).permute(0, 2, 1, 3).reshape(n * n, win * win)
    apart = windows[:, None, :] != windows[:, :, None]
    return torch.where(apart, -100.0, 0.0).to(torch.float32)


def block_geometry(block: nn.Module) -> tuple[int, int, int]:
    """(feature size, window, shift) of a timm block, as the official block of that stage has them.

    The official block takes one window size for both sides and shrinks it to the feature map when the
    map is not larger (no shift then), as timm does for square maps; it neither pads nor partitions a
    map smaller than the window, so a timm model that does cannot be written in its layout.
    """
    (h, w), (wh, ww), (sh, sw) = block.input_resolution, block.window_size, block.shift_size
    if h != w or wh != ww or sh != sw or h % wh or getattr(block, "always_partition", False):
        raise ExportError(f"the official Swin needs square feature maps tiled by square windows; a block "
                          f"has {h}x{w} tokens, window {wh}x{ww}, shift {sh}x{sw}")
    return h, wh, sh


def official_state_dict(model: nn.Module) -> Tensors:
    """`model`'s tensors as the official model's `state_dict()` lists them (CPU, float tensors fp32)."""
    family = family_of(model)
    ours = model.state_dict()
    out: Tensors = {}
    used: set[str] = set()

    def take(src: str, dst: str, names: tuple[str, ...]) -> None:
        # Optional tensors (a bias switched off, no patch norm) are absent in both layouts alike.
        for name in names:
            if src + name in ours:
                out[dst + name] = ours[src + name]
                used.add(src + name)

    take("patch_embed.", "patch_embed.", ("proj.weight", "proj.bias", "norm.weight", "norm.bias"))
    stages = list(model.layers)
    for i, stage in enumerate(stages):
        for j, block in enumerate(stage.blocks):
            src = dst = f"layers.{i}.blocks.{j}."
            res, win, shift = block_geometry(block)
            if shift:  # a module's own buffers come before its children's tensors in state_dict()
                out[dst + "attn_mask"] = attn_mask(res, win, shift)
            take(src, dst, ("norm1.weight", "norm1.bias"))
            take(src + "attn.", dst + "attn.", family.attn_params)
            if family.coords_table:
                pretrained = tuple(block.attn.pretrained_window_size)
                if pretrained[0] != pretrained[1]:
                    raise ExportError(f"the official SwinV2 needs a square pretrained window, not {pretrained}")
                out[dst + "attn.relative_coords_table"] = relative_coords_table(win, pretrained[0])
            out[dst + "attn.relative_position_index"] = relative_position_index(win)
            take(src + "attn.", dst + "attn.", family.attn_children)
            take(src, dst, ("norm2.weight", "norm2.bias", "mlp.fc1.weight", "mlp.fc1.bias",
                            "mlp.fc2.weight", "mlp.fc2.bias"))
        if i + 1 < len(stages):
            take(f"layers.{i + 1}.downsample.", f"layers.{i}.downsample.",
                 ("reduction.weight", "norm.weight", "norm.bias"))
    take("", "", ("norm.weight", "norm.bias"))
    take("head.fc.", "head.", ("weight", "bias"))  # nothing when headless: head.fc is an Identity
    left = [name for name in ours if name not in used]
    if left:
        raise ExportError(f"the official {family.official} has no place for {len(left)} tensors of the model "
                          f"(e.g. {left[0]})")
    return {name: (t.detach().float() if t.is_floating_point() else t.detach()).cpu().clone()
            for name, t in out.items()}


def check_available() -> None:
    """Nothing to check: the official layout is written and read with torch alone."""


def write(exported: Exported, out_dir: Path) -> list[str]:
    torch.save({"model": official_state_dict(exported.model)}, out_dir / FILE)
    return [FILE]


def _one_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"


def verify(exported: Exported, out_dir: Path) -> float:
    """The file holds the official layout, and timm's converter of official checkpoints loads it back
    (strict) into a fresh model that reproduces the trained model's outputs."""
    path = out_dir / FILE
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a missing, cut short or foreign file: all one line to the user
        raise ExportError(f"{path}: cannot be read back ({_one_line(e)})") from e
    state = saved.get("model") if isinstance(saved, dict) else None
    if not isinstance(state, dict):
        raise ExportError(f"{path}: holds no {{'model': state_dict}}")
    expected = official_state_dict(exported.model)
    if list(state) != list(expected):
        odd = next((a, b) for a, b in zip([*state, None], [*expected, None]) if a != b)
        raise ExportError(f"{path}: not the official layout: {odd[0]!r} where {odd[1]!r} belongs")
    for name, want in expected.items():
        got = state[name]
        if got.shape != want.shape or got.dtype != want.dtype:
            raise ExportError(f"{path}: {name} is {got.dtype} {tuple(got.shape)}, not {want.dtype} {tuple(want.shape)}")
        # timm's converter drops the buffers, so the outputs below cannot vouch for them.
        if name.rsplit(".", 1)[-1] in BUFFERS and not torch.equal(got, want):
            raise ExportError(f"{path}: {name} differs from the official model's own buffer")
    family = family_of(exported.model)
    fresh = build_backbone(exported.arch, exported.num_classes, exported.img_size, exported.window_size)
    if type(fresh) is not type(exported.model):
        raise ExportError(f"{path}: {exported.arch} builds a {type(fresh).__name__}, the model is "
                          f"a {type(exported.model).__name__}")
    try:
        fresh.load_state_dict(family.timm_filter(state, fresh), strict=True)
    except (RuntimeError, KeyError, ValueError) as e:
        raise ExportError(f"{path}: timm's converter of official checkpoints does not load it ({_one_line(e)})") from e
    fresh.eval()
    x = exported.probe()
    with torch.no_grad():
        return check_close("the official export's output (read through timm's converter)",
                           exported.model(x), fresh(x), path)


def usage(exported: Exported, out_dir: str) -> str:
    spec = exported.spec
    module, cls = ("swin_transformer_v2", "SwinTransformerV2") if spec.is_v2 else ("swin_transformer", "SwinTransformer")
    lines = [
        "# in a clone of github.com/microsoft/Swin-Transformer",
        "import torch",
        f"from models.{module} import {cls}",
        "",
        f"model = {cls}(img_size={exported.img_size}, patch_size={spec.patch_size}, embed_dim={spec.embed_dim}, "
        f"depths={list(spec.depths)}, num_heads={list(spec.num_heads)}, window_size={exported.window_size}, "
        f"num_classes={exported.num_classes})",
        f'model.load_state_dict(torch.load("{out_dir}/{FILE}", map_location="cpu", weights_only=True)["model"], '
        "strict=True)",
    ]
    if not spec.is_v2:  # mmdet's and mmseg's converters read Swin V1 only
        lines += ["# mmdet: backbone=dict(type=\"SwinTransformer\", ..., convert_weights=True,",
                  f"#     init_cfg=dict(type=\"Pretrained\", checkpoint=\"{out_dir}/{FILE}\"))",
                  f"# mmseg: python tools/model_converters/swin2mmseg.py {out_dir}/{FILE} swin_mmseg.pth first"]
    return "\n".join(lines) + "\n"
