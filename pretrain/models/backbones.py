"""Named Swin backbones, built as timm's own `SwinTransformer` / `SwinTransformerV2`.

The table maps our short names to a timm registry name (the family, used for timm's
pretrained config and for `config.json` on export) plus the constructor arguments that
define the size. Building goes through `timm.create_model`, so the model records its
reconstruction arguments and exports in timm's layout without any remapping.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import timm
import torch.nn as nn
from safetensors.torch import load_file
from timm.layers import resize_rel_pos_bias_table

from pretrain.config import ConfigError


@dataclass(frozen=True)
class BackboneSpec:
    """Size of one Swin backbone; `timm_name` is the registered timm model of its family."""

    timm_name: str
    embed_dim: int
    depths: tuple[int, ...]
    num_heads: tuple[int, ...]
    window_size: int
    img_size: int
    patch_size: int = 4
    # SwinV2 trained at one window size can be fine-tuned at another; timm keeps the
    # pretraining window per stage to scale the continuous position bias coordinates.
    is_v2: bool = False


BACKBONES: dict[str, BackboneSpec] = {
    "swin_debug": BackboneSpec("swin_tiny_patch4_window7_224", 32, (2, 2), (2, 4), 4, 32),
    "swinv2_debug": BackboneSpec("swinv2_tiny_window8_256", 32, (2, 2), (2, 4), 4, 32, is_v2=True),
    "swin_t": BackboneSpec("swin_tiny_patch4_window7_224", 96, (2, 2, 6, 2), (3, 6, 12, 24), 7, 224),
    "swin_s": BackboneSpec("swin_small_patch4_window7_224", 96, (2, 2, 18, 2), (3, 6, 12, 24), 7, 224),
    "swin_b": BackboneSpec("swin_base_patch4_window7_224", 128, (2, 2, 18, 2), (4, 8, 16, 32), 7, 224),
    "swin_l": BackboneSpec("swin_large_patch4_window7_224", 192, (2, 2, 18, 2), (6, 12, 24, 48), 7, 224),
    "swinv2_b": BackboneSpec("swinv2_base_window12_192", 128, (2, 2, 18, 2), (4, 8, 16, 32), 12, 192, is_v2=True),
    "swinv2_l": BackboneSpec("swinv2_large_window12_192", 192, (2, 2, 18, 2), (6, 12, 24, 48), 12, 192, is_v2=True),
    "swinv2_g": BackboneSpec("swinv2_base_window12_192", 512, (2, 2, 42, 4), (16, 32, 64, 128), 12, 192, is_v2=True),
}


def resolve_geometry(spec: BackboneSpec, img_size: int = 0, window_size: int = 0) -> tuple[int, int]:
    """Return (img_size, window_size), 0 meaning the spec's default; raise ConfigError if they don't tile."""
    img = img_size or spec.img_size
    win = window_size or spec.window_size
    stages = len(spec.depths)
    stride = spec.patch_size * 2 ** (stages - 1)
    if img % stride:
        raise ConfigError(f"model.img_size={img} must be a multiple of {stride} for this backbone "
                          f"(patch {spec.patch_size}, {stages} stages)")
    for i in range(stages):
        tokens = img // (spec.patch_size * 2**i)
        # timm clamps the window to the feature map when the map is smaller than it.
        if tokens > win and tokens % win:
            raise ConfigError(f"model.window_size={win} does not tile stage {i} ({tokens}x{tokens} tokens at "
                              f"img_size {img}); choose a window that divides {tokens}")
    return img, win


def model_args(spec: BackboneSpec, img_size: int = 0, window_size: int = 0) -> dict[str, Any]:
    """Constructor arguments that make timm's family model into this backbone."""
    img, win = resolve_geometry(spec, img_size, window_size)
    args: dict[str, Any] = dict(
        img_size=img,
        patch_size=spec.patch_size,
        embed_dim=spec.embed_dim,
        depths=spec.depths,
        num_heads=spec.num_heads,
        window_size=win,
    )
    if spec.is_v2:
        args["pretrained_window_sizes"] = (0,) * len(spec.depths)
    return args


def build_backbone(
    arch: str,
    num_classes: int,
    img_size: int = 0,
    window_size: int = 0,
    drop_path: float = 0.0,
    device: Any = None,
) -> nn.Module:
    """Build backbone `arch` as a timm model with a `num_classes` head (0 = no head)."""
    if arch not in BACKBONES:
        raise ConfigError(f"model.arch={arch!r} is unknown (allowed: {', '.join(BACKBONES)})")
    spec = BACKBONES[arch]
    return timm.create_model(
        spec.timm_name,
        pretrained=False,
        num_classes=num_classes,
        drop_path_rate=drop_path,
        device=device,
        **model_args(spec, img_size, window_size),
    )


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def load_backbone_weights(model: nn.Module, export_dir: str) -> int:
    """Load an export's weights into `model`, a timm Swin of the same architecture; return the count.

    Only the classifier head may be absent or differ in shape (it keeps its fresh init);
    relative position bias tables are resized when the window size changed.
    """
    weights = load_file(f"{export_dir}/model.safetensors")
    own = model.state_dict()
    head = {k for k in own if k.startswith("head.")}
    weights = {k: v for k, v in weights.items() if not (k.startswith("head.") and own.get(k, v).shape != v.shape)}
    for name, value in list(weights.items()):
        if name.endswith("relative_position_bias_table") and name in own and own[name].shape != value.shape:
            module = model.get_submodule(name.rsplit(".", 1)[0])
            weights[name] = resize_rel_pos_bias_table(value, new_window_size=module.window_size,
                                                      new_bias_shape=own[name].shape)
    result = model.load_state_dict(weights, strict=False)
    missing = [k for k in result.missing_keys if k not in head]
    if missing or result.unexpected_keys:
        raise ConfigError(f"run.init_from={export_dir}: weights do not fit model.arch (missing {missing[:3]}, "
                          f"unexpected {result.unexpected_keys[:3]})")
    return len(weights)
