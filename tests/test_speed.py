"""Speed switches keep stock timm's outputs; the benchmarks run (tiny sizes, no timing assertions)."""

from __future__ import annotations

import json
import sys

import pytest
import timm
import torch

from pretrain.models.backbones import BACKBONES, build_backbone, model_args
from pretrain.models.speed import apply_speedups
from tests.conftest import run


def stock_and_ours(arch: str = "swin_debug", **switches):
    torch.manual_seed(0)
    stock = build_backbone(arch, 10).train()
    ours = build_backbone(arch, 10).train()
    ours.load_state_dict(stock.state_dict())
    apply_speedups(ours, **switches)
    assert list(ours.state_dict()) == list(stock.state_dict())  # same layout
    return stock, ours


def test_sdpa_attention_matches_stock_timm_forward_and_backward():
    stock, ours = stock_and_ours(sdpa_attention=True, compile_blocks=False)
    x = torch.randn(4, 3, 32, 32)
    a, b = stock(x), ours(x)
    assert torch.allclose(a, b, atol=1e-5)
    a.square().sum().backward()
    b.square().sum().backward()
    for (name, p), q in zip(stock.named_parameters(), ours.parameters()):
        assert torch.allclose(p.grad, q.grad, atol=1e-5, rtol=1e-4), name


@pytest.mark.slow
def test_compiled_blocks_match_stock_timm():
    stock, ours = stock_and_ours(sdpa_attention=False, compile_blocks=True)
    x = torch.randn(2, 3, 32, 32)
    assert torch.allclose(stock.eval()(x), ours.eval()(x), atol=1e-5)


def test_bf16_weights_match_stock_timm_under_autocast():
    """The engine runs the module in bf16 (no per-op casts); stock timm autocasts an fp32 module."""
    torch.manual_seed(0)
    spec = BACKBONES["swin_debug"]
    stock = timm.create_model(spec.timm_name, num_classes=10, **model_args(spec)).eval()
    ours = build_backbone("swin_debug", 10).eval()
    ours.load_state_dict(stock.state_dict())
    ours = ours.to(torch.bfloat16)
    x = torch.randn(8, 3, 32, 32)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        reference = stock(x).float()
    with torch.no_grad():
        fast = ours(x.bfloat16()).float()
        exact = stock(x)
    # Both are bf16 approximations of the fp32 model, equally close to it.
    assert torch.nn.functional.cosine_similarity(fast, exact, dim=-1).min() > 0.999
    assert (fast - exact).abs().max() < 4 * (reference - exact).abs().max() + 1e-2


@pytest.mark.slow
def test_step_benchmark_runs():
    out = run([sys.executable, "-m", "pretrain.bench", "step", "--arch", "swin_debug", "--micro-batch", "2",
               "--warmup", "1", "--steps", "1", "--json"]).stdout
    result = json.loads(out.strip().splitlines()[-1])
    assert result["gflop_per_image"] > 0 and result["peak_tflops"] > 0
    for side in ("reference", "ours"):
        assert result[side]["images_per_s"] > 0 and 0 < result[side]["mfu"] < 1


@pytest.mark.slow
def test_scaling_benchmark_runs():
    out = run([sys.executable, "-m", "pretrain.bench", "scaling", "--arch", "swin_debug", "--sizes", "32", "64",
               "--micro-batch", "2", "--warmup", "1", "--steps", "1", "--json"]).stdout
    rows = json.loads(out.strip().splitlines()[-1])
    assert [r["img_size"] for r in rows] == [32, 64] and rows[0]["time_ratio"] == rows[0]["flops_ratio"] == 1.0
    assert rows[1]["pixels_ratio"] == 4.0 and rows[1]["flops_ratio"] > 3  # same window: about linear in pixels
    assert all(r["s_per_image"] > 0 for r in rows)


def test_data_benchmark_runs():
    out = run([sys.executable, "-m", "pretrain.bench", "data", "--photos", "64x48", "--count", "8", "--samples",
               "8", "--repeats", "1", "--img-size", "32", "--json"]).stdout
    result = json.loads(out.strip().splitlines()[-1])
    assert result["ratio_median"] > 0 and len(result["ours_images_per_s"]) == 1


def test_memory_benchmark_runs():
    out = run([sys.executable, "-m", "pretrain.bench", "memory", "--arch", "swin_debug", "--micro-batch", "64",
               "--steps", "1", "--json"]).stdout
    rows = json.loads(out.strip().splitlines()[-1])["rows"]
    assert [(r["mode"], r["checkpointed_blocks"]) for r in rows] == [("none", 0), ("every_2", 2), ("blocks", 4)]
    assert all(r["activation_mib"] > 0 and r["step_s"] > 0 for r in rows)
    # Recomputing every block keeps less than keeping everything, even on the 4-block debug model.
    assert rows[2]["activation_mib"] < rows[0]["activation_mib"]
