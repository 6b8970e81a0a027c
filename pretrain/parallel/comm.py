"""Every cross-rank reduction of our own values: loss sums, finite and stop flags, counters, eval sums.

An NCCL process group only reduces CUDA tensors and gloo only CPU tensors, so a value made
with a bare `torch.tensor(...)` crashes a GPU run in its first collective. The helpers
here place each value on the communication device of the default group (`cuda:<this
rank's device>` under NCCL, the CPU under gloo) and hand back device tensors; host values
come back only when asked (`to_host`, `HostCopy`), so the training step never waits for
the GPU to drain. No other module of ours calls a torch.distributed collective on a
tensor it made itself (tests/unit/test_comm.py checks the source tree).
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.distributed as dist

OPS = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}


def device_for_backend(backend: str) -> torch.device:
    """Where tensors for a collective on a group with `backend` must live."""
    if "nccl" in backend:
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def device() -> torch.device:
    """The communication device of the default process group (the CPU when none is started)."""
    if not dist.is_available() or not dist.is_initialized():
        return torch.device("cpu")
    return device_for_backend(str(dist.get_backend()))


def tensor(values: Sequence[float] | float, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Host numbers as a 1-D tensor on the communication device."""
    return torch.tensor(values if isinstance(values, Sequence) else [values], dtype=dtype, device=device())


def all_reduce(values: torch.Tensor | Sequence[float] | float, op: str = "sum", group: Any = None,
               dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """`values` reduced over `group` (default: every rank), as a tensor on the communication device.

    A tensor elsewhere (a CPU sum, a CUDA loss under gloo) is copied there first; the caller's
    tensor is never changed.
    """
    if isinstance(values, torch.Tensor):
        t = values.detach().to(device(), copy=True).reshape(-1)
    else:
        t = tensor(values, dtype)
    if dist.is_initialized():
        dist.all_reduce(t, op=OPS[op], group=group)
    return t


def average_(tensors: list[torch.Tensor], group: Any, size: int, dtype: torch.dtype, bucket_size: int) -> None:
    """Average `tensors` in place over `group` (`size` ranks), sent in `dtype`, `bucket_size` elements at a time.

    For gradients our own optimizer holds (bf16 without ZeRO): DeepSpeed's reduction is off there.
    """
    bucket: list[torch.Tensor] = []
    filled = 0
    for t in [*tensors, None]:
        if t is not None:
            bucket.append(t)
            filled += t.numel()
        if bucket and (t is None or filled >= bucket_size):
            flat = torch.cat([b.reshape(-1).to(dtype) for b in bucket])
            dist.all_reduce(flat, group=group)
            flat.div_(size)
            pieces = flat.split([b.numel() for b in bucket])
            torch._foreach_copy_(bucket, [piece.view_as(b) for piece, b in zip(pieces, bucket)])
            bucket, filled = [], 0


def to_host(t: torch.Tensor) -> list[float]:
    """The values of `t` on the host (waits for the device: for log steps, not the training step)."""
    return t.detach().double().cpu().reshape(-1).tolist()


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """`obj` of rank `src` on every rank (picklable, small: a decision, not data)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=src, device=device())
    return holder[0]


class HostCopy:
    """A small device tensor copied to host memory in the background, read later without a stall.

    On CUDA the copy goes to page-locked memory with `non_blocking=True` and an event marks
    its end; `ready()` asks without waiting and `values()` waits only for that copy.
    """

    def __init__(self, t: torch.Tensor):
        t = t.detach().reshape(-1)
        self.event = None
        if t.is_cuda:
            self.host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
            self.host.copy_(t, non_blocking=True)
            self.event = torch.cuda.Event()
            self.event.record()
        else:
            self.host = t.clone()

    def ready(self) -> bool:
        return self.event is None or self.event.query()

    def values(self) -> list[float]:
        if self.event is not None:
            self.event.synchronize()
        return self.host.double().tolist()
