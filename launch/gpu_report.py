"""The GPU check's records and helpers (launch/gpu_check.py): time budget, timed commands,
the micro-batch sweep, loss comparison, the report's summary. Nothing here needs a GPU."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parents[1]
TAIL_LINES = 30
OOM_MARKERS = ("CUDA out of memory", "OutOfMemoryError")


class Failed(Exception):
    """A sub-check failed: `reason` is one line, `output` the command's output."""

    def __init__(self, reason: str, output: str = ""):
        super().__init__(reason)
        self.reason, self.output = reason, output


@dataclass
class Check:
    name: str
    status: str  # pass | fail | skip
    wall_s: float = 0.0
    command: str = ""
    reason: str = ""
    detail: dict = field(default_factory=dict)
    tail: list[str] = field(default_factory=list)


@dataclass
class Proc:
    rc: int
    output: str
    timed_out: bool


class Budget:
    """Seconds left of the whole check; each sub-check gets what it wants, or what is left."""

    def __init__(self, total_s: float, clock: Callable[[], float] = time.monotonic):
        self.total_s, self.clock, self.start = total_s, clock, clock()

    def left(self) -> float:
        return self.total_s - (self.clock() - self.start)

    def grant(self, wanted_s: float, least_s: float) -> float | None:
        """The timeout for a sub-check, or None when fewer than `least_s` seconds are left."""
        left = self.left()
        return None if left < least_s else min(wanted_s, left)


def run_command(cmd: list[str], timeout_s: float, env: dict[str, str]) -> Proc:
    """Run `cmd` in its own process group from the repository root, output and errors together.

    On timeout the whole group is stopped (SIGTERM, then SIGKILL); a command that exited but
    left processes holding its output open counts as finished, and those processes are stopped.
    """
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            errors="replace", start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout_s)
        return Proc(proc.returncode, out, False)
    except subprocess.TimeoutExpired:
        finished = proc.poll() is not None
    out = ""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass
        try:
            out, _ = proc.communicate(timeout=10)
            break
        except subprocess.TimeoutExpired:
            continue
    rc = proc.poll()
    return Proc(rc if rc is not None else -9, out or "", not finished)


def tail(text: str, n: int = TAIL_LINES) -> list[str]:
    return text.rstrip().splitlines()[-n:]


def last_json(text: str) -> dict:
    for line in reversed(text.strip().splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    raise Failed("no JSON result in the output", text)


def error_line(text: str, width: int = 200) -> str:
    """The last line of `text` that names an error, shortened to `width` characters ("" if none);
    the DeepSpeed launcher's own report of a failed rank is passed over."""
    found = [line.strip() for line in text.splitlines()
             if re.search(r"error|exception", line, re.IGNORECASE) and not re.search(r"\[launch\.py:\d+:", line)]
    return found[-1][:width] if found else ""


def number_before(text: str, before: str, after: str) -> float | None:
    """The number between `before` and `after` in `text` (the last such one), or None."""
    found = re.findall(re.escape(before) + r"([\d.]+)" + re.escape(after), text)
    return float(found[-1]) if found else None


def is_oom(text: str) -> bool:
    return any(marker in text for marker in OOM_MARKERS)


def sweep(micro_batches: tuple[int, ...], measure: Callable[[int], tuple[str, dict]]) -> tuple[list[dict], int | None]:
    """Measure each micro-batch in turn until one is not "ok" (OOM, failure, timeout, no time left).

    `measure(m)` returns (status, numbers with "images_per_s"); the best micro-batch is the
    fastest "ok" one, None when none was.
    """
    rows = []
    for micro in micro_batches:
        status, numbers = measure(micro)
        rows.append({"micro_batch": micro, "status": status, **numbers})
        if status != "ok":
            break
    ok = [r for r in rows if r["status"] == "ok"]
    return rows, (max(ok, key=lambda r: r["images_per_s"])["micro_batch"] if ok else None)


def bench_numbers(r: dict) -> dict:
    """What the report keeps of one `bench step --json` result."""
    def side(x: dict) -> dict:
        return {k: x[k] for k in ("images_per_s", "step_s", "mfu", "mfu_datasheet", "peak_allocated_gib",
                                  "max_reserved_gib")}
    return {"images_per_s": r["ours"]["images_per_s"], "ratio": r["ratio"],
            "ratio_min_median_max": r["ratio_min_median_max"], "peak_tflops": r["peak_tflops"],
            "datasheet_peak_tflops": r["datasheet_peak_tflops"], "ours": side(r["ours"]),
            "reference": side(r["reference"])}


def train_records(run_dir: Path) -> list[dict]:
    """The training-log records of a run's metrics.jsonl (empty when it has none)."""
    path = run_dir / "metrics.jsonl"
    records = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    return [m for m in records if "train/loss" in m]


def losses(run_dir: Path) -> dict[int, float]:
    return {m["step"]: m["train/loss"] for m in train_records(run_dir)}


def compare_losses(ours: dict[int, float], reference: dict[int, float], rtol: float) -> list[str]:
    """One line per step where the losses differ by more than `rtol` (or a step is missing)."""
    problems = [f"step {s}: {ours.get(s)} vs {loss:.6g}" for s, loss in sorted(reference.items())
                if s not in ours or abs(ours[s] - loss) > rtol * abs(loss)]
    return problems if reference else ["the reference run logged no losses"]


def summary_lines(checks: list[Check]) -> list[str]:
    lines = [f"{c.status.upper():4s}  {c.name:22s} {c.wall_s:6.1f} s  {c.detail.get('summary', c.reason)}"
             for c in checks]
    counts = {s: sum(c.status == s for c in checks) for s in ("pass", "fail", "skip")}
    lines.append(f"gpu-check: {counts['pass']} passed, {counts['fail']} failed, {counts['skip']} skipped")
    return lines


def report_path(given: str | None) -> Path:
    if given:
        return Path(given)
    out = os.environ.get("OUT")
    return Path(out) / "gpu_check.json" if out else REPO / "runs" / "gpu_check.json"


def deepspeed_launcher(python: str) -> list[str]:
    """The `deepspeed` script next to the interpreter, else its module."""
    script = Path(python).parent / "deepspeed"
    return [str(script)] if script.exists() else [python, "-m", "deepspeed.launcher.runner"]


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("DS_ACCELERATOR", None)  # DeepSpeed finds CUDA by itself
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (env.get("PYTHONPATH", ""), str(REPO)) if p)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def bench_line(b: dict) -> str:
    ours, ref = b["ours"], b["reference"]
    mfu = ours["mfu_datasheet"] if ours["mfu_datasheet"] else ours["mfu"]
    kind = "datasheet" if ours["mfu_datasheet"] else "measured"
    memory = (f", {ours['peak_allocated_gib']:.1f} GiB allocated / {ours['max_reserved_gib']:.1f} GiB reserved"
              if ours["peak_allocated_gib"] is not None else "")
    low, median, high = b["ratio_min_median_max"]
    return (f"ours {ours['images_per_s']:.0f} img/s (MFU {100 * mfu:.1f}% of the {kind} peak){memory}; "
            f"reference {ref['images_per_s']:.0f} img/s; ours / reference {median:.2f}x ({low:.2f}-{high:.2f})")
