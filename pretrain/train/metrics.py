"""Run metrics: TensorBoard scalars, a JSON-lines copy, and the console line (rank 0 only).

Scalars are namespaced (`train/loss`, `eval/top1`, ...). `metrics.jsonl` in the run
directory holds the same numbers, one JSON object per logged step, for scripts and tests.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path


class Metrics:
    def __init__(self, run_dir: Path, enabled: bool):
        self.enabled = enabled
        self.run_dir = run_dir
        self.writer = None
        self.jsonl = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

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
        from torchvision.utils import save_image

        self.writer.add_image(name, picture, step)
        self.writer.flush()
        folder = self.run_dir / "images"
        folder.mkdir(exist_ok=True)
        save_image(picture, folder / f"{name.replace('/', '_')}-{step:08d}.png")

    def print(self, text: str) -> None:
        if self.enabled:
            print(text, file=sys.stdout, flush=True)

    def close(self) -> None:
        if self.enabled:
            self.writer.close()
            self.jsonl.close()
