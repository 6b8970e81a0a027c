"""Rank discovery from launchers' environments, hostfiles, analytic FLOPs."""

from __future__ import annotations

import pytest

from launch.env import expand_nodelist, rank_environment
from launch.hostfile import hostfile_lines
from pretrain.flops import forward_macs, train_flops_per_image


@pytest.mark.parametrize("nodelist, hosts", [
    ("node[1-2]", ["node1", "node2"]),
    ("gpu[01-03,07],login1", ["gpu01", "gpu02", "gpu03", "gpu07", "login1"]),
    ("a1,b[9-10]", ["a1", "b9", "b10"]),
    ("single", ["single"]),
])
def test_expand_nodelist(nodelist, hosts):
    assert expand_nodelist(nodelist) == hosts


def test_srun_environment_becomes_env_rendezvous():
    env = {"SLURM_STEP_ID": "0", "SLURM_PROCID": "5", "SLURM_LOCALID": "1", "SLURM_NTASKS": "16",
           "SLURM_JOB_NODELIST": "gpu[07-14]", "SLURM_JOB_ID": "4242"}
    assert rank_environment(env) == "slurm"
    assert (env["RANK"], env["LOCAL_RANK"], env["WORLD_SIZE"], env["MASTER_ADDR"]) == ("5", "1", "16", "gpu07")
    assert env["MASTER_PORT"] == str(15000 + 4242)


def test_launcher_variables_win_and_batch_shell_is_not_a_step():
    env = {"RANK": "3", "WORLD_SIZE": "8", "SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_STEP_ID": "0"}
    assert rank_environment(env) == "torchrun/deepspeed" and env["RANK"] == "3"
    batch_shell = {"SLURM_PROCID": "0", "SLURM_NTASKS": "16", "SLURM_JOB_NODELIST": "n[1-2]"}
    assert rank_environment(batch_shell) == "single process" and batch_shell["WORLD_SIZE"] == "1"


def test_hostfile_lines():
    assert hostfile_lines("n[1-2]", 8) == ["n1 slots=8", "n2 slots=8"]


@pytest.mark.parametrize("arch, gmacs", [("swin_t", 4.5), ("swin_s", 8.7), ("swin_b", 15.4), ("swin_l", 34.5)])
def test_flops_match_published_figures(arch, gmacs):
    assert round(forward_macs(arch, num_classes=1000) / 1e9, 1) == gmacs


def test_training_flops_are_three_forwards_of_two_flops_per_mac():
    assert train_flops_per_image("swin_b", num_classes=1000) == pytest.approx(92.6e9, rel=0.01)
    assert forward_macs("swin_b", 384, 12, 1000) / forward_macs("swin_b", 224, 7, 1000) == pytest.approx(3.05, abs=0.05)
