"""Speed switches keep stock timm's outputs; the data and memory benchmarks run (tiny sizes, no timing
assertions)."""

from __future__ import annotations

import copy
import json
import sys

import pytest
import timm
import torch
from timm.layers import DropPath

from pretrain.models.backbones import BACKBONES, build_backbone, model_args
from pretrain.models.speed import StochasticDepth, apply_speedups, use_tensor_drop_path_rates
from pretrain.models.blocks import swin_blocks
from pretrain.parallel.activation_ckpt import apply_activation_checkpointing
from pretrain.parallel.sequential_attention import apply_sequential_attention
from tests.helpers import run


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


def test_interleaving_alternates_the_order_and_samples_the_peak_each_pair(monkeypatch):
    from pretrain.bench import step as bench

    calls = []
    monkeypatch.setattr(bench.MatmulPeak, "sample", lambda self: calls.append("peak") or 1e12)
    sides = {name: bench.Side(lambda name=name: lambda: calls.append(name), "cpu") for name in bench.SIDES}
    peak = bench.MatmulPeak("cpu", (8,), repeats=1)
    calls.clear()
    pairs = bench.interleave(sides, peak, warmup=1, steps=3)
    assert calls == ["reference", "ours",  # warm-up, untimed
                     "peak", "reference", "ours", "peak", "ours", "reference", "peak", "reference", "ours"]
    assert len(pairs) == 3 and all(p["peak_tflops"] == 1.0 for p in pairs)
    assert [len(side.times) for side in sides.values()] == [3, 3]


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


# --- compile: one graph per distinct block shape, every block compiled -------------------


def test_stochastic_depth_draws_like_timm_drop_path():
    """Same distribution as timm's DropPath: whole samples dropped at the rate, the rest scaled by 1/keep."""
    x = torch.ones(20000, 3, 2)
    for rate in (0.0, 0.3, 1.0):
        ours, timms = StochasticDepth(rate).train(), DropPath(rate).train()
        assert torch.equal(ours.eval()(x), x) and torch.equal(timms.eval()(x), x)
        for module in (ours.train(), timms.train()):
            out = module(x)
            per_sample = out.flatten(1)
            assert (per_sample == per_sample[:, :1]).all()  # one draw per sample
            kept = (per_sample[:, 0] != 0).double().mean().item()
            sigma = (rate * (1 - rate) / len(x)) ** 0.5
            assert abs(kept - (1 - rate)) <= 5 * sigma + 1e-12
            scale = torch.tensor(1 / (1 - rate)).item() if rate < 1 else 0.0
            assert set(out.unique().tolist()) <= {0.0, scale}
    # The rate survives a cast of the model to bf16 (as the engine does) and draws with it.
    ours = StochasticDepth(0.1).to(torch.bfloat16).train()
    assert ours.keep_prob.dtype == torch.float32 and ours.keep_prob.item() == pytest.approx(0.9)
    x16 = torch.ones(20000, 4, dtype=torch.bfloat16)
    ours_values, timm_values = ours(x16).unique(), DropPath(0.1).train()(x16).unique()
    assert torch.equal(ours_values, timm_values)  # the same bf16 scale 1/0.9
    assert abs((ours(x16)[:, 0] != 0).float().mean().item() - 0.9) < 0.01
    # A rate schedule writes into the tensor: the graph input changes, not the graph.
    ours.drop_prob = 0.5
    assert ours.keep_prob.item() == 0.5 and "drop_prob=0.500" in repr(ours)


def test_tensor_rates_keep_timm_layout_and_rates():
    torch.manual_seed(0)
    stock = build_backbone("swin_debug", 10, drop_path=0.3)
    ours = copy.deepcopy(stock)
    assert use_tensor_drop_path_rates(swin_blocks(ours)) == 8  # both branches of all 4 blocks
    assert list(ours.state_dict()) == list(stock.state_dict())
    rates = [getattr(getattr(b, n), "drop_prob", 0.0) for b in swin_blocks(stock) for n in ("drop_path1", "drop_path2")]
    assert rates[0] == 0.0 and len(set(rates)) == 4  # timm: 0 for the first block, growing with depth
    assert [getattr(b, n).drop_prob for b in swin_blocks(ours) for n in ("drop_path1", "drop_path2")] == rates
    assert all(isinstance(getattr(b, n), StochasticDepth) for b in swin_blocks(ours) for n in ("drop_path1", "drop_path2"))
    # Without drop path nothing changes (no extra draws in a model that never drops).
    assert use_tensor_drop_path_rates(swin_blocks(build_backbone("swin_debug", 10))) == 0


def deep_debug(arch: str) -> torch.nn.Module:
    """The debug backbone with 10 blocks (4 + 6) and drop path: more blocks than dynamo's default limit of 8."""
    spec = BACKBONES[arch]
    torch.manual_seed(0)
    return timm.create_model(spec.timm_name, num_classes=10, drop_path_rate=0.2,
                             **{**model_args(spec), "depths": (4, 6)}).train()


EAGER_CALLS: list[str] = []


def _count_eager(module: torch.nn.Module, args: tuple) -> None:
    # Traced (not run) inside a compiled graph: only a block running as Python code counts.
    if not torch.compiler.is_compiling():
        EAGER_CALLS.append("mlp")


