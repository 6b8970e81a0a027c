"""The GPU check: its clean refusal on a CPU machine, and the parts of it that need no GPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from launch import gpu_check
from launch.gpu_report import (Budget, Check, Failed, bench_line, bench_numbers, child_env, compare_losses,
                               deepspeed_launcher, number_before, report_path, run_command, summary_lines, sweep)
from tests.helpers import REPO

cpu_only = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU: the check would run")


@cpu_only
@pytest.mark.parametrize("python", [None, sys.executable])
def test_without_a_gpu_the_check_refuses_in_one_line(python):
    env = {k: v for k, v in os.environ.items() if k != "PYTHON"}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    if python:
        env["PYTHON"] = python
    proc = subprocess.run(["bash", "launch/gpu_check.sh"], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert proc.stderr.strip() == gpu_check.NO_GPU  # one line, no traceback


def test_the_make_target_runs_the_script():
    makefile = (REPO / "Makefile").read_text()
    assert "gpu-check:\n\tbash launch/gpu_check.sh $(ARGS)" in makefile
    assert "launch.gpu_check pins pure" in makefile and "launch.gpu_check pins compiled" in makefile


class FakeClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_the_budget_grants_what_is_wanted_then_what_is_left_then_nothing():
    clock = FakeClock()
    budget = Budget(300, clock)
    assert budget.grant(90, 40) == 90
    clock.now += 240
    assert budget.left() == 60 and budget.grant(90, 40) == 60
    clock.now += 25
    assert budget.grant(90, 40) is None and budget.grant(90, 30) == 35


def test_the_sweep_stops_at_the_first_oom_and_picks_the_fastest_micro_batch():
    asked = []

    def measure(micro: int) -> tuple[str, dict]:
        asked.append(micro)
        if micro >= 128:
            return "oom", {"reason": "exit code 1 (CUDA out of memory)"}
        return "ok", {"images_per_s": {16: 50.0, 32: 90.0, 64: 80.0}[micro]}

    rows, best = sweep((16, 32, 64, 128, 256), measure)
    assert asked == [16, 32, 64, 128]  # 256 is not tried once 128 ran out of memory
    assert [r["status"] for r in rows] == ["ok", "ok", "ok", "oom"]
    assert best == 32


def test_a_sweep_whose_first_point_fails_has_no_best():
    rows, best = sweep((32, 64), lambda micro: ("failed", {"reason": "exit code 1"}))
    assert best is None and rows == [{"micro_batch": 32, "status": "failed", "reason": "exit code 1"}]


def test_losses_are_compared_step_by_step_within_a_tolerance():
    reference = {1: 2.0, 2: 1.5}
    assert compare_losses({1: 2.001, 2: 1.499}, reference, 1e-2) == []
    assert compare_losses({1: 2.1, 2: 1.5}, reference, 1e-2) == ["step 1: 2.1 vs 2"]
    assert compare_losses({1: 2.0}, reference, 1e-2) == ["step 2: None vs 1.5"]
    assert compare_losses({1: 2.0}, {}, 1e-2) == ["the reference run logged no losses"]


def bench_result(ours_ips: float, ref_ips: float, cuda: bool) -> dict:
    def side(ips: float) -> dict:
        return {"images_per_s": ips, "step_s": [0.1, 0.1, 0.1], "mfu": 0.3, "mfu_datasheet": 0.25 if cuda else None,
                "peak_allocated_gib": 12.5 if cuda else None, "max_reserved_gib": 14.0 if cuda else None,
                "tflops": 1.0, "held_gib": 2.0}
    return {"ours": side(ours_ips), "reference": side(ref_ips), "ratio": ours_ips / ref_ips,
            "ratio_min_median_max": [0.9 * ours_ips / ref_ips, ours_ips / ref_ips, 1.1 * ours_ips / ref_ips],
            "peak_tflops": 700.0, "datasheet_peak_tflops": 989.0 if cuda else None, "pairs": []}


def test_bench_results_keep_both_sides_and_read_as_one_line():
    numbers = bench_numbers(bench_result(300.0, 200.0, cuda=True))
    assert numbers["images_per_s"] == 300.0 and numbers["ratio"] == 1.5 and "pairs" not in numbers
    assert numbers["ours"]["peak_allocated_gib"] == 12.5 and numbers["reference"]["images_per_s"] == 200.0
    line = bench_line(numbers)
    assert line == ("ours 300 img/s (MFU 25.0% of the datasheet peak), 12.5 GiB allocated / 14.0 GiB reserved; "
                    "reference 200 img/s; ours / reference 1.50x (1.35-1.65)")
    assert "measured peak" in bench_line(bench_numbers(bench_result(3.0, 3.0, cuda=False)))


def test_a_command_past_its_timeout_is_stopped_with_its_children():
    start = time.monotonic()
    proc = run_command(["bash", "-c", "echo started; sleep 60 & echo $!; wait"], 2, child_env())
    assert proc.timed_out and time.monotonic() - start < 15
    lines = proc.output.split()
    assert lines[0] == "started"
    stat = Path(f"/proc/{lines[1]}/stat")

    def gone() -> bool:  # killed: no longer there, or a zombie waiting for its reaper
        try:
            return stat.read_text().split(") ")[1][0] == "Z"
        except FileNotFoundError:
            return True

    deadline = time.monotonic() + 10  # SIGKILL is delivered at once, but a busy machine may not run the exit yet
    while not gone() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert gone(), "the background sleep outlived the timeout"


def test_a_command_that_exits_but_leaves_a_child_counts_as_finished():
    proc = run_command(["bash", "-c", "sleep 60 & echo done; exit 3"], 2, child_env())
    assert (proc.rc, proc.output.strip(), proc.timed_out) == (3, "done", False)


def test_children_get_no_cpu_accelerator_and_the_repository_on_their_path(monkeypatch):
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    monkeypatch.setenv("RANK", "3")
    env = child_env()
    assert "DS_ACCELERATOR" not in env and "RANK" not in env
    assert str(REPO) in env["PYTHONPATH"].split(os.pathsep) and env["PYTHONUNBUFFERED"] == "1"


def test_the_launcher_is_the_script_beside_the_interpreter_else_its_module(tmp_path):
    python = tmp_path / "python3"
    assert deepspeed_launcher(str(python)) == [str(python), "-m", "deepspeed.launcher.runner"]
    (tmp_path / "deepspeed").write_text("#!/bin/sh\n")
    assert deepspeed_launcher(str(python)) == [str(tmp_path / "deepspeed")]


def test_the_report_goes_to_out_when_set(monkeypatch, tmp_path):
    monkeypatch.setenv("OUT", str(tmp_path))
    assert report_path(None) == tmp_path / "gpu_check.json"
    assert report_path("x/r.json") == Path("x/r.json")
    monkeypatch.delenv("OUT")
    assert report_path(None) == REPO / "runs" / "gpu_check.json"


def test_one_failing_sub_check_does_not_stop_the_others(tmp_path):
    runner = gpu_check.Runner(Budget(1000), tmp_path / "gpu_check.json")

    def fails(timeout: float) -> dict:
        raise Failed("exit code 1", "\n".join(f"line {i}" for i in range(50)))

    def breaks(timeout: float) -> dict:
        raise KeyError("gpus")

    runner.attempt("shards", "shards", fails)
    runner.attempt("train_zero2", "train", lambda t: {"summary": "never"}, needs=("shards",))
    runner.attempt("plan", "plan", breaks)
    runner.attempt("environment", "environment", lambda t: {"summary": f"ran with {t:.0f} s"})
    runner.budget = Budget(30)
    runner.attempt("bench_swin_b_sweep", "bench", lambda t: {"summary": "never"})
    statuses = {c.name: (c.status, c.reason) for c in runner.checks}
    assert statuses["shards"] == ("fail", "exit code 1")
    assert statuses["train_zero2"] == ("skip", "needs shards to pass first")
    assert statuses["plan"] == ("fail", "KeyError: 'gpus'")
    assert statuses["environment"] == ("pass", "")
    assert statuses["bench_swin_b_sweep"][0] == "skip" and "not enough time left" in statuses["bench_swin_b_sweep"][1]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["passed"] is False and report["failed"] == ["shards", "plan"]
    shards = report["checks"][0]
    assert shards["tail"] == [f"line {i}" for i in range(20, 50)]  # the last lines of the output
    assert report["checks"][3]["detail"]["summary"] == "ran with 60 s"  # its timeout


def test_a_failing_command_is_logged_and_named_out_of_memory(tmp_path):
    runner = gpu_check.Runner(Budget(1000), tmp_path / "r.json")
    with pytest.raises(Failed, match=r"^exit code 1: CUDA out of memory$"):
        runner.execute([sys.executable, "-c", "print('torch.OutOfMemoryError: CUDA out of memory'); exit(1)"], 30)
    assert "CUDA out of memory" in (tmp_path / "r.log").read_text()
    with pytest.raises(Failed, match=r"^exit code 2: config error: batch.micro_batch must be > 0$"):
        runner.execute([sys.executable, "-c", "print('starting'); print('config error: batch.micro_batch must be > 0')"
                        "; print('[2026-12-01 10:56:16,693] [ERROR] [launch.py:259:sigkill_handler] exits with 2')"
                        "; exit(2)"], 30)


def test_only_selects_sub_checks_by_prefix_but_always_reads_the_environment(tmp_path):
    runner = gpu_check.Runner(Budget(1000), tmp_path / "r.json", only=("bench",))
    for name in ("environment", "train_zero2", "bench_swin_l_sweep"):
        runner.attempt(name, "bench", lambda t: {"summary": "ran"})
    assert [(c.name, c.status) for c in runner.checks] == [("environment", "pass"), ("train_zero2", "skip"),
                                                            ("bench_swin_l_sweep", "pass")]


def test_the_summary_has_one_line_per_sub_check_and_the_counts():
    checks = [Check("environment", "pass", 1.0, detail={"summary": "1 x NVIDIA H200"}),
              Check("mp_tensor2", "skip", reason="needs 2 GPUs, 1 visible"), Check("plan", "fail", 3.2, reason="x")]
    lines = summary_lines(checks)
    assert lines[0].startswith("PASS  environment") and lines[0].endswith("1 x NVIDIA H200")
    assert lines[1].startswith("SKIP  mp_tensor2") and lines[1].endswith("needs 2 GPUs, 1 visible")
    assert lines[-1] == "gpu-check: 1 passed, 1 failed, 1 skipped"


def test_the_wheels_are_the_project_pins_and_deepspeeds_needs():
    pure, compiled = gpu_check.pins("pure"), gpu_check.pins("compiled")
    pyproject = (REPO / "pyproject.toml").read_text()
    for pin in ("deepspeed==", "webdataset==", "fairscale==", "braceexpand==", "timm=="):
        wheel = next(w for w in pure if w.startswith(pin))
        assert f'"{wheel}"' in pyproject
    assert any(w.startswith("hjson==") for w in pure) and any(w.startswith("pydantic==") for w in pure)
    assert sorted(w.split("==")[0] for w in compiled) == ["pydantic-core", "simplejpeg"]
    assert not any(w.startswith("torch") for w in pure + compiled)


def test_the_plan_line_is_read_with_and_without_reserved_memory():
    gpu = "one rank here: planned 20.136 GB, measured 18.241 GB allocated, 21.500 GB reserved (plan / reserved 0.94)"
    cpu = "one rank here: planned 0.136 GB, measured 0.241 GB allocated (plan / measured 0.57)"
    assert [number_before(gpu, *around) for around in PLAN_NUMBERS] == [20.136, 18.241, 21.5]
    assert [number_before(cpu, *around) for around in PLAN_NUMBERS] == [0.136, 0.241, None]


PLAN_NUMBERS = (("planned ", " GB"), ("measured ", " GB"), (", ", " GB reserved"))


def test_the_bench_sweep_records_an_oom_and_the_compiled_run_uses_the_best_micro_batch(tmp_path, monkeypatch):
    runner = gpu_check.Runner(Budget(1000), tmp_path / "r.json")
    calls = []

    def bench(arch: str, micro: int, timeout: float, *flags: str) -> dict:
        calls.append((arch, micro, flags))
        if micro == 128:
            raise Failed("exit code 1: CUDA out of memory", "torch.OutOfMemoryError: CUDA out of memory.")
        return bench_numbers(bench_result({32: 400.0, 64: 500.0}[micro] * (1.5 if flags else 1), 250.0, cuda=True))

    monkeypatch.setattr(runner, "bench", bench)
    runner.attempt("bench_swin_b_sweep", "bench", lambda t: runner.bench_sweep("swin_b", t))
    runner.attempt("bench_swin_b_compile", "bench_compile", lambda t: runner.bench_compiled("swin_b", t),
                   needs=("bench_swin_b_sweep",))
    sweep_check, compiled = runner.checks
    assert [(r["micro_batch"], r["status"]) for r in sweep_check.detail["sweep"]] == [(32, "ok"), (64, "ok"),
                                                                                      (128, "oom")]
    assert sweep_check.status == "pass" and sweep_check.detail["best_micro_batch"] == 64
    assert calls[-1] == ("swin_b", 64, ("--compile",))
    assert compiled.status == "pass" and compiled.detail["compile_over_eager"] == pytest.approx(1.5)
