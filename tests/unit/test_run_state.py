"""checkpoint.RunState (the client state of our checkpoints) and how a save that cannot write ends."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pretrain.train import checkpoint
from pretrain.train.checkpoint import RunState, SaveFailed

TORCH_DISK_FULL = "[enforce fail at inline_container.cc:664] . unexpected pos 1024 vs 960"
FACTS = RunState(arch="swin_debug", num_classes=10, label_map_version="v1", param_group_names=[["a", "b"], ["c"]])


def test_run_state_round_trips_through_the_client_state():
    state = FACTS.at(step=6, samples_seen=96, skipped_samples=2, skipped_steps=1)
    saved = {**state.to_client_state(), "universal_checkpoint_info": {}, "module": {}, "optimizer": None}
    assert RunState.from_client_state(saved) == state
    assert json.loads(json.dumps(state.to_client_state())) == state.to_client_state()
    assert FACTS.at(1, 16, 0, 0).arch == "swin_debug" and FACTS.step == 0


def test_an_older_checkpoints_missing_keys_read_as_defaults():
    old = RunState.from_client_state({"step": 4, "samples_seen": 64, "arch": "swin_debug"})
    assert (old.step, old.samples_seen, old.skipped_samples, old.skipped_steps) == (4, 64, 0, 0)
    assert old.num_classes == 0 and old.param_group_names is None and old.label_map_version is None


class FakeCheckpointEngine:
    def __init__(self, fail_on: str | None, error: BaseException):
        self.fail_on, self.error = fail_on, error

    def makedirs(self, path: str, exist_ok: bool = False) -> None:
        os.makedirs(path, exist_ok=exist_ok)

    def save(self, state_dict: dict, path: str) -> None:
        if self.fail_on and path.endswith(self.fail_on):
            Path(path).write_bytes(b"half")  # what a full disk leaves behind
            raise self.error
        torch.save(state_dict, path)


class FakeEngine:
    """The shape of DeepSpeed's save: barriers around per-rank writes, a script copy on rank 0."""

    def __init__(self, fail_on: str | None = None, error: BaseException = RuntimeError(TORCH_DISK_FULL),
                 copy_error: BaseException | None = None):
        self.checkpoint_engine = FakeCheckpointEngine(fail_on, error)
        self.copy_error = copy_error

    def _copy_recovery_script(self, save_path: str) -> None:
        if self.copy_error is not None:
            raise self.copy_error
        Path(save_path, "zero_to_fp32.py").write_text("# recovery\n")

    def save_checkpoint(self, save_dir: str, tag: str, client_state: dict, save_latest: bool) -> None:
        rank = dist.get_rank()
        dist.barrier()
        self.checkpoint_engine.makedirs(os.path.join(save_dir, tag), exist_ok=True)
        if rank == 0:
            self.checkpoint_engine.save({**client_state, "module": {}}, os.path.join(save_dir, tag, "model.pt"))
        self.checkpoint_engine.save({"part": rank}, os.path.join(save_dir, tag, f"optim_{rank}.pt"))
        self.checkpoint_engine.save({"part": rank}, os.path.join(save_dir, tag, f"more_{rank}.pt"))
        if rank == 0:
            self._copy_recovery_script(save_dir)
        dist.barrier()


def _save(run_dir: Path, engine: FakeEngine, step: int) -> str:
    return checkpoint.save(engine, run_dir, FACTS.at(step, 16 * step, 0, 0), keep_last=2, saved_layout={"dp": 1})


