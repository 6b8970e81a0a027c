"""Run pretrain/main.py in this process and record, per optimizer step, what our code did inside
the training step: collectives it started and host reads it made (`.item()`, `float(t)`,
`bool(t)`, `.tolist()`, `.cpu()`). Prints one JSON line per step.

    python tests/integration/step_sync_check.py --config ... --set ...   (the arguments of pretrain/main.py)
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from pretrain import main as entry  # noqa: E402
from pretrain.train.trainer import Trainer  # noqa: E402

current: dict = {}
record: dict[int, dict] = defaultdict(lambda: {"collectives": [], "host_reads": [], "log_step": False})


def _our_caller() -> str | None:
    frame = sys._getframe(2)
    name = frame.f_code.co_filename
    return f"{Path(name).relative_to(REPO)}:{frame.f_lineno}" if name.startswith(str(REPO / "pretrain")) else None


def _watch(owner, name: str, kind: str) -> None:
    original = getattr(owner, name)

    def watched(*args, **kwargs):
        site = _our_caller()
        if current and site:
            record[current["step"]][kind].append(site)
        return original(*args, **kwargs)

    setattr(owner, name, watched)


for method in ("item", "tolist", "cpu", "__float__", "__bool__", "__int__"):
    _watch(torch.Tensor, method, "host_reads")
_watch(dist, "all_reduce", "collectives")

for step_name in ("_train_step", "_pipeline_step"):
    original_step = getattr(Trainer, step_name)

    def step(self, batches, preprocess, window, log_now, _original=original_step):
        current["step"] = self.state.step + 1
        record[current["step"]]["log_step"] = log_now
        try:
            return _original(self, batches, preprocess, window, log_now)
        finally:
            current.clear()

    setattr(Trainer, step_name, step)

if __name__ == "__main__":  # data workers start through a forkserver, which imports this file again
    status = entry.main(sys.argv[1:])
    for number in sorted(record):
        print(json.dumps({"step": number, **record[number]}))
    sys.exit(status)
