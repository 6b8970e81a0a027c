"""parallel/comm.py: the one home of cross-rank reductions of our own values, and its device choice."""

from __future__ import annotations

import re

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pretrain.parallel import comm
from tests.helpers import REPO

COLLECTIVE = re.compile(r"\b(?:dist|distributed)\.(all_reduce|all_gather\w*|reduce_scatter\w*|reduce|broadcast\w*|"
                        r"gather\w*|scatter\w*|all_to_all\w*|send|recv|isend|irecv)\(")
IMPORTED = re.compile(r"from torch\.distributed import .*\b(all_reduce|broadcast|all_gather|reduce)\b")


def test_no_module_but_comm_calls_a_collective_on_its_own_tensors():
    offenders = []
    for path in sorted([*REPO.glob("pretrain/**/*.py"), *REPO.glob("launch/**/*.py")]):
        if path == REPO / "pretrain" / "parallel" / "comm.py":
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if COLLECTIVE.search(line) or IMPORTED.search(line):
                offenders.append(f"{path.relative_to(REPO)}:{number}: {line.strip()}")
    assert not offenders, "collectives outside pretrain/parallel/comm.py:\n" + "\n".join(offenders)


def test_the_rule_catches_a_bare_collective():
    assert COLLECTIVE.search("    dist.all_reduce(torch.tensor([1.0]))")
    assert COLLECTIVE.search("torch.distributed.broadcast_object_list(x, src=0)")
    assert not COLLECTIVE.search("dist.barrier()")


def test_nccl_groups_reduce_on_this_ranks_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    assert comm.device_for_backend("nccl") == torch.device("cuda", 3)
    assert comm.device_for_backend("cpu:gloo,cuda:nccl") == torch.device("cuda", 3)
    assert comm.device_for_backend("gloo") == torch.device("cpu")


def test_without_a_process_group_values_stay_local():
    assert not dist.is_initialized()
    t = comm.all_reduce([1.0, 2.5])
    assert t.device == comm.device() == torch.device("cpu") and t.dtype == torch.float64
    assert comm.to_host(t) == [1.0, 2.5]
    assert comm.broadcast_object({"tag": "step1"}) == {"tag": "step1"}
    copy = comm.HostCopy(torch.tensor([0.0, 1.0, 2.0]))
    assert copy.ready() and copy.values() == [0.0, 1.0, 2.0]


def _two_ranks(rank: int, init: str, results: dict) -> None:
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    mine = torch.tensor([1.0 + rank, 10.0 * rank])
    summed = comm.all_reduce(mine)
    most = comm.all_reduce([rank + 0.5], op="max")
    grads = [torch.full((3,), float(rank + 1)), torch.full((2, 2), 4.0 * rank)]
    comm.average_(grads, None, 2, torch.float32, bucket_size=2)  # buckets smaller than the tensors
    chosen = comm.broadcast_object({"tag": f"from rank {rank}"})
    results[rank] = (comm.to_host(summed), mine.tolist(), comm.to_host(most),
                     [g.tolist() for g in grads], chosen)
    dist.barrier()
    dist.destroy_process_group()


def test_two_ranks_reduce_average_and_agree(tmp_path):
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_two_ranks, args=(f"file://{tmp_path / 'rendezvous'}", results), nprocs=2)
        results = dict(results)
    for rank in (0, 1):
        summed, mine, most, grads, chosen = results[rank]
        assert summed == [3.0, 10.0]
        assert mine == [1.0 + rank, 10.0 * rank]  # the caller's tensor is left as it was
        assert most == [1.5]
        assert grads == [[1.5, 1.5, 1.5], [[2.0, 2.0], [2.0, 2.0]]]
        assert chosen == {"tag": "from rank 0"}
