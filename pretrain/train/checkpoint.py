"""DeepSpeed checkpoints: save on every rank, publish atomically, keep the last K, auto-resume.

Layout: `RUN_DIR/checkpoints/step00000010/...` (one DeepSpeed tag per save) and
`RUN_DIR/checkpoints/latest`, a one-line file naming the newest complete tag. `latest`
is replaced (write to a temp file, then rename) only after every rank has finished
writing, so a crash during a save leaves the previous checkpoint as the one resumed.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import torch.distributed as dist

LATEST = "latest"


def checkpoint_dir(run_dir: Path) -> Path:
    return run_dir / "checkpoints"


def tag_for(step: int) -> str:
    return f"step{step:08d}"


def latest_tag(ckpt_dir: Path) -> str | None:
    """The newest complete checkpoint tag, or None if there is none."""
    path = ckpt_dir / LATEST
    if not path.is_file():
        return None
    tag = path.read_text().strip()
    return tag if tag and (ckpt_dir / tag).is_dir() else None


def _publish(ckpt_dir: Path, tag: str, keep_last: int) -> None:
    tmp = ckpt_dir / f".{LATEST}.tmp"
    tmp.write_text(tag + "\n")
    os.replace(tmp, ckpt_dir / LATEST)
    tags = sorted(p.name for p in ckpt_dir.iterdir() if p.is_dir() and p.name.startswith("step"))
    for old in tags[:-keep_last]:
        if old != tag:
            shutil.rmtree(ckpt_dir / old, ignore_errors=True)


def save(engine: Any, run_dir: Path, step: int, client_state: dict[str, Any], keep_last: int) -> str:
    """Save a checkpoint from every rank and make it `latest` once all ranks are done."""
    ckpt_dir = checkpoint_dir(run_dir)
    tag = tag_for(step)
    # `universal_checkpoint_info` lets ds_to_universal convert this checkpoint for another world size.
    state = {**client_state, "universal_checkpoint_info": {}}
    engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=state, save_latest=False)
    dist.barrier()
    if dist.get_rank() == 0:
        _publish(ckpt_dir, tag, keep_last)
    dist.barrier()
    return tag


def resume(engine: Any, run_dir: Path) -> dict[str, Any] | None:
    """Load the latest checkpoint into the engine (every rank); return its client state, or None."""
    ckpt_dir = checkpoint_dir(run_dir)
    tag = latest_tag(ckpt_dir)
    if tag is None:
        return None
    path, client_state = engine.load_checkpoint(str(ckpt_dir), tag=tag)
    if path is None:
        raise RuntimeError(f"checkpoint {ckpt_dir / tag} could not be loaded")
    return client_state
