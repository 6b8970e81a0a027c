"""DeepSpeed checkpoints: save on every rank, publish atomically, keep the last K, auto-resume.

Layout: `RUN_DIR/checkpoints/step00000010/...` (one DeepSpeed tag per save) and
`RUN_DIR/checkpoints/latest`, a one-line file naming the newest complete tag. `latest`
is replaced (write to a temp file, then rename) only after every rank has finished
writing, so a crash during a save leaves the previous checkpoint as the one resumed.
Each complete tag also gets `manifest.json` (every file and its size); a tag whose files
do not match its manifest is passed over, with a warning, for the one before it.

Each tag records the layout it was written with (`layout.json`: data-parallel size, ZeRO
stage, pipeline and tensor degrees, precision). Resuming at another data-parallel size or ZeRO stage
converts the tag once into DeepSpeed's universal format (`checkpoints/universal/<tag>`, by
rank 0, with DeepSpeed's own ds_to_universal) and loads that, so a job can continue on
fewer or more GPUs. Pipeline and tensor degrees must stay those of the checkpoint (a
config error otherwise): DeepSpeed re-cuts its universal form only along data parallelism.
So must the precision: it decides who holds the fp32 master weights and in what form.

Which checkpoint to resume is decided by rank 0 alone and broadcast: every rank reading
every tag's files would load a shared filesystem N-fold, and with cached file attributes
ranks could pick different tags.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
import torch.distributed as dist

from pretrain.config import ConfigError
from pretrain.parallel import comm

LATEST = "latest"
MANIFEST = "manifest.json"
LAYOUT = "layout.json"  # in a tag: the process layout and ZeRO stage it was saved with
UNIVERSAL = "universal"  # in the checkpoint dir: tags converted for another layout
STOPPED_MARKER = "stopped_on_signal"  # in the run dir: checkpointed on a stop signal, requeue me


@dataclass(frozen=True)
class ResumePoint:
    """What to load: `engine.load_checkpoint(load_dir, tag)`, universal or native."""

    load_dir: Path
    tag: str
    universal: bool


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


def _write_manifest(tag_dir: Path) -> None:
    files = {str(p.relative_to(tag_dir)): p.stat().st_size for p in sorted(tag_dir.rglob("*"))
             if p.is_file() and p.name != MANIFEST}
    tmp = tag_dir / f".{MANIFEST}.tmp"
    tmp.write_text(json.dumps(files, indent=0))
    os.replace(tmp, tag_dir / MANIFEST)


def problem_with(tag_dir: Path) -> str | None:
    """Why the checkpoint in `tag_dir` cannot be trusted, or None if its files match its manifest."""
    manifest = tag_dir / MANIFEST
    if not manifest.is_file():
        return "no manifest.json (the save did not finish)"
    for name, size in json.loads(manifest.read_text()).items():
        path = tag_dir / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != size:
            return f"{name} has {path.stat().st_size} bytes, the manifest says {size}"
    return None


def _publish(ckpt_dir: Path, tag: str, keep_last: int, layout: dict[str, int]) -> None:
    (ckpt_dir / tag / LAYOUT).write_text(json.dumps(layout))
    _write_manifest(ckpt_dir / tag)
    tmp = ckpt_dir / f".{LATEST}.tmp"
    tmp.write_text(tag + "\n")
    os.replace(tmp, ckpt_dir / LATEST)
    tags = sorted(p.name for p in ckpt_dir.iterdir() if p.is_dir() and p.name.startswith("step"))
    for old in tags[:-keep_last]:
        if old != tag:
            shutil.rmtree(ckpt_dir / old, ignore_errors=True)
            shutil.rmtree(ckpt_dir / UNIVERSAL / old, ignore_errors=True)


def layout(topo: Any, zero_stage: int, precision: str) -> dict[str, Any]:
    """What layout.json records for a run on `topo`."""
    return {"dp_world_size": topo.dp_size, "zero_stage": zero_stage, "pipeline_stages": topo.pipeline,
            "tensor_parallel": topo.tensor, "precision": precision}


def save(engine: Any, run_dir: Path, step: int, client_state: dict[str, Any], keep_last: int,
         saved_layout: dict[str, int]) -> str:
    """Save a checkpoint from every rank and make it `latest` once all ranks are done."""
    ckpt_dir = checkpoint_dir(run_dir)
    tag = tag_for(step)
    # `universal_checkpoint_info` lets ds_to_universal convert this checkpoint for another world size.
    state = {**client_state, "universal_checkpoint_info": {}}
    engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=state, save_latest=False)
    dist.barrier()
    if dist.get_rank() == 0:
        _publish(ckpt_dir, tag, keep_last, saved_layout)
    dist.barrier()
    return tag


def find_resume(run_dir: Path, topo: Any, zero_stage: int, precision: str) -> ResumePoint | None:
    """The newest intact checkpoint of the run and how to load it at this layout, or None.

    Collective: rank 0 reads the checkpoint directory and decides, every rank gets its answer
    (or its ConfigError / RuntimeError, raised on every rank alike).
    """
    decision: Any = None
    if dist.get_rank() == 0:
        try:
            decision = _choose_resume(run_dir, topo, zero_stage, precision)
        except (ConfigError, RuntimeError) as e:
            decision = (type(e).__name__, str(e))
    decision = comm.broadcast_object(decision)
    if isinstance(decision, tuple):
        kind, message = decision
        raise (ConfigError if kind == "ConfigError" else RuntimeError)(message)
    return decision


def _choose_resume(run_dir: Path, topo: Any, zero_stage: int, precision: str) -> ResumePoint | None:
    """The newest intact checkpoint of the run and how to load it at this layout, or None (rank 0 reads)."""
    ckpt_dir = checkpoint_dir(run_dir)
    newest = latest_tag(ckpt_dir)
    if newest is None:
        return None
    candidates = sorted((p.name for p in ckpt_dir.iterdir() if p.is_dir() and p.name.startswith("step")
                         and p.name <= newest), reverse=True)
    for tag in candidates:
        problem = problem_with(ckpt_dir / tag)
        if problem is None:
            path = ckpt_dir / tag / LAYOUT
            ours = layout(topo, zero_stage, precision)
            saved = {"pipeline_stages": 1, "tensor_parallel": 1, "precision": precision,  # before these were recorded
                     **(json.loads(path.read_text()) if path.is_file() else ours)}
            for key, option in (("pipeline_stages", "parallel.pipeline_stages"),
                                ("tensor_parallel", "parallel.tensor_parallel"), ("precision", "precision")):
                if saved[key] != ours[key]:
                    raise ConfigError(f"{option}={ours[key]}: checkpoint {ckpt_dir / tag} was saved with "
                                      f"{key}={saved[key]}; resume with that value (or run.auto_resume=false)")
            same_layout = saved == ours
            unpartitioned = saved["zero_stage"] == zero_stage == 0  # loads at any size as it is
            if same_layout or unpartitioned:
                return ResumePoint(ckpt_dir, tag, universal=False)
            if 0 in (saved["zero_stage"], zero_stage):
                raise ConfigError(f"parallel.zero_stage={zero_stage}: checkpoint {ckpt_dir / tag} was saved with "
                                  f"ZeRO stage {saved['zero_stage']}; resume with that stage (or run.auto_resume=false)")
            return ResumePoint(ckpt_dir / UNIVERSAL, tag, universal=True)
        warnings.warn(f"checkpoint {ckpt_dir / tag} is incomplete ({problem}); trying the one before it",
                          stacklevel=2)
    raise RuntimeError(f"no intact checkpoint in {ckpt_dir}; move it away to start over")


def prepare(point: ResumePoint) -> None:
    """Convert `point` to universal form once (rank 0) if it needs it; every rank calls this."""
    target = point.load_dir / point.tag
    if point.universal and dist.get_rank() == 0 and not (target / MANIFEST).is_file():
        from deepspeed.checkpoint import ds_to_universal

        tmp = point.load_dir / f".{point.tag}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        print(f"converting checkpoint {point.tag} to universal form for the new layout", flush=True)
        ds_to_universal.main(SimpleNamespace(
            input_folder=str(point.load_dir.parent / point.tag), output_folder=str(tmp), num_extract_workers=4,
            num_merge_workers=2, keep_temp_folder=False, strict=True, inject_missing_state=False))
        _write_manifest(tmp)
        shutil.rmtree(target, ignore_errors=True)
        os.replace(tmp, target)
    dist.barrier()


def resume(engine: Any, point: ResumePoint) -> dict[str, Any]:
    """Load `point` into the engine (every rank); return its client state."""
    path, client_state = engine.load_checkpoint(str(point.load_dir), tag=point.tag)
    if path is None:
        raise RuntimeError(f"checkpoint {point.load_dir / point.tag} could not be loaded")
    return client_state
