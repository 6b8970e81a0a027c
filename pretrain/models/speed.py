"""Speed switches applied to an unmodified timm Swin, keeping its state-dict layout.

- `sdpa_attention`: timm's own fused path of WindowAttention, which calls
  `F.scaled_dot_product_attention` with the relative position bias (and shift mask) as the
  attention mask instead of softmax(q k^T + bias) v in separate kernels.
- `compile`: `torch.compile` of every Swin block (the unit that repeats), so the window
  partition / shift / attention / MLP chain of a block is fused where the backend can.

Both are config options (`speed.*`) whose defaults follow measurements (README, Performance).
"""

from __future__ import annotations

import torch.nn as nn

from pretrain.parallel.activation_ckpt import swin_blocks


def _window_attentions(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if hasattr(m, "fused_attn") and hasattr(m, "relative_position_bias_table")]


def apply_speedups(model: nn.Module, sdpa_attention: bool, compile_blocks: bool) -> nn.Module:
    """Switch `model` (a timm Swin, or a module holding one) to the chosen fast paths, in place."""
    for attention in _window_attentions(model):
        attention.fused_attn = sdpa_attention
    if compile_blocks:
        for block in swin_blocks(model):
            block.compile()  # compiles the module's forward in place; parameters and names stay
    return model

