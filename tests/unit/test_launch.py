"""Rank discovery from launchers' environments, GPU choice, ports, the Slurm job body's srun
line, hostfiles."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from launch.env import (
    LaunchError,
    expand_nodelist,
    expand_tasks_per_node,
    gpus_per_node,
    local_world_size,
    master_port,
    pick_cuda_device,
    rank_environment,
)
from launch.hostfile import hostfile_lines
from tests.helpers import REPO, cpu_env


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
    assert env["MASTER_PORT"] == str(master_port(4242, 0))
    assert "LOCAL_WORLD_SIZE" not in env  # no tasks-per-node variable: unknown, not guessed


EPHEMERAL = range(32768, 61000)  # Linux's default net.ipv4.ip_local_port_range


def test_master_ports_avoid_ephemeral_range_and_differ_per_step():
    for job in range(0, 2_000_000, 997):
        ports = [master_port(job, step) for step in range(64)]
        assert all(1024 < p < 65536 and p not in EPHEMERAL for p in ports), job
        assert len(set(ports)) == len(ports), f"steps of job {job} share a port"
    # Side-by-side steps of neighbouring jobs (job arrays) stay apart too.
    neighbours = {master_port(job, step) for job in range(1000, 1100) for step in range(8)}
    assert len(neighbours) == 100 * 8


def test_steps_of_one_job_rendezvous_on_different_ports():
    ports = set()
    for step in ("0", "1", "2"):
        env = {"SLURM_STEP_ID": step, "SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_JOB_NODELIST": "n1",
               "SLURM_JOB_ID": "77777"}
        rank_environment(env)
        ports.add(env["MASTER_PORT"])
    assert len(ports) == 3


@pytest.mark.parametrize("spec, counts", [("8", [8]), ("4(x2),3", [4, 4, 3]), ("2(x3)", [2, 2, 2]), ("1,2", [1, 2])])
def test_expand_tasks_per_node(spec, counts):
    assert expand_tasks_per_node(spec) == counts


def test_unreadable_tasks_per_node_names_the_value():
    with pytest.raises(LaunchError, match=r"'4x2'"):
        expand_tasks_per_node("4x2")


@pytest.mark.parametrize("env, local", [
    ({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_WORLD_SIZE": "4"}, 4),  # torchrun
    ({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_SIZE": "2"}, 2),  # deepspeed launcher
    ({"RANK": "3", "WORLD_SIZE": "8"}, None),  # a launcher that does not say
    ({"SLURM_STEP_ID": "0", "SLURM_PROCID": "9", "SLURM_NTASKS": "11", "SLURM_NODEID": "2",
      "SLURM_STEP_TASKS_PER_NODE": "4(x2),3", "SLURM_TASKS_PER_NODE": "8(x2)"}, 3),  # the step's count wins
    ({"SLURM_STEP_ID": "0", "SLURM_PROCID": "0", "SLURM_NTASKS": "16", "SLURM_TASKS_PER_NODE": "8(x2)"}, 8),
    ({"SLURM_PROCID": "0", "SLURM_NTASKS": "16", "SLURM_TASKS_PER_NODE": "8(x2)"}, 1),  # batch shell: one process
    ({}, 1),
])
def test_local_world_size(env, local):
    assert local_world_size(env) == local
    rank_environment(env)
    assert env.get("LOCAL_WORLD_SIZE") == (None if local is None else str(local))


def test_gpus_per_node_prefers_slurms_count_over_what_one_task_sees():
    assert gpus_per_node(1, {"SLURM_GPUS_ON_NODE": "8"}) == 8  # one GPU bound to each task
    assert gpus_per_node(4, {}) == 4
    assert gpus_per_node(2, {"SLURM_GPUS_ON_NODE": ""}) == 2


@pytest.mark.parametrize("local_rank, visible, local_world, device", [
    (0, 8, 8, 0), (5, 8, 8, 5), (5, 8, None, 5),
    (5, 1, 8, 0),  # srun --gpus-per-task=1 / one GPU per container: device 0 whatever LOCAL_RANK
    (1, 4, 2, 1),  # fewer ranks than GPUs
])
def test_pick_cuda_device(local_rank, visible, local_world, device):
    assert pick_cuda_device(local_rank, visible, local_world) == device


@pytest.mark.parametrize("local_rank, visible, local_world, message", [
    (5, 4, 8, r"^LOCAL_RANK 5 of 8 ranks on this node, but the process sees 4 GPUs \(CUDA_VISIBLE_DEVICES '0,1,2,3'\)"),
    # Every rank of an oversubscribed node fails, not only those past the last GPU.
    (0, 4, 8, r"^LOCAL_RANK 0 of 8 ranks on this node, but the process sees 4 GPUs"),
    (4, 4, None, r"^LOCAL_RANK 4 of \? ranks"),
    (0, 0, 1, r"^LOCAL_RANK 0: this process sees no GPU \(CUDA_VISIBLE_DEVICES '0,1,2,3'\)"),
])
def test_more_ranks_than_gpus_is_one_line_naming_rank_count_and_devices(local_rank, visible, local_world, message):
    with pytest.raises(LaunchError, match=message) as info:
        pick_cuda_device(local_rank, visible, local_world, "0,1,2,3")
    assert "\n" not in str(info.value)


def _job_body(tmp_path: Path, extra_env: dict[str, str], task_plugin: str) -> tuple[list[str], dict[str, str]]:
    """Run launch/slurm_job.sh with stand-ins for srun and scontrol; return srun's arguments and its environment."""
    stubs = tmp_path / "bin"
    stubs.mkdir()
    (stubs / "srun").write_text(f'#!/bin/bash\nprintf "%s\\n" "$@" > {tmp_path}/srun.args\n'
                                f'env > {tmp_path}/srun.env\n')
    (stubs / "scontrol").write_text('#!/bin/bash\n[ "$1 $2" = "show config" ] && '
                                    f'echo "TaskPlugin              = {task_plugin}"\nexit 0\n')
    for stub in stubs.iterdir():
        stub.chmod(0o755)
    env = {k: v for k, v in cpu_env().items() if not k.startswith(("SLURM_", "OMP_"))}  # no job of our own
    env.update(PATH=f"{stubs}{os.pathsep}{env['PATH']}", SLURM_SUBMIT_DIR=str(REPO), SLURM_JOB_ID="12",
               PYTHON=str(REPO / ".venv" / "bin" / "python"), **extra_env)
    proc = subprocess.run(["bash", "launch/slurm_job.sh", "configs/demo.yaml", "--set", f"run.output_dir={tmp_path}"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    environ = dict(line.split("=", 1) for line in (tmp_path / "srun.env").read_text().splitlines() if "=" in line)
    return (tmp_path / "srun.args").read_text().splitlines(), environ


def test_job_body_hands_the_jobs_cpus_to_srun_and_binds_cores(tmp_path):
    args, environ = _job_body(tmp_path, {"SLURM_CPUS_PER_TASK": "12"}, "task/affinity,task/cgroup")
    options = args[:args.index("bash")]
    assert options == ["--kill-on-bad-exit=1", "--cpus-per-task=12", "--cpu-bind=cores", "--distribution=block:block"]
    assert args[args.index("task") + 1:][:4] == [str(REPO / ".venv/bin/python"), "pretrain/main.py", "--config",
                                                 "configs/demo.yaml"]
    assert environ["OMP_NUM_THREADS"] == "12"
    assert not any(a.startswith("--gpu") for a in args)  # every task sees the node's GPUs (NVLink between them)


def test_job_body_without_cpus_per_task_or_binding_support(tmp_path):
    args, environ = _job_body(tmp_path, {}, "task/none")
    assert args[:args.index("bash")] == ["--kill-on-bad-exit=1"]
    assert "OMP_NUM_THREADS" not in environ


def test_launcher_variables_win_and_batch_shell_is_not_a_step():
    env = {"RANK": "3", "WORLD_SIZE": "8", "SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_STEP_ID": "0"}
    assert rank_environment(env) == "torchrun/deepspeed" and env["RANK"] == "3"
    batch_shell = {"SLURM_PROCID": "0", "SLURM_NTASKS": "16", "SLURM_JOB_NODELIST": "n[1-2]"}
    assert rank_environment(batch_shell) == "single process" and batch_shell["WORLD_SIZE"] == "1"


def test_hostfile_lines():
    assert hostfile_lines("n[1-2]", 8) == ["n1 slots=8", "n2 slots=8"]