def _in_group(rank: int, world: int, init: str, run_dir: Path, fail_rank: int, results: dict) -> None:
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        _save(run_dir, FakeEngine(), 2)
        failing = FakeEngine(fail_on=f"optim_{rank}.pt" if rank == fail_rank else None)
        try:
            _save(run_dir, failing, 4)
            results[rank] = "saved"
        except SaveFailed as e:
            patched = any(name in vars(obj) for obj, name in ((failing.checkpoint_engine, "save"),
                                                              (failing, "_copy_recovery_script")))
            results[rank] = (str(e), e.agreed, patched)
        dist.barrier()  # the group is still in step after the failed save
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("world, fail_rank", [(1, 0), (2, 1), (2, 0)])
def test_a_failed_write_on_any_rank_stops_every_rank_with_one_line(tmp_path, world, fail_rank):
    run_dir = tmp_path / "run"
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_in_group, args=(world, f"file://{tmp_path / 'rendezvous'}", run_dir, fail_rank, results),
                 nprocs=world, join=True)
        results = dict(results)
    ckpt_dir = run_dir / "checkpoints"
    for rank in range(world):
        message, agreed, patched = results[rank]
        assert agreed and not patched
        assert message.startswith(f"could not save checkpoint step00000004 in {ckpt_dir}: the disk is full (")
        assert " free there" in message and "step00000002 stays the latest checkpoint" in message
        assert "\n" not in message and "inline_container" not in message
    assert checkpoint.latest_tag(ckpt_dir) == "step00000002"
    assert not (ckpt_dir / "step00000004" / f"more_{fail_rank}.pt").exists()  # the rest of that save skipped
    assert checkpoint.problem_with(ckpt_dir / "step00000004") is not None


def _one_rank(init: str, run_dir: Path, engine: FakeEngine) -> BaseException | None:
    dist.init_process_group("gloo", init_method=init, rank=0, world_size=1)
    try:
        _save(run_dir, engine, 2)
    except SaveFailed as e:
        return e
    finally:
        dist.destroy_process_group()
    return None


def test_an_os_error_names_its_file_and_one_escaping_deepspeed_is_not_agreed(tmp_path):
    init = f"file://{tmp_path / 'rendezvous'}"
    full = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp_path / "x.pt"))
    e = _one_rank(init + "1", tmp_path / "a", FakeEngine(fail_on="model.pt", error=full))
    assert isinstance(e, SaveFailed) and e.agreed
    assert "the disk is full" in str(e) and f"rank 0: No space left on device: {tmp_path / 'x.pt'}" in str(e)
    assert "there is no earlier checkpoint" in str(e)
    # The recovery-script copy is guarded too; an error from a write we do not guard is not agreed.
    e = _one_rank(init + "2", tmp_path / "b", FakeEngine(copy_error=full))
    assert isinstance(e, SaveFailed) and e.agreed
    engine = FakeEngine()
    engine.save_checkpoint = lambda *a, **k: (_ for _ in ()).throw(full)  # type: ignore[method-assign]
    e = _one_rank(init + "3", tmp_path / "c", engine)
    assert isinstance(e, SaveFailed) and not e.agreed and "the disk is full" in str(e)
    # Anything that is not a write error is not ours to translate.
    engine = FakeEngine(fail_on="model.pt", error=ValueError("a bug"))
    with pytest.raises(ValueError, match="a bug"):
        _one_rank(init + "4", tmp_path / "d", engine)


def test_the_next_start_removes_the_unfinished_tag_and_says_so(tmp_path, capsys):
    ckpt_dir = checkpoint.checkpoint_dir(tmp_path)
    for tag, complete in (("step00000002", True), ("step00000004", False)):
        (ckpt_dir / tag).mkdir(parents=True)
        (ckpt_dir / tag / "model.pt").write_bytes(b"x" * 10)
        if complete:
            checkpoint._publish(ckpt_dir, tag, keep_last=2, layout={"dp_world_size": 1, "zero_stage": 0})
    topo = SimpleNamespace(dp_size=1, pipeline=1, tensor=1)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        point = checkpoint.find_resume(tmp_path, topo, zero_stage=0, precision="bf16")
    finally:
        dist.destroy_process_group()
    assert point.tag == "step00000002" and not point.universal
    assert not (ckpt_dir / "step00000004").exists() and (ckpt_dir / "step00000002").is_dir()
    lines = capsys.readouterr().out.splitlines()
    assert lines == [f"removed checkpoint {ckpt_dir / 'step00000004'}: its save did not finish "
                     f"(step00000002 is the latest)"]
