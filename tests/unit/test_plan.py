"""The memory planner agrees with memory measured on CPU and suggests layouts that fit."""

from __future__ import annotations

import re

import pytest

from pretrain.bench.memory import measure
from pretrain.config import Config
from pretrain.plan import activation_bytes
from tests.helpers import plan


@pytest.mark.parametrize("arch,micro", [("swin_debug", 32), ("swin_t", 2)])
@pytest.mark.parametrize("mode", ["none", "every_k", "blocks"])
def test_activation_estimate_matches_measured_peak(arch, micro, mode):
    cfg = Config()
    cfg.model.arch, cfg.model.drop_path = arch, 0.0
    cfg.parallel.activation_checkpointing, cfg.parallel.checkpoint_every_k = mode, 2
    planned = activation_bytes(cfg, 1000, micro) / 2**20
    measured = measure(arch, micro, 0, mode, 2, steps=1, threads=2)["activation_mib"]
    assert planned == pytest.approx(measured, rel=0.25)


def test_a_layout_that_does_not_fit_gets_one_that_does():
    args = ["--config", "configs/swin_b_22k.yaml", "--gpus", "16", "--gpu-mem-gb", "12"]
    first = plan(*args, check=False)
    assert first.returncode == 1 and "does NOT fit" in first.stdout, first.stdout
    suggestion = re.search(r"cheapest layout that fits: .*\n  (--set .*)", first.stdout)
    assert suggestion, first.stdout
    second = plan(*args, *suggestion.group(1).split())
    assert "fits" in second.stdout and "NOT" not in second.stdout


@pytest.mark.parametrize("config,gpus,arch", [("configs/swinv2_g_simmim_22k.yaml", 64, "swinv2_g"),
                                              ("configs/swinv2_g_simmim_22k.yaml", 8, "swinv2_g"),
                                              ("configs/swin_l_22k.yaml", 32, "swin_l"),
                                              ("configs/swin_l_22k.yaml", 8, "swin_l")])
def test_shipped_recipes_fit_on_their_nodes_of_8x80gb(config, gpus, arch):
    """The layouts the recipes name, on one node and on the node counts of their Slurm scripts."""
    out = plan("--config", config, "--gpus", str(gpus), "--gpu-mem-gb", "80").stdout
    assert out.startswith(f"{arch} (") and ": fits" in out, out


def test_plan_reports_config_errors_in_one_line():
    proc = plan("--config", "configs/demo.yaml", "--gpus", "3", "--gpu-mem-gb", "80", check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "config error: batch.global_batch=64 must be a multiple of batch.micro_batch x data-parallel ranks "
        "= 32 x 3 = 96"]


def test_pipeline_and_tensor_parallel_plans_hold_a_share_of_the_model():
    args = ["--config", "configs/swinv2_g_simmim_22k.yaml", "--gpus", "8", "--gpu-mem-gb", "80"]
    whole = plan(*args).stdout
    split = plan(*args, "--set", "parallel.pipeline_stages=2", "--set", "parallel.tensor_parallel=2",
                 "--set", "parallel.pipeline_partition=parameters").stdout
    assert "8 GPUs = 2 data-parallel x 2 pipeline x 2 tensor" in split, split

    def per_rank(out: str, what: str) -> float:
        return float(re.search(rf"{what}\s*([0-9.,]+)", out).group(1).replace(",", ""))

    total = per_rank(whole, r"swinv2_g \(")
    held = per_rank(split, "the most loaded one,")
    # Blocks hold almost all weights and are split 4 ways; stages are balanced by parameters.
    assert total / 4 <= held <= total / 4 * 1.1, split
    assert per_rank(split, "weights") < per_rank(whole, "weights") / 3.5
    assert per_rank(split, "activations") < per_rank(whole, "activations")
