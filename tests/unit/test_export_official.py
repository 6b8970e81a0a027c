"""The official export (microsoft/Swin-Transformer's `{"model": state_dict}`) of the tiny Swin V1 and V2.

The expected layout and buffers are spelled out here from the official models' definitions
(models/swin_transformer.py, models/swin_transformer_v2.py), independently of the converter.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import swin_transformer, swin_transformer_v2

from pretrain.export import official_format
from pretrain.export.exported import Exported, ExportError
from pretrain.models.backbones import BACKBONES, build_backbone

IMG, WINDOW = 32, 4
CASES = [(arch, classes) for arch in ("swin_debug", "swinv2_debug") for classes in (5, 0)]
TIMM_FILTERS = {swin_transformer.SwinTransformer: swin_transformer.checkpoint_filter_fn,
                swin_transformer_v2.SwinTransformerV2: swin_transformer_v2.checkpoint_filter_fn}


def make_exported(arch: str, num_classes: int) -> Exported:
    model = build_backbone(arch, num_classes, IMG, WINDOW).eval()
    # Random values everywhere: zero-initialised biases and V2's zeroed post-norms would let a
    # misplaced tensor go unnoticed in the outputs.
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    return Exported(arch=arch, spec=BACKBONES[arch], img_size=IMG, window_size=WINDOW, objective="supervised",
                    model=model, simmim=None, label_names=[str(i) for i in range(num_classes)],
                    mean=tuple(IMAGENET_DEFAULT_MEAN), std=tuple(IMAGENET_DEFAULT_STD), crop_pct=0.875,
                    interpolation="bicubic")


def stage_windows(res: int, window: int, depth: int) -> list[tuple[int, int]]:
    """(window, shift) of each official block: odd blocks shift by half a window, unless the map fits one."""
    if res <= window:
        return [(res, 0)] * depth
    return [(window, window // 2 if j % 2 else 0) for j in range(depth)]


def official_layout(arch: str, num_classes: int) -> list[tuple[str, tuple[int, ...]]]:
    """Names and shapes of the official model's state_dict(), in order: a module's parameters, its
    buffers (None ones are left out), then its children in the order its __init__ assigns them."""
    spec = BACKBONES[arch]
    v2, c, p = spec.is_v2, spec.embed_dim, spec.patch_size
    out = [("patch_embed.proj.weight", (c, 3, p, p)), ("patch_embed.proj.bias", (c,)),
           ("patch_embed.norm.weight", (c,)), ("patch_embed.norm.bias", (c,))]
    for i, (depth, heads) in enumerate(zip(spec.depths, spec.num_heads)):
        dim, res = c * 2**i, IMG // p // 2**i
        for j, (win, shift) in enumerate(stage_windows(res, WINDOW, depth)):
            b = f"layers.{i}.blocks.{j}."
            n = win * win
            if shift:
                out.append((b + "attn_mask", ((res // win) ** 2, n, n)))
            out += [(b + "norm1.weight", (dim,)), (b + "norm1.bias", (dim,))]
            if v2:
                out += [(b + "attn.logit_scale", (heads, 1, 1)), (b + "attn.q_bias", (dim,)),
                        (b + "attn.v_bias", (dim,)),
                        (b + "attn.relative_coords_table", (1, 2 * win - 1, 2 * win - 1, 2)),
                        (b + "attn.relative_position_index", (n, n)),
                        (b + "attn.cpb_mlp.0.weight", (512, 2)), (b + "attn.cpb_mlp.0.bias", (512,)),
                        (b + "attn.cpb_mlp.2.weight", (heads, 512)), (b + "attn.qkv.weight", (3 * dim, dim))]
            else:
                out += [(b + "attn.relative_position_bias_table", ((2 * win - 1) ** 2, heads)),
                        (b + "attn.relative_position_index", (n, n)),
                        (b + "attn.qkv.weight", (3 * dim, dim)), (b + "attn.qkv.bias", (3 * dim,))]
            out += [(b + "attn.proj.weight", (dim, dim)), (b + "attn.proj.bias", (dim,)),
                    (b + "norm2.weight", (dim,)), (b + "norm2.bias", (dim,)),
                    (b + "mlp.fc1.weight", (4 * dim, dim)), (b + "mlp.fc1.bias", (4 * dim,)),
                    (b + "mlp.fc2.weight", (dim, 4 * dim)), (b + "mlp.fc2.bias", (dim,))]
        if i + 1 < len(spec.depths):
            d = f"layers.{i}.downsample."
            norm = 2 * dim if v2 else 4 * dim  # V2 normalises after the reduction, V1 before
            out += [(d + "reduction.weight", (2 * dim, 4 * dim)), (d + "norm.weight", (norm,)),
                    (d + "norm.bias", (norm,))]
    features = c * 2 ** (len(spec.depths) - 1)
    out += [("norm.weight", (features,)), ("norm.bias", (features,))]
    if num_classes:
        out += [("head.weight", (num_classes, features)), ("head.bias", (num_classes,))]
    return out


# The official buffers, computed entry by entry.

def expected_position_index(win: int) -> torch.Tensor:
    tokens = [(y, x) for y in range(win) for x in range(win)]
    return torch.tensor([[(qy - ky + win - 1) * (2 * win - 1) + (qx - kx + win - 1) for ky, kx in tokens]
                         for qy, qx in tokens], dtype=torch.int64)


def expected_coords_table(win: int) -> torch.Tensor:
    def squash(d: int) -> float:  # offset scaled to [-8, 8] (no pretrained window), then log-spaced
        s = d / (win - 1) * 8
        return math.copysign(math.log2(abs(s) + 1) / 3, s) if s else 0.0
    span = range(-(win - 1), win)
    return torch.tensor([[[[squash(dy), squash(dx)] for dx in span] for dy in span]], dtype=torch.float32)


def expected_mask(res: int, win: int, shift: int) -> torch.Tensor:
    def band(i: int) -> int:  # the three strips the official slices cut: [0, -win), [-win, -shift), [-shift, end)
        return 0 if i < res - win else 1 if i < res - shift else 2
    masks = []
    for wy in range(0, res, win):
        for wx in range(0, res, win):
            labels = [(band(y), band(x)) for y in range(wy, wy + win) for x in range(wx, wx + win)]
            masks.append([[0.0 if a == b else -100.0 for b in labels] for a in labels])
    return torch.tensor(masks, dtype=torch.float32)


@pytest.mark.parametrize("arch,num_classes", CASES)
def test_the_state_dict_has_the_official_names_order_and_shapes(arch, num_classes):
    exported = make_exported(arch, num_classes)
    state = official_format.official_state_dict(exported.model)
    assert [(k, tuple(v.shape)) for k, v in state.items()] == official_layout(arch, num_classes)
    own = {t.data_ptr() for t in exported.model.state_dict().values()}
    for name, t in state.items():
        assert t.device.type == "cpu" and t.data_ptr() not in own, name
        assert t.dtype == (torch.int64 if name.endswith("relative_position_index") else torch.float32), name
    if not num_classes:
        assert not any(k.startswith("head") for k in state)


@pytest.mark.parametrize("arch", ["swin_debug", "swinv2_debug"])
def test_buffers_have_the_official_values_and_timm_agrees(arch):
    exported = make_exported(arch, 0)
    state = official_format.official_state_dict(exported.model)
    timm_buffers = dict(exported.model.named_buffers())
    spec = BACKBONES[arch]
    checked = 0
    for i, depth in enumerate(spec.depths):
        res = IMG // spec.patch_size // 2**i
        for j, (win, shift) in enumerate(stage_windows(res, WINDOW, depth)):
            b = f"layers.{i}.blocks.{j}."
            want = {b + "attn.relative_position_index": expected_position_index(win)}
            if shift:
                want[b + "attn_mask"] = expected_mask(res, win, shift)
            if spec.is_v2:
                want[b + "attn.relative_coords_table"] = expected_coords_table(win)
            for name, value in want.items():
                torch.testing.assert_close(state[name], value, rtol=0, atol=1e-6, msg=name)
                torch.testing.assert_close(timm_buffers[name], value, rtol=0, atol=1e-6, msg=f"timm {name}")
                checked += 1
    assert checked == sum(spec.depths) * (2 if spec.is_v2 else 1) + 1  # one shifted block has a mask


@pytest.mark.parametrize("arch", ["swin_debug", "swinv2_debug"])
def test_patch_merging_weights_need_no_reordering(arch):
    """timm's merge of the exported weights equals the official one: x[0::2, 0::2], x[1::2, 0::2],
    x[0::2, 1::2], x[1::2, 1::2] concatenated; V1 normalises then reduces, V2 reduces then normalises."""
    exported = make_exported(arch, 0)
    state = official_format.official_state_dict(exported.model)
    x = torch.randn(2, 8, 8, 32, generator=torch.Generator().manual_seed(4))
    merged = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], -1)
    d = "layers.0.downsample."
    w, nw, nb = state[d + "reduction.weight"], state[d + "norm.weight"], state[d + "norm.bias"]
    if BACKBONES[arch].is_v2:
        official = F.layer_norm(F.linear(merged, w), nw.shape, nw, nb)
    else:
        official = F.linear(F.layer_norm(merged, nw.shape, nw, nb), w)
    with torch.no_grad():
        torch.testing.assert_close(exported.model.layers[1].downsample(x), official, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch,num_classes", CASES)
def test_written_file_round_trips_through_timms_official_converter(arch, num_classes, tmp_path):
    exported = make_exported(arch, num_classes)
    assert official_format.write(exported, tmp_path) == [official_format.FILE]
    assert official_format.verify(exported, tmp_path) <= 1e-4

    saved = torch.load(tmp_path / official_format.FILE, map_location="cpu", weights_only=True)
    assert list(saved) == ["model"]
    fresh = build_backbone(arch, num_classes, IMG, WINDOW).eval()
    fresh.load_state_dict(TIMM_FILTERS[type(fresh)](saved["model"], fresh), strict=True)
    x = exported.probe()
    with torch.no_grad():
        ours, theirs = exported.model(x), fresh(x)
    assert ours.shape == (2, num_classes or exported.spec.embed_dim * 2)
    assert (ours - theirs).abs().max().item() <= 1e-4


@pytest.mark.parametrize("arch", ["swin_debug", "swinv2_debug"])
def test_verify_fails_on_a_corrupted_file(arch, tmp_path):
    exported = make_exported(arch, 5)
    official_format.write(exported, tmp_path)
    path = tmp_path / official_format.FILE
    original = torch.load(path, map_location="cpu", weights_only=True)["model"]

    def corrupted(change) -> str:
        state = {k: v.clone() for k, v in original.items()}
        change(state)
        torch.save({"model": state}, path)
        return failure()

    def failure() -> str:
        with pytest.raises(ExportError) as e:
            official_format.verify(exported, tmp_path)
        assert "\n" not in str(e.value) and str(path) in str(e.value)
        return str(e.value)

    assert "differs" in corrupted(lambda s: s["layers.1.blocks.0.mlp.fc1.weight"].mul_(-1.0))
    # Buffers are dropped by timm's converter: verify compares them with the official values itself.
    assert "attn_mask" in corrupted(lambda s: s["layers.0.blocks.1.attn_mask"].zero_())
    assert "head.bias" in corrupted(lambda s: s.pop("head.bias"))
    path.write_bytes(b"not a checkpoint")
    assert "cannot be read back" in failure()


def test_other_models_have_no_official_layout():
    with pytest.raises(ExportError, match="no layout for Linear"):
        official_format.official_state_dict(nn.Linear(2, 2))


def test_usage_names_the_file_the_model_and_the_backbone_loaders():
    text = official_format.usage(make_exported("swin_debug", 10), "out/official")
    assert "out/official/model.pth" in text and "strict=True" in text
    assert "SwinTransformer(img_size=32, patch_size=4, embed_dim=32, depths=[2, 2], num_heads=[2, 4], " \
           "window_size=4, num_classes=10)" in text
    assert 'init_cfg=dict(type="Pretrained"' in text and "convert_weights=True" in text
    v2 = official_format.usage(make_exported("swinv2_debug", 0), "out/official")
    assert "from models.swin_transformer_v2 import SwinTransformerV2" in v2 and "mmdet" not in v2
