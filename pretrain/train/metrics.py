"""Run metrics: TensorBoard scalars, a JSON-lines copy, the console, per-rank log files.

Rank 0 writes TensorBoard and `metrics.jsonl` (the same scalars, one JSON object per
logged step, for scripts and tests) and prints the console lines. Every rank writes its
own `RUN_DIR/logs/rank<N>.log` (console lines, warnings, skipped samples), set up once by
the entry point with `setup_logging`.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path

from torch.utils.tensorboard import SummaryWriter
from torchvision.utils import save_image


def setup_logging(run_dir: Path, rank: int) -> None:
    """This process's log file, `RUN_DIR/logs/rank<N>.log`: every INFO record and every warning."""
    (run_dir / "logs").mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(run_dir / "logs" / f"rank{rank}.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.getLogger().addHandler(handler)
    logging.getLogger().setLevel(logging.INFO)
    logging.captureWarnings(True)


class Metrics:
    def __init__(self, run_dir: Path, rank: int):
        self.enabled = rank == 0
        self.run_dir = run_dir
        self.writer = None
        self.jsonl = None
        self.log_file = logging.getLogger("pretrain")  # to the log files `setup_logging` opened
        if self.enabled:
            self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"))
            self.jsonl = (run_dir / "metrics.jsonl").open("a")

    def log(self, step: int, scalars: dict[str, float]) -> None:
        """Record scalars for `step` in TensorBoard and metrics.jsonl."""
        if not self.enabled:
            return
        for name, value in scalars.items():
            self.writer.add_scalar(name, value, step)
        self.writer.flush()
        self.jsonl.write(json.dumps({"step": step, "time": time.time(), **scalars}) + "\n")
        self.jsonl.flush()

    def image(self, name: str, picture, step: int) -> None:
        """A (3, H, W) picture in [0, 1]: to TensorBoard, and as RUN_DIR/images/<name>-<step>.png."""
        if not self.enabled:
            return
        self.writer.add_image(name, picture, step)
        self.writer.flush()
        folder = self.run_dir / "images"
        folder.mkdir(exist_ok=True)
        save_image(picture, folder / f"{name.replace('/', '_')}-{step:08d}.png")

    def print(self, text: str, error: bool = False, this_rank: bool = False) -> None:
        """A console line from rank 0 (stderr if `error`); every rank keeps it in its log file.

        `this_rank`: a failure of this rank alone (a stall, out of memory), printed by whichever rank has it.
        """
        self.log_file.log(logging.ERROR if error else logging.INFO, text)
        if self.enabled or this_rank:
            print(text, file=sys.stderr if error else sys.stdout, flush=True)

    def close(self) -> None:
        if self.enabled:
            self.writer.close()
            self.jsonl.close()
