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
ranks could pick different tags. Rank 0 also removes, with one line, the tags newer than
`latest` that have no manifest: the leftovers of a save that did not finish.

What a checkpoint records besides DeepSpeed's own state is one `RunState` (the run's
constant facts and its progress counters), DeepSpeed's client state. Consolidating a tag
into one state dict (for export) lives in the sibling `consolidate.py`, which also owns
DeepSpeed's file names; it is kept apart only to keep this module short.

A write that fails during a save (a full disk, a quota) does not stop a rank in the middle of
DeepSpeed's save, where the other ranks wait in its barriers: the failure is recorded, the
rank's remaining writes of that save are skipped, every rank finishes the save's collectives
and then all agree, in one all-reduce, whether any rank failed. Every rank then raises
`SaveFailed` with the same one line (`agreed`). A write error that still escapes DeepSpeed
elsewhere leaves the ranks out of step: that rank raises `SaveFailed(agreed=False)` and must
exit at once without further collectives (the launcher stops the others).
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import warnings
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Iterator

import torch
import torch.distributed as dist
from deepspeed.checkpoint import ds_to_universal

from pretrain.config import ConfigError
from pretrain.parallel import comm

LATEST = "latest"
MANIFEST = "manifest.json"
LAYOUT = "layout.json"  # in a tag: the process layout and ZeRO stage it was saved with
UNIVERSAL = "universal"  # in the checkpoint dir: tags converted for another layout
STOPPED_MARKER = "stopped_on_signal"  # in the run dir: checkpointed on a stop signal, requeue me


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read as this code expects (one line)."""


class SaveFailed(CheckpointError):
    """A checkpoint could not be written; `latest` still names the previous one.

    `agreed`: every rank knows and raises it (the collectives stayed in step). Otherwise only
    this rank does, and it must leave without another collective.
    """

    def __init__(self, message: str, agreed: bool):
        super().__init__(message)
        self.agreed = agreed


@dataclass(frozen=True)
class RunState:
    """DeepSpeed's client state of our checkpoints: the run's constant facts and its progress.

    Keys a checkpoint of an older version lacks read as their defaults, as before.
    """

    arch: str = ""
    num_classes: int = 0  # 0: no classifier head (SimMIM)
    label_map_version: str | None = None
    # Names of the optimizer's parameter groups' tensors, in order: where fp32 master weights
    # saved without ZeRO belong (None in checkpoints that predate it).
    param_group_names: list[list[str]] | None = None
    step: int = 0
    samples_seen: int = 0
    skipped_samples: int = 0  # undecodable samples skipped, over all ranks
    skipped_steps: int = 0  # optimizer steps skipped for a non-finite loss

    def to_client_state(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_client_state(cls, saved: dict[str, Any]) -> RunState:
        defaults = cls()
        return cls(**{name: saved.get(name, getattr(defaults, name)) for name in cls.__dataclass_fields__})

    def at(self, step: int, samples_seen: int, skipped_samples: int, skipped_steps: int) -> RunState:
        """These facts with this progress."""
        return replace(self, step=step, samples_seen=samples_seen, skipped_samples=skipped_samples,
                       skipped_steps=skipped_steps)


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


# Write failures recorded instead of raised inside DeepSpeed's save (see the module docstring).
# torch's zip writer reports a short write (a full disk) as a RuntimeError from its C++ side.
_TORCH_WRITE_ERRORS = ("inline_container", "PytorchStreamWriter", "file write failed")
_OUT_OF_SPACE = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
NO_FAILURE, FAILED, OUT_OF_SPACE = 0, 1, 2  # what a rank contributes to the save's all-reduce (max)


def _is_write_error(e: BaseException) -> bool:
    return isinstance(e, OSError) or (isinstance(e, RuntimeError) and any(s in str(e) for s in _TORCH_WRITE_ERRORS))


def _failure_kind(e: BaseException) -> int:
    return FAILED if isinstance(e, OSError) and e.errno not in _OUT_OF_SPACE else OUT_OF_SPACE


class _WriteFailures:
    """The first write error of this rank during one save; later writes of that save are skipped."""

    def __init__(self) -> None:
        self.error: BaseException | None = None

    def guard(self, write: Any) -> Any:
        def guarded(*args: Any, **kwargs: Any) -> Any:
            if self.error is not None:
                return None
            try:
                return write(*args, **kwargs)
            except Exception as e:
                if not _is_write_error(e):
                    raise
                self.error = e
                return None
        return guarded


@contextmanager
def _recording_write_errors(engine: Any) -> Iterator[_WriteFailures]:
    """Make DeepSpeed's file writes of one save record their errors instead of raising them.

    Its checkpoint engine writes every tensor file (pipeline layer files included) and makes
    the directories; rank 0 also copies DeepSpeed's recovery scripts next to the tags.
    """
    failures = _WriteFailures()
    patched = [(obj, name) for obj, name in ((engine.checkpoint_engine, "save"), (engine.checkpoint_engine, "makedirs"),
                                             (engine, "_copy_recovery_script")) if hasattr(obj, name)]
    for obj, name in patched:
        setattr(obj, name, failures.guard(getattr(obj, name)))
    try:
        yield failures
    finally:
        for obj, name in patched:
            delattr(obj, name)  # the instance attribute: the class's method shows again


def _free_space(path: Path) -> str:
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        free = float(shutil.disk_usage(path).free)
    except OSError:
        return "free space unknown"
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if free < 1024:
            break
        free /= 1024
    else:
        unit = "TiB"
    return f"{free:.0f} {unit} free" if unit == "bytes" else f"{free:.1f} {unit} free"


def _save_failed_message(ckpt_dir: Path, tag: str, kind: int, detail: str | None = None) -> str:
    previous = latest_tag(ckpt_dir)
    why = "the disk is full" if kind == OUT_OF_SPACE else "a write failed"
    return (f"could not save checkpoint {tag} in {ckpt_dir}: {why} ({_free_space(ckpt_dir)} there"
            f"{f'; {detail}' if detail else ''}); "
            + (f"{previous} stays the latest checkpoint" if previous else "there is no earlier checkpoint")
            + ", free space and re-run to continue")


def _detail(e: BaseException) -> str | None:
    """What to add to the one line: the OS's words; torch's C++ writer message goes to the log only."""
    if isinstance(e, OSError) and e.strerror:
        return f"rank {dist.get_rank()}: {e.strerror}" + (f": {e.filename}" if e.filename else "")
    return None


def save(engine: Any, run_dir: Path, state: RunState, keep_last: int, saved_layout: dict[str, Any]) -> str:
    """Save a checkpoint of `state` from every rank and make it `latest` once all ranks are done.

    Raises SaveFailed when a file could not be written (see the module docstring).
    """
    ckpt_dir = checkpoint_dir(run_dir)
    tag = tag_for(state.step)
    # `universal_checkpoint_info` lets ds_to_universal convert this checkpoint for another world size.
    client_state = {**state.to_client_state(), "universal_checkpoint_info": {}}
    try:
        with _recording_write_errors(engine) as failures:
            engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=client_state, save_latest=False)
    except Exception as e:
        if not _is_write_error(e):
            raise
        logging.getLogger("pretrain").error(f"checkpoint {tag}: {e!r}")
        raise SaveFailed(_save_failed_message(ckpt_dir, tag, _failure_kind(e), _detail(e)), agreed=False) from e
    here = NO_FAILURE if failures.error is None else _failure_kind(failures.error)
    # The one collective that tells every rank whether any rank's write failed (also the
    # barrier before rank 0 publishes: every rank's files are written when it returns).
    kind = int(comm.to_host(comm.all_reduce([here], op="max"))[0])
    if kind != NO_FAILURE:
        detail = None
        if failures.error is not None:
            logging.getLogger("pretrain").error(f"checkpoint {tag}: {failures.error!r}")
            detail = _detail(failures.error)
        raise SaveFailed(_save_failed_message(ckpt_dir, tag, kind, detail), agreed=True)
    problem = None
    if dist.get_rank() == 0:
        try:
            _publish(ckpt_dir, tag, keep_last, saved_layout)
        except OSError as e:
            logging.getLogger("pretrain").error(f"checkpoint {tag}: {e!r}")
            problem = (_failure_kind(e), _detail(e))
    problem = comm.broadcast_object(problem)  # every rank learns how publishing went (and waits for it)
    if problem is not None:
        raise SaveFailed(_save_failed_message(ckpt_dir, tag, *problem), agreed=True)
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
    _remove_unfinished(ckpt_dir, newest)
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


def _remove_unfinished(ckpt_dir: Path, newest: str | None) -> None:
    """Remove the tags after `newest` (all, if None) that have no manifest: saves that did not finish."""
    if not ckpt_dir.is_dir():
        return
    for path in sorted(ckpt_dir.iterdir()):
        if path.is_dir() and path.name.startswith("step") and (newest is None or path.name > newest) \
                and not (path / MANIFEST).is_file():
            shutil.rmtree(path, ignore_errors=True)
            text = f"removed checkpoint {path}: its save did not finish" + \
                (f" ({newest} is the latest)" if newest else "")
            print(text, flush=True)
            logging.getLogger("pretrain").info(text)


def prepare(point: ResumePoint) -> None:
    """Convert `point` to universal form once (rank 0) if it needs it; every rank calls this."""
    target = point.load_dir / point.tag
    if point.universal and dist.get_rank() == 0 and not (target / MANIFEST).is_file():
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


def resume(engine: Any, point: ResumePoint) -> RunState:
    """Load `point` into the engine (every rank); return the run state it recorded."""
    path, client_state = engine.load_checkpoint(str(point.load_dir), tag=point.tag)
    if path is None:
        raise RuntimeError(f"checkpoint {point.load_dir / point.tag} could not be loaded")
    missing = [key for key in ("step", "samples_seen") if key not in client_state]
    if missing:
        raise CheckpointError(f"checkpoint {point.load_dir / point.tag} has no {' or '.join(missing)} in its "
                              f"client state (not written by pretrain/main.py?)")
    return RunState.from_client_state(client_state)
