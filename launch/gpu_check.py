"""One-command GPU check (`make gpu-check`, i.e. `bash launch/gpu_check.sh`).

On one machine with NVIDIA GPUs, inside one time budget (default 450 s), each sub-check with
its own timeout, later ones skipped (and reported so) once the budget cannot hold them:
  environment   device names and memory; torch / CUDA / NCCL / DeepSpeed / timm versions
  shards        the digits demo as shards (runs/gpu_check/shards)
  train_zero2   `deepspeed --num_gpus 1 pretrain/main.py --config configs/demo.yaml`, bf16,
                ZeRO-2, every block checkpointed, SDPA attention, compiled blocks
  resume_zero2  the same run to a higher total_steps: must print "resumed from step"
  export, evaluate   `python -m pretrain.export`, held-out top-1 from `python -m pretrain.evaluate`
  train_zero0   as train_zero2 with ZeRO-0, losses compared with it
  mp_*          (2+ GPUs) fp32 runs on 2 ranks over NCCL: data-parallel ZeRO-1 and ZeRO-2,
                tensor_parallel=2, pipeline_stages=2, losses compared with their plain run
  plan          `python -m pretrain.bench plan --config configs/swin_b_22k.yaml`: planned vs measured
  bench_*       `python -m pretrain.bench step` for swin_b and swin_l at 224 px: a micro-batch
                sweep (32, 64, 128, stopping at OOM) without compile, then the best one compiled

    python -m launch.gpu_check run [--budget-s 450] [--only train,bench] [--report PATH]
    python -m launch.gpu_check preflight | probe | pins pure|compiled

The JSON report goes to --report, else $OUT/gpu_check.json when OUT is set, else
runs/gpu_check.json (written after every sub-check); the full command output to gpu_check.log
beside it. Exit code 0 when nothing failed, 1 when a sub-check failed, 2 when it cannot run here.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import sys
import time
import tomllib
from dataclasses import asdict
from importlib import metadata
from pathlib import Path
from typing import Callable

from launch.env import free_port
from launch.gpu_report import (REPO, Budget, Check, Failed, Proc, bench_line, bench_numbers, child_env, compare_losses,
                               deepspeed_launcher, error_line, is_oom, last_json, losses, number_before,
                               report_path, run_command, summary_lines, sweep, tail, train_records)

WORK = REPO / "runs" / "gpu_check"
SHARDS = WORK / "shards"
NO_GPU = ("gpu-check: no CUDA device visible (torch.cuda.is_available() is False); "
          "run it on a machine with an NVIDIA GPU")
GIB = 2**30
PACKAGES = ("torch", "deepspeed", "timm", "webdataset", "fairscale", "simplejpeg", "safetensors", "tensorboard",
            "pydantic", "numpy", "pillow", "triton")
# Wheels `make gpu-wheels` builds: the project's own pins, and DeepSpeed's needs that a CUDA
# image may lack, at the versions installed here; compiled ones are fetched for the GPU's Python.
PROJECT_WHEELS = ("deepspeed", "webdataset", "fairscale", "simplejpeg", "braceexpand", "timm")
DEEPSPEED_NEEDS = ("hjson", "pydantic", "pydantic-core", "annotated-types", "typing-inspection", "typing-extensions")
COMPILED_WHEELS = ("simplejpeg", "pydantic-core")

DEMO_GPU = ["precision=bf16", "parallel.activation_checkpointing=blocks", "speed.sdpa_attention=true",
            "speed.compile=true"]
ENTRY_STEPS, RESUME_STEPS = 150, 300
MIN_TOP1 = 0.3  # ten digit classes: three times chance after 300 steps
MP_COMMON = ["precision=fp32", "parallel.zero_stage=1", "model.drop_path=0", "batch.micro_batch=16",
             "batch.global_batch=32", "schedule.total_steps=6", "schedule.warmup_steps=1", "log.every_steps=1"]
# name -> (ranks, overrides, the run whose losses it must match)
MP_RUNS = {
    "mp_single": (1, [], None),
    "mp_tensor2": (2, ["parallel.tensor_parallel=2"], "mp_single"),
    "mp_pipeline2": (2, ["parallel.pipeline_stages=2"], "mp_single"),
    "mp_data2_zero1": (2, [], None),
    "mp_data2_zero2": (2, ["parallel.zero_stage=2"], "mp_data2_zero1"),
}
MP_RTOL = 1e-2  # fp32 on GPUs: reduction order and cuDNN's TF32 convolutions differ between layouts
SWEEP_MICRO_BATCHES = (32, 64, 128)
BENCH_ARCHS = ("swin_b", "swin_l")
BENCH_STEPS = ["--img-size", "224", "--warmup", "3", "--steps", "10", "--json"]
# (wanted timeout, least worth starting with) in seconds, per kind of sub-check
TIMEOUTS = {"environment": (60, 20), "shards": (90, 30), "train": (200, 60), "resume": (120, 45),
            "export": (60, 20), "evaluate": (60, 20), "mp": (90, 40), "plan": (120, 45),
            "bench": (90, 40), "bench_compile": (240, 90)}


class Runner:
    """Runs the sub-checks in order inside the budget; records, prints and reports each."""

    def __init__(self, budget: Budget, report: Path, only: tuple[str, ...] = ()):
        self.budget, self.report, self.only = budget, report, only
        self.python, self.env = sys.executable, child_env()
        self.checks: list[Check] = []
        self.environment: dict = {}
        self.best: dict[str, int] = {}
        self.command = ""  # the current sub-check's commands
        self.log = report.with_suffix(".log")
        self.report.parent.mkdir(parents=True, exist_ok=True)
        self.log.write_text("")

    # -- running one sub-check --------------------------------------------------------------

    def status_of(self, name: str) -> str | None:
        return next((c.status for c in self.checks if c.name == name), None)

    def attempt(self, name: str, kind: str, body: Callable[[float], dict], needs: tuple[str, ...] = ()) -> Check:
        """Run `body(timeout_s)` as sub-check `name` unless filtered out, blocked or out of time."""
        if self.only and name != "environment" and not name.startswith(self.only):
            return self._record(Check(name, "skip", reason="not selected (--only)"))
        blocked = [n for n in needs if self.status_of(n) != "pass"]
        if blocked:
            return self._record(Check(name, "skip", reason=f"needs {', '.join(blocked)} to pass first"))
        wanted, least = TIMEOUTS[kind]
        timeout = self.budget.grant(wanted, least)
        if timeout is None:
            return self._record(Check(name, "skip", reason=f"not enough time left ({self.budget.left():.0f} s of "
                                                           f"the {self.budget.total_s:.0f} s budget)"))
        print(f"[{self.budget.total_s - self.budget.left():5.0f} s] {name} (timeout {timeout:.0f} s) ...", flush=True)
        start = time.monotonic()
        self.command = ""
        try:
            check = Check(name, "pass", detail=body(timeout))
        except Failed as e:
            check = Check(name, "fail", reason=e.reason, tail=tail(e.output))
        except Exception as e:  # noqa: BLE001  (one sub-check's bug must not stop the others)
            check = Check(name, "fail", reason=f"{type(e).__name__}: {e}")
        check.wall_s, check.command = round(time.monotonic() - start, 1), self.command
        return self._record(check)

    def _record(self, check: Check) -> Check:
        self.checks.append(check)
        print(summary_lines([check])[0], flush=True)
        self.write_report()
        return check

    def execute(self, cmd: list[str], timeout: float, ok: tuple[int, ...] = (0,)) -> Proc:
        """Run one command of the current sub-check; raise Failed on timeout or an exit code not in `ok`."""
        line = " ".join(cmd)
        self.command = f"{self.command} && {line}" if self.command else line
        proc = run_command(cmd, timeout, self.env)
        with self.log.open("a") as f:
            f.write(f"\n===== {line}\n{proc.output}")
        if proc.timed_out:
            raise Failed(f"timed out after {timeout:.0f} s", proc.output)
        if proc.rc not in ok:
            why = "CUDA out of memory" if is_oom(proc.output) else error_line(proc.output)
            raise Failed(f"exit code {proc.rc}" + (f": {why}" if why else ""), proc.output)
        return proc

    def report_dict(self) -> dict:
        failed = [c.name for c in self.checks if c.status == "fail"]
        return {"report": "gpu_check", "passed": not failed, "failed": failed, "budget_s": self.budget.total_s,
                "wall_s": round(self.budget.total_s - self.budget.left(), 1), "environment": self.environment,
                "checks": [asdict(c) for c in self.checks]}

    def write_report(self) -> None:
        self.report.write_text(json.dumps(self.report_dict(), indent=1) + "\n")

    # -- the sub-checks ---------------------------------------------------------------------

    def run_all(self) -> int:
        self.attempt("environment", "environment", self.environment_check)
        self.attempt("shards", "shards", self.shards)
        self.attempt("train_zero2", "train", lambda t: self.train("zero2", ENTRY_STEPS, ["parallel.zero_stage=2"], t),
                     needs=("shards",))
        self.attempt("resume_zero2", "resume", self.resume, needs=("train_zero2",))
        self.attempt("export", "export", self.export, needs=("resume_zero2",))
        self.attempt("evaluate", "evaluate", self.evaluate, needs=("export",))
        self.attempt("train_zero0", "train", lambda t: self.train("zero0", ENTRY_STEPS, ["parallel.zero_stage=0"], t),
                     needs=("shards",))
        gpus = len(self.environment.get("gpus", []))
        for name, (_, _, reference) in MP_RUNS.items():
            if gpus < 2:
                self._record(Check(name, "skip", reason=f"needs 2 GPUs, {gpus} visible"))
                continue
            needs = ("shards",) + ((reference,) if reference else ())
            self.attempt(name, "mp", lambda t, n=name: self.model_parallel(n, t), needs=needs)
        self.attempt("plan", "plan", self.plan)
        for arch in BENCH_ARCHS:
            self.attempt(f"bench_{arch}_sweep", "bench", lambda t, a=arch: self.bench_sweep(a, t))
            self.attempt(f"bench_{arch}_compile", "bench_compile", lambda t, a=arch: self.bench_compiled(a, t),
                         needs=(f"bench_{arch}_sweep",))
        print(json.dumps(self.report_dict()))
        print("\n".join(["", *summary_lines(self.checks), f"report: {self.report}  log: {self.log}"]))
        return 1 if any(c.status == "fail" for c in self.checks) else 0

    def environment_check(self, timeout: float) -> dict:
        proc = self.execute([self.python, "-m", "launch.gpu_check", "probe"], timeout)
        self.environment = last_json(proc.output)
        env = self.environment
        gpus = env["gpus"]
        if env["deepspeed_import"] != "ok":
            raise Failed(f"deepspeed does not import: {env['deepspeed_import']}", proc.output)
        names = ", ".join(f"{g['name']} ({g['memory_gib']:.0f} GiB)" for g in gpus) or "no GPU"
        return {"summary": f"{len(gpus)}: {names}; torch {env['torch']}, CUDA {env['cuda']}, NCCL {env['nccl']}, "
                           f"DeepSpeed {env['packages']['deepspeed']}, timm {env['packages']['timm']}"}

    def shards(self, timeout: float) -> dict:
        if not (SHARDS / "dataset.json").exists():
            deadline = time.monotonic() + timeout
            self.execute([self.python, "-m", "pretrain.data.digits", "--out", str(WORK / "images")], timeout)
            self.execute([self.python, "-m", "pretrain.data.write_shards", "--src", str(WORK / "images"), "--out",
                          str(SHARDS), "--shard-samples", "100"], max(1.0, deadline - time.monotonic()))
        info = json.loads((SHARDS / "dataset.json").read_text())
        samples = {split: v["samples"] for split, v in info["splits"].items()}
        return {"summary": f"digits shards at {SHARDS}: {samples}", "samples": samples}

    def train_command(self, name: str, ranks: int, sets: list[str]) -> list[str]:
        sets = [f"run.output_dir={WORK}", f"run.name={name}", f"data.root={SHARDS}", "data.workers=2",
                "eval.every_steps=0", "checkpoint.every_steps=100000", *sets]
        return (deepspeed_launcher(self.python) + ["--num_gpus", str(ranks), "--master_port", str(free_port()),
                                                   "pretrain/main.py", "--config", "configs/demo.yaml"]
                + [a for s in sets for a in ("--set", s)])

    def demo_sets(self, steps: int, extra: list[str]) -> list[str]:
        return [f"schedule.total_steps={steps}", "schedule.warmup_steps=20", "log.every_steps=10",
                "batch.micro_batch=64", "batch.global_batch=64", *DEMO_GPU, *extra]

    def train(self, name: str, steps: int, extra: list[str], timeout: float) -> dict:
        shutil.rmtree(WORK / name, ignore_errors=True)
        self.execute(self.train_command(name, 1, self.demo_sets(steps, extra)), timeout)
        detail = self.training_detail(WORK / name)
        if name != "zero2" and self.status_of("train_zero2") == "pass":
            ours, theirs = losses(WORK / name), losses(WORK / "zero2")
            detail["first_loss_vs_zero2"] = [ours.get(10), theirs.get(10)]
        return detail

    def training_detail(self, run_dir: Path) -> dict:
        by_step = losses(run_dir)
        last = (train_records(run_dir) or [{}])[-1]
        if not by_step or not all(math.isfinite(v) for v in by_step.values()):
            raise Failed(f"no finite training losses in {run_dir / 'metrics.jsonl'}")
        first, final = by_step[min(by_step)], by_step[max(by_step)]
        if final >= first:
            raise Failed(f"the loss did not fall: {first:.4f} at step {min(by_step)}, {final:.4f} at {max(by_step)}")
        mfu = last.get("train/mfu")
        return {"summary": f"loss {first:.3f} -> {final:.3f} by step {max(by_step)}, "
                           f"{last.get('train/images_per_s', 0):.0f} img/s"
                           + (f", MFU {100 * mfu:.2f}%" if mfu else "")
                           + f", memory {last.get('train/memory_allocated_gb', 0):.2f} / "
                             f"{last.get('train/memory_reserved_gb', 0):.2f} GiB allocated / reserved",
                "losses": by_step, "last": last}

    def resume(self, timeout: float) -> dict:
        proc = self.execute(self.train_command("zero2", 1, self.demo_sets(RESUME_STEPS, ["parallel.zero_stage=2"])),
                            timeout)
        if f"resumed from step {ENTRY_STEPS}" not in proc.output:
            raise Failed(f"no 'resumed from step {ENTRY_STEPS}' in the output", proc.output)
        detail = self.training_detail(WORK / "zero2")
        detail["summary"] = f"resumed from step {ENTRY_STEPS}; " + detail["summary"]
        return detail

    def export(self, timeout: float) -> dict:
        out = WORK / "zero2" / "export"
        self.execute([self.python, "-m", "pretrain.export", "--run", str(WORK / "zero2"), "--out", str(out)], timeout)
        files = sorted(p.name for p in out.iterdir())
        return {"summary": f"{out}: {', '.join(files)}", "files": files}

    def evaluate(self, timeout: float) -> dict:
        proc = self.execute([self.python, "-m", "pretrain.evaluate", "--model", str(WORK / "zero2" / "export"),
                             "--data", str(SHARDS)], timeout)
        found = re.search(r"held-out top-1 ([\d.]+)", proc.output)
        if not found:
            raise Failed("no 'held-out top-1' in the output", proc.output)
        top1 = float(found.group(1))
        if top1 < MIN_TOP1:
            raise Failed(f"held-out top-1 {top1:.4f} after {RESUME_STEPS} steps is below {MIN_TOP1}", proc.output)
        return {"summary": f"held-out top-1 {top1:.4f} after {RESUME_STEPS} steps", "top1": top1}

    def model_parallel(self, name: str, timeout: float) -> dict:
        ranks, overrides, reference = MP_RUNS[name]
        shutil.rmtree(WORK / name, ignore_errors=True)
        self.execute(self.train_command(name, ranks, MP_COMMON + overrides), timeout)
        ours = losses(WORK / name)
        detail = {"losses": ours, "summary": f"{ranks} ranks, losses {[round(v, 4) for v in ours.values()]}"}
        if reference:
            problems = compare_losses(ours, losses(WORK / reference), MP_RTOL)
            if problems:
                raise Failed(f"losses differ from {reference} beyond rtol {MP_RTOL}: {'; '.join(problems[:3])}")
            detail["summary"] += f", equal to {reference} within rtol {MP_RTOL}"
        return detail

    def plan(self, timeout: float) -> dict:
        memory_gb = self.environment["gpus"][0]["memory_gib"] * GIB / 1e9
        cmd = [self.python, "-m", "pretrain.bench", "plan", "--config", "configs/swin_b_22k.yaml",
               "--gpu-mem-gb", f"{memory_gb:.1f}"]
        proc = self.execute(cmd, timeout, ok=(0, 1))  # 1: the layout does not fit (and was still measured)
        planned, measured = number_before(proc.output, "planned ", " GB"), number_before(proc.output, "measured ", " GB")
        reserved = number_before(proc.output, ", ", " GB reserved")
        if planned is None or measured is None:
            raise Failed("no 'planned ... measured ...' line in the output", proc.output)
        held = f"measured {measured:.2f} GB allocated" + (f", {reserved:.2f} GB reserved" if reserved else "")
        return {"summary": f"swin_b_22k on one {memory_gb:.0f} GB GPU: planned {planned:.2f} GB, {held} "
                           f"(plan / {'reserved' if reserved else 'allocated'} {planned / (reserved or measured):.2f})",
                "planned_gb": planned, "measured_gb": measured, "reserved_gb": reserved, "fits": proc.rc == 0}

    def bench(self, arch: str, micro: int, timeout: float, *flags: str) -> dict:
        proc = self.execute([self.python, "-m", "pretrain.bench", "step", "--arch", arch, "--micro-batch", str(micro),
                             *BENCH_STEPS, *flags], timeout)
        return bench_numbers(last_json(proc.output))

    def bench_sweep(self, arch: str, timeout: float) -> dict:
        def measure(micro: int) -> tuple[str, dict]:
            point = self.budget.grant(*TIMEOUTS["bench"])
            if point is None:
                return "skipped", {"reason": "not enough time left"}
            try:
                return "ok", self.bench(arch, micro, min(point, timeout))
            except Failed as e:
                return ("oom" if is_oom(e.output) else "failed"), {"reason": e.reason, "tail": tail(e.output, 8)}

        rows, best = sweep(SWEEP_MICRO_BATCHES, measure)
        if best is None:
            raise Failed(f"no micro-batch ran: {rows[0].get('reason', rows[0]['status'])}",
                         "\n".join(rows[0].get("tail", [])))
        self.best[arch] = best
        b = next(r for r in rows if r["micro_batch"] == best)
        tried = ", ".join(f"{r['micro_batch']}: {r['status']}" for r in rows)
        return {"summary": f"best micro-batch {best} ({tried}): " + bench_line(b), "sweep": rows,
                "best_micro_batch": best}

    def bench_compiled(self, arch: str, timeout: float) -> dict:
        best = self.best[arch]
        numbers = self.bench(arch, best, timeout, "--compile")
        eager = next(c for c in self.checks if c.name == f"bench_{arch}_sweep").detail
        eager_ips = next(r for r in eager["sweep"] if r["micro_batch"] == best)["images_per_s"]
        numbers["compile_over_eager"] = numbers["images_per_s"] / eager_ips
        return {"summary": f"micro-batch {best}, compiled: " + bench_line(numbers)
                           + f"; compiled / eager {numbers['compile_over_eager']:.2f}x", **numbers}


def probe() -> dict:
    """This interpreter's view of the machine (run in a child, so the checker holds no CUDA context)."""
    import torch  # here: whether torch imports at all is what the check reports first (`preflight`)

    def version(name: str) -> str | None:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return None

    nccl = torch.cuda.nccl.version() if torch.cuda.is_available() else None
    gpus = [torch.cuda.get_device_properties(i) for i in range(torch.cuda.device_count())]
    try:
        import deepspeed  # noqa: F401  (whether it imports is the finding)
        deepspeed_import = "ok"
    except Exception as e:  # noqa: BLE001  (reported, not raised)
        deepspeed_import = f"{type(e).__name__}: {e}"
    return {"python": sys.version.split()[0], "executable": sys.executable, "torch": torch.__version__,
            "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(),
            "nccl": ".".join(map(str, nccl)) if isinstance(nccl, tuple) else nccl,
            "gpus": [{"name": g.name, "memory_gib": round(g.total_memory / GIB, 2),
                      "capability": f"{g.major}.{g.minor}", "multiprocessors": g.multi_processor_count}
                     for g in gpus],
            "packages": {name: version(name) for name in PACKAGES}, "deepspeed_import": deepspeed_import}


