"""Our fused mixed-precision AdamW (bf16 without ZeRO): the same update as AdamW on fp32 weights."""

from __future__ import annotations

import copy

import pytest
import torch

from pretrain.train.mixed_precision import MixedPrecisionAdamW
from pretrain.train.optim import set_lr

CLIP = 1.0


def _bf16_params(seed: int = 0) -> list[torch.nn.Parameter]:
    torch.manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(shape).bfloat16()) for shape in [(64, 32), (32,), (7, 5, 3)]]


def _optimizer(params: list[torch.nn.Parameter]) -> MixedPrecisionAdamW:
    groups = [{"params": params[::2], "weight_decay": 0.05}, {"params": params[1::2], "weight_decay": 0.0}]
    return MixedPrecisionAdamW(groups, lr=1e-2, betas=(0.9, 0.999), eps=1e-8, clip_grad=CLIP)


def _grads(params: list[torch.nn.Parameter], step: int, scale: float = 1.0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(100 + step)
    return [(torch.randn(p.shape, generator=generator) * scale).bfloat16() for p in params]


def test_update_equals_adamw_on_fp32_weights_with_clipping():
    params = _bf16_params()
    ours = _optimizer(params)
    reference_params = [torch.nn.Parameter(p.detach().float()) for p in params]
    reference = torch.optim.AdamW([{"params": reference_params[::2], "weight_decay": 0.05},
                                   {"params": reference_params[1::2], "weight_decay": 0.0}],
                                  lr=1e-2, betas=(0.9, 0.999), eps=1e-8)
    for step, lr in enumerate([1e-2, 5e-3, 2e-3]):
        set_lr(ours, lr)
        set_lr(reference, lr)
        grads = _grads(params, step, scale=3.0)  # norm well above CLIP: clipping is exercised
        for p, r, g in zip(params, reference_params, grads):
            p.grad, r.grad = g.clone(), g.float()
        norm = torch.nn.utils.clip_grad_norm_(reference_params, CLIP)
        reference.step()
        ours.step()
        assert float(ours.skipped) == 0 and float(ours.global_grad_norm) == pytest.approx(float(norm), rel=1e-6)
        assert all(p.grad is None for p in params)
        masters = ours.state_dict()["fp32_groups"]
        for p, r, m in zip(params, reference_params, [masters[0][0], masters[1][0], masters[0][1]]):
            torch.testing.assert_close(m, r.detach(), rtol=1e-6, atol=1e-7)
            assert torch.equal(p.detach(), m.bfloat16())  # the module weights are the rounded masters
        assert any(not torch.equal(p.detach().float(), r.detach()) for p, r in zip(params, reference_params))


def test_non_finite_gradient_skips_the_update_and_keeps_the_state():
    params = _bf16_params()
    ours = _optimizer(params)
    for p, g in zip(params, _grads(params, 0)):
        p.grad = g
    ours.step()
    before = [p.detach().clone() for p in params]
    state_before = {k: v.clone() for k, v in ours.masters.state[ours.masters.param_groups[0]["params"][0]].items()}
    grads = _grads(params, 1)
    grads[1][3] = float("inf")
    for p, g in zip(params, grads):
        p.grad = g
    ours.step()
    assert float(ours.skipped) == 1 and float(ours.global_grad_norm) == float("inf")
    assert not ours.overflow  # DeepSpeed never reads a device value on the host through it
    assert all(torch.equal(p.detach(), b) for p, b in zip(params, before))
    state_after = ours.masters.state[ours.masters.param_groups[0]["params"][0]]
    assert all(torch.equal(state_after[k], v) for k, v in state_before.items())
    assert all(p.grad is None for p in params)


def test_a_flag_from_the_trainer_skips_the_update_on_the_device():
    params = _bf16_params()
    ours = _optimizer(params)
    before = [p.detach().clone() for p in params]
    for p, g in zip(params, _grads(params, 0)):
        p.grad = g
    ours.skip_if = torch.ones(1)  # a loss was not finite on some rank
    ours.step()
    assert float(ours.skipped) == 1 and torch.isfinite(ours.global_grad_norm)
    assert all(torch.equal(p.detach(), b) for p, b in zip(params, before))
    assert all(float(s["step"]) == 0 for s in ours.masters.state.values())  # AdamW's step count rolled back
    ours.skip_if = torch.zeros(1)
    for p, g in zip(params, _grads(params, 1)):
        p.grad = g
    ours.step()
    assert float(ours.skipped) == 0 and any(not torch.equal(p.detach(), b) for p, b in zip(params, before))


@pytest.mark.parametrize("accumulate_fp32", [True, False])
def test_gradients_of_many_micro_batches_accumulate_in_the_chosen_dtype(accumulate_fp32):
    torch.manual_seed(0)
    weight = torch.nn.Parameter(torch.randn(256, 64).bfloat16())
    ours = MixedPrecisionAdamW([{"params": [weight]}], 1e-3, (0.9, 0.999), 1e-8, 0.0, accumulate_fp32=accumulate_fp32)
    inputs = [torch.randn(8, 256).bfloat16() for _ in range(16)]
    for x in inputs:
        (x @ weight).float().sum().backward()  # each micro-batch's bf16 gradient
    exact = sum((x.float().t() @ torch.ones(8, 64)).bfloat16().float() for x in inputs)
    held = ours.masters.param_groups[0]["params"][0].grad if accumulate_fp32 else weight.grad.float()
    error = (held - exact).abs().max() / exact.abs().max()
    if accumulate_fp32:
        assert weight.grad is None and error < 1e-6  # summed in fp32 as each gradient arrived
    else:
        assert error > 1e-4  # bf16 sums lose digits with every micro-batch


def test_state_dict_resumes_the_same_trajectory():
    params = _bf16_params()
    ours = _optimizer(params)
    for step in range(2):
        for p, g in zip(params, _grads(params, step)):
            p.grad = g
        ours.step()
    saved = copy.deepcopy(ours.state_dict())  # as written to and read from a checkpoint file
    resumed_params = _bf16_params(seed=1)  # other weights: loading must restore module weights too
    resumed = _optimizer(resumed_params)
    resumed.load_state_dict(saved)
    for optimizer, ps in ((ours, params), (resumed, resumed_params)):
        for p, g in zip(ps, _grads(ps, 2)):
            p.grad = g
        optimizer.step()
    assert all(torch.equal(a.detach(), b.detach()) for a, b in zip(params, resumed_params))
    for a, b in zip(ours.state_dict()["fp32_groups"], resumed.state_dict()["fp32_groups"]):
        assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_refuses_other_states_and_dtypes():
    params = _bf16_params()
    ours = _optimizer(params)
    with pytest.raises(ValueError, match="was not saved by MixedPrecisionAdamW"):
        ours.load_state_dict({"state": {}, "param_groups": []})
    fewer = _optimizer(params[:2]).state_dict()
    with pytest.raises(ValueError, match="holds 2 fp32 master tensors, this model trains 3"):
        ours.load_state_dict(fewer)
    with pytest.raises(ValueError, match="updates bf16 parameters"):
        MixedPrecisionAdamW([{"params": [torch.nn.Parameter(torch.zeros(3))]}], 1e-3, (0.9, 0.999), 1e-8, 1.0)
