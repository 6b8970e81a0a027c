"""The gradient-dtype measurement behind parallel.grad_accum_dtype / parallel.comm_dtype defaults."""

from __future__ import annotations

import torch

from pretrain.bench.precision import bench_grad_dtypes, running_sum


def test_running_sums_round_in_their_dtype():
    grads = [torch.tensor([1.0], dtype=torch.bfloat16), *[torch.tensor([2.0**-9], dtype=torch.bfloat16)] * 4]
    assert float(running_sum(grads, torch.bfloat16)) == 1.0  # each 2^-9 is below bf16's step at 1.0
    assert float(running_sum(grads, torch.float32)) == 1.0 + 4 * 2.0**-9


def test_bf16_sums_of_real_swin_gradients_lose_more_with_every_addend():
    r = bench_grad_dtypes("swin_debug", 4, [2, 16])
    two, sixteen = r["rows"]
    assert 1e-4 < two["bf16"] < sixteen["bf16"]
    assert sixteen["fp32"] < 1e-6 < two["bf16"] / 100