def run_counted(model: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Forward and backward of `model`; also how many block MLPs ran eagerly (recomputes included)."""
    handles = [b.mlp.register_forward_pre_hook(_count_eager) for b in swin_blocks(model)]
    EAGER_CALLS.clear()
    out = model(x)
    out.square().sum().backward()
    for handle in handles:
        handle.remove()
    return out, len(EAGER_CALLS)


@pytest.fixture
def compile_counters():
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    yield torch._dynamo.utils.counters
    torch._dynamo.reset()


# Checkpointing applied before compile (the engine's order: every other block) and after it
# (every block), and sequential attention in stage 0 on SwinV2.
@pytest.mark.parametrize("arch,checkpointing", [("swin_debug", "before"), ("swin_debug", "after"),
                                                ("swinv2_debug", "sequential_attention")])
def test_compile_runs_every_block_through_one_graph_per_shape(arch, checkpointing, compile_counters):
    """10 blocks, 3 shapes (stage 0 unshifted / shifted, stage 1): 3 graphs, no block eager, same gradients."""
    reference = deep_debug(arch)
    use_tensor_drop_path_rates(swin_blocks(reference))  # the same draws as the compiled graphs make
    model = copy.deepcopy(reference)
    if checkpointing == "before":  # the engine's order: checkpointing, then compile
        apply_activation_checkpointing(model, "every_k", 2)
    if checkpointing == "sequential_attention":
        apply_sequential_attention(model, [0], 2)
        apply_sequential_attention(reference, [0], 2)
    summary = apply_speedups(model, sdpa_attention=False, compile_blocks=True, backend="aot_eager")
    if checkpointing == "after":
        apply_activation_checkpointing(model, "blocks")
    assert list(model.state_dict()) == list(reference.state_dict())
    x = torch.randn(2, 3, 32, 32)
    torch.manual_seed(1)
    expected, eager_calls = run_counted(reference, x)
    assert eager_calls == 10  # the counter sees blocks that run as Python
    torch.manual_seed(1)
    got, eager_calls = run_counted(model, x)
    assert eager_calls == 0
    assert (summary.blocks, summary.shapes, summary.graphs) == (10, 3, 3)
    assert compile_counters["stats"]["unique_graphs"] == 3 and not compile_counters["graph_break"]
    assert torch._dynamo.config.recompile_limit >= summary.recompile_limit >= 8
    assert "10 Swin blocks -> 3 graphs (3 distinct block shapes), first step 2.5 s" in summary.describe(2.5)
    torch.testing.assert_close(got, expected)
    for (name, p), q in zip(reference.named_parameters(), model.parameters()):
        torch.testing.assert_close(q.grad, p.grad, msg=name)


@pytest.fixture
def deepspeed_checkpointing(monkeypatch):
    """DeepSpeed's checkpointing for one rank, without a process group.

    Only `configure` asks for the rank (to log); a real group would build DeepSpeed's shared
    memory op first, minutes on this CPU.
    """
    import deepspeed
    from deepspeed.runtime.activation_checkpointing import checkpointing

    monkeypatch.setattr(checkpointing.dist, "get_rank", lambda: 0)
    deepspeed.checkpointing.configure(None, partition_activations=False, checkpoint_in_cpu=False)


def test_compile_under_deepspeed_checkpointing(deepspeed_checkpointing, compile_counters):
    """DeepSpeed's (reentrant) checkpoint runs the compiled forward without grad, then recomputes with grad."""
    reference = deep_debug("swin_debug")
    use_tensor_drop_path_rates(swin_blocks(reference))
    model = copy.deepcopy(reference)
    apply_activation_checkpointing(model, "blocks", by_deepspeed=True)
    summary = apply_speedups(model, sdpa_attention=False, compile_blocks=True, backend="aot_eager")
    x = torch.randn(2, 3, 32, 32)
    torch.manual_seed(1)
    expected, _ = run_counted(reference, x)
    torch.manual_seed(1)
    got, eager_calls = run_counted(model, x)
    assert eager_calls == 0
    assert summary.graphs == 2 * summary.shapes == 6  # a no-grad and a grad graph per shape
    assert not compile_counters["graph_break"]
    torch.testing.assert_close(got, expected)
    for (name, p), q in zip(reference.named_parameters(), model.parameters()):
        torch.testing.assert_close(q.grad, p.grad, msg=name)


def test_inductor_compiled_blocks_match_eager_training(compile_counters, monkeypatch):
    """The real backend, train mode with drop path and checkpointing: outputs and gradients as eager."""
    monkeypatch.setattr(torch._inductor.config, "fallback_random", True)  # eager's random draws
    monkeypatch.setattr(torch._inductor.config, "compile_threads", 1)  # no worker pool to start
    torch.manual_seed(0)
    stock = build_backbone("swin_debug", 10, drop_path=0.2).train()
    reference = copy.deepcopy(stock)
    use_tensor_drop_path_rates(swin_blocks(reference))
    model = copy.deepcopy(stock)
    apply_activation_checkpointing(model, "every_k", 2)
    summary = apply_speedups(model, sdpa_attention=False, compile_blocks=True)
    assert list(model.state_dict()) == list(stock.state_dict())
    x = torch.randn(4, 3, 32, 32)
    torch.manual_seed(1)
    expected, _ = run_counted(reference, x)
    torch.manual_seed(1)
    got, eager_calls = run_counted(model, x)
    assert eager_calls == 0 and (summary.blocks, summary.graphs) == (4, 3)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)
    for (name, p), q in zip(reference.named_parameters(), model.parameters()):
        torch.testing.assert_close(q.grad, p.grad, atol=1e-5, rtol=1e-4, msg=name)