def pins(kind: str) -> list[str]:
    """Requirements for `make gpu-wheels`: "pure" ones (pip wheel) or "compiled" ones (pip download)."""
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    pinned = {d.split("==")[0].strip().lower(): d.split(";")[0].strip() for d in deps if "==" in d}
    wanted = [pinned[name] for name in PROJECT_WHEELS]
    wanted += [f"{name}=={metadata.version(name)}" for name in DEEPSPEED_NEEDS]
    compiled = [w for w in wanted if w.split("==")[0].lower() in COMPILED_WHEELS]
    return compiled if kind == "compiled" else [w for w in wanted if w not in compiled]


def preflight() -> int:
    try:
        import torch  # here: whether it imports is the finding
    except Exception as e:  # noqa: BLE001  (one line, no traceback)
        print(f"gpu-check: {sys.executable} cannot import torch ({type(e).__name__}: {e})", file=sys.stderr)
        return 2
    if not torch.cuda.is_available():
        print(NO_GPU, file=sys.stderr)
        return 2
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m launch.gpu_check", description=__doc__.split("\n")[0])
    ap.add_argument("command", nargs="?", default="run", choices=("run", "preflight", "probe", "pins"))
    ap.add_argument("kind", nargs="?", default="pure", choices=("pure", "compiled"), help="for pins")
    ap.add_argument("--budget-s", type=float, default=float(os.environ.get("GPU_CHECK_BUDGET_S", 450)))
    ap.add_argument("--only", default="", help="comma-separated sub-check name prefixes (e.g. train,bench)")
    ap.add_argument("--report", default=None, help="JSON report path")
    args = ap.parse_args(argv)
    printed = {"pins": lambda: " ".join(pins(args.kind)), "probe": lambda: json.dumps(probe())}
    if args.command in printed:
        print(printed[args.command]())
        return 0
    code = preflight()
    if code or args.command == "preflight":
        return code
    if args.budget_s <= 0:
        print(f"gpu-check: --budget-s must be > 0, got {args.budget_s:g}", file=sys.stderr)
        return 2
    only = tuple(p for p in args.only.split(",") if p)
    return Runner(Budget(args.budget_s), report_path(args.report), only).run_all()


if __name__ == "__main__":
    sys.exit(main())
