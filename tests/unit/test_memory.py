"""Memory features change what is kept or when it is computed, never the numbers."""

from __future__ import annotations

import copy

import pytest
import timm
import torch

from pretrain.models.backbones import build_backbone
from pretrain.models.blocks import swin_blocks
from pretrain.parallel.activation_ckpt import apply_activation_checkpointing
from pretrain.parallel.sequential_attention import apply_sequential_attention


def tiny(v2: bool, drop_path: float = 0.0) -> torch.nn.Module:
    """Two-stage Swin (v1 or v2) at 32 px: stage 0 has 4 shifted windows per image."""
    torch.manual_seed(0)
    if not v2:
        return build_backbone("swin_debug", 10, drop_path=drop_path)
    return timm.create_model("swinv2_tiny_window8_256", pretrained=False, num_classes=10, img_size=32,
                             window_size=4, embed_dim=32, depths=(2, 2), num_heads=(2, 4), drop_path_rate=drop_path)


def gradients(model: torch.nn.Module, x: torch.Tensor, seed: int = 1) -> tuple[torch.Tensor, dict]:
    model.zero_grad()
    torch.manual_seed(seed)  # drop-path draws
    out = model(x)
    (out.square().mean() + out[:, 0].sum()).backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_same(a: tuple[torch.Tensor, dict], b: tuple[torch.Tensor, dict], tol: float = 1e-6) -> None:
    torch.testing.assert_close(a[0], b[0], rtol=tol, atol=tol)
    assert a[1].keys() == b[1].keys()
    for name in a[1]:
        torch.testing.assert_close(a[1][name], b[1][name], rtol=tol, atol=tol, msg=name)


@pytest.mark.parametrize("v2", [False, True])
@pytest.mark.parametrize("mode,k,expected", [("blocks", 1, [0, 1, 2, 3]), ("every_k", 2, [0, 2]),
                                             ("every_k", 3, [0, 3])])
def test_activation_checkpointing_keeps_gradients(v2, mode, k, expected):
    model = tiny(v2, drop_path=0.3).train()  # stochastic depth must redraw the same masks
    x = torch.randn(2, 3, 32, 32)
    reference = gradients(model, x)
    checkpointed = copy.deepcopy(model)
    assert apply_activation_checkpointing(checkpointed, mode, k) == expected
    assert checkpointed.state_dict().keys() == model.state_dict().keys()
    assert_same(gradients(checkpointed, x), reference)


def test_checkpointed_blocks_recompute_and_store_less():
    model = tiny(False).train()
    calls = []
    for block in swin_blocks(model):
        block.mlp.register_forward_pre_hook(lambda *_: calls.append(1))  # recompute may stop before a post-hook
    x = torch.randn(2, 3, 32, 32)

    def saved_bytes(m: torch.nn.Module) -> int:
        total = 0

        def pack(t: torch.Tensor) -> torch.Tensor:
            nonlocal total
            total += t.numel() * t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            m(x).sum().backward()
        return total

    plain = saved_bytes(model)
    assert len(calls) == 4
    apply_activation_checkpointing(model, "blocks")
    calls.clear()
    assert saved_bytes(model) < plain / 2
    assert len(calls) == 8  # every block ran again in backward


def test_checkpointing_with_a_frozen_stem():
    """Linear-probe style: the block inputs need no grad, the blocks' weights still get theirs."""
    model = tiny(False).train()
    model.patch_embed.requires_grad_(False)
    x = torch.randn(2, 3, 32, 32)
    reference = gradients(model, x)
    apply_activation_checkpointing(model, "blocks")
    result = gradients(model, x)
    assert not any(name.startswith("patch_embed") for name in result[1])
    assert any(name.startswith("layers.0.blocks.0.") for name in result[1])
    assert_same(result, reference)


@pytest.mark.parametrize("v2", [False, True])
@pytest.mark.parametrize("chunk", [1, 3, 64])
def test_sequential_attention_gives_identical_results(v2, chunk):
    model = tiny(v2).train()
    x = torch.randn(3, 3, 32, 32)
    reference = gradients(model, x)
    chunked = copy.deepcopy(model)
    assert apply_sequential_attention(chunked, [0, 1], chunk) == [
        "layers.0.blocks.0.attn", "layers.0.blocks.1.attn", "layers.1.blocks.0.attn", "layers.1.blocks.1.attn"]
    assert_same(gradients(chunked, x), reference, tol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(chunked.eval()(x), model.eval()(x), rtol=1e-5, atol=1e-5)


def test_sequential_attention_and_checkpointing_compose():
    model = tiny(False).train()
    x = torch.randn(2, 3, 32, 32)
    reference = gradients(model, x)
    apply_sequential_attention(model, [0], 2)
    apply_activation_checkpointing(model, "every_k", 2)
    assert_same(gradients(model, x), reference, tol=1e-5)
