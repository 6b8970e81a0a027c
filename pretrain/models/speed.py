"""Speed switches applied to an unmodified timm Swin, keeping its state-dict layout.

- `sdpa_attention`: timm's own fused path of WindowAttention, which calls
  `F.scaled_dot_product_attention` with the relative position bias (and shift mask) as the
  attention mask instead of softmax(q k^T + bias) v in separate kernels.
- `compile`: regional `torch.compile` of the Swin block (the unit that repeats), so the
  window partition / shift / attention / MLP chain of a block is fused where the backend can.

How compile covers every block with few graphs: one compiled function per block class
(its `forward`, taking the block as an argument) serves every block of that class. Dynamo
lifts parameters and buffers to graph inputs, so blocks share a graph whenever what the
graph is specialized on agrees: tensor shapes (the stage's resolution and width), the shift
(Python ints), whether there is an attention mask, train / eval and grad mode. Two things
would still give one graph per block and are changed here: timm's `DropPath` keeps its rate
as a Python float, different in every block (the rate grows with depth), so it is replaced
by `StochasticDepth`, same computation with the rate in a tensor; and blocks whose rate is 0
hold an `nn.Identity` instead, which would be a different graph again, so they get a
`StochasticDepth` of rate 0 (only in a model that uses drop path at all). Neither holds
state, so the state dict stays timm's.

The compiled function becomes the block's *inner* forward: a recompute wrapper from
`parallel/activation_ckpt.py` (torch's or DeepSpeed's checkpoint) stays outside and calls it,
whatever order the two were applied in, so checkpointed blocks run compiled in the forward
pass and in the recompute. Sequential attention's chunking is inside the block and is traced
with it.

Both are config options (`speed.*`) whose defaults follow measurements (README, Performance).
"""

from __future__ import annotations

import types
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
import torch.nn as nn
from timm.layers import DropPath

from pretrain.models.blocks import set_block_forward, swin_blocks

DROP_PATHS = ("drop_path1", "drop_path2")

# Graphs one block shape may need: train / eval x grad on / off (DeepSpeed's checkpoint and
# evaluation run the forward without grad) x two batch sizes (the micro-batch and
# evaluation's). Dynamo's default limit (8 per code object) is shared by all shapes of a
# block class, so Swin-B (7 shapes) would run its later shapes eagerly.
GRAPHS_PER_SHAPE = 8


class StochasticDepth(nn.Module):
    """timm's `DropPath` (per-sample drop of a residual branch) with the rate held in a tensor.

    As a tensor the rate is a graph input, not a constant baked into the graph, so blocks with
    different rates share one compiled graph. The masks are drawn from a different kernel than
    timm's (a tensor probability), so they are not the same draws, only the same distribution.
    """

    def __init__(self, drop_prob: float = 0.0, scale_by_keep: bool = True, device: Any = None):
        super().__init__()
        self.scale_by_keep = scale_by_keep
        # Not persistent: timm's DropPath has no state, and the state dict stays timm's.
        self.register_buffer("keep_prob", torch.empty((), dtype=torch.float32, device=device), persistent=False)
        self.drop_prob = drop_prob

    @property
    def drop_prob(self) -> float:
        return self._drop_prob

    @drop_prob.setter
    def drop_prob(self, value: float) -> None:
        # Filled in place: a rate schedule changes the input of the graph, not the graph.
        self._drop_prob = float(value)
        with torch.no_grad():
            self.keep_prob.fill_(1.0 - self._drop_prob)

    def _apply(self, fn: Callable, recurse: bool = True) -> "StochasticDepth":
        super()._apply(fn, recurse)
        # `.to(torch.bfloat16)` casts float buffers (0.9 would become 0.8984, another rate than
        # timm's) and `to_empty()` leaves them uninitialized: rebuild the rate in fp32 where it went.
        self.keep_prob = torch.full((), 1.0 - self._drop_prob, dtype=torch.float32, device=self.keep_prob.device)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return x
        keep = self.keep_prob
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        if self.scale_by_keep:
            mask = mask / torch.where(keep > 0, keep, 1.0)  # timm skips the division when nothing is kept
        return x * mask

    def extra_repr(self) -> str:
        return f"drop_prob={round(self._drop_prob, 3):0.3f}"


def use_tensor_drop_path_rates(blocks: list[nn.Module]) -> int:
    """Replace the blocks' DropPath / Identity branches by `StochasticDepth`; returns how many.

    Nothing changes in a model without drop path: its blocks all hold Identity already.
    """
    if not any(isinstance(getattr(b, n, None), DropPath) for b in blocks for n in DROP_PATHS):
        return 0
    replaced = 0
    for block in blocks:
        device = next(block.parameters()).device
        for name in DROP_PATHS:
            old = getattr(block, name)
            if isinstance(old, DropPath):
                new = StochasticDepth(old.drop_prob, old.scale_by_keep, device)
            elif isinstance(old, nn.Identity):
                new = StochasticDepth(0.0, True, device)
            else:
                continue
            setattr(block, name, new.train(old.training))
            replaced += 1
    return replaced


def block_shape(block: nn.Module) -> tuple:
    """What a block's graph is specialized on, besides the batch size and the modes."""
    # Sequential attention chunks whole stages, so the resolution tells chunked blocks apart too.
    return (type(block).__name__, tuple(block.input_resolution), block.dim, block.attn.num_heads,
            tuple(block.window_size), tuple(block.shift_size))


class _CountingBackend:
    """A torch.compile backend that counts the graphs it is given before handing them on."""

    def __init__(self, backend: str):
        self.backend = torch._dynamo.lookup_backend(backend)
        self.graphs = 0

    def __call__(self, graph: torch.fx.GraphModule, example_inputs: list) -> Callable:
        self.graphs += 1
        return self.backend(graph, example_inputs)


@dataclass
class CompileSummary:
    """What `compile_swin_blocks` did, for the trainer's log line after the first (compiling) step."""

    blocks: int  # blocks whose forward runs a compiled graph
    shapes: int  # distinct block shapes: one graph each per mode (train / eval, grad / no grad)
    recompile_limit: int  # graphs allowed per block class before dynamo falls back to eager
    _backends: list[_CountingBackend] = field(default_factory=list, repr=False)

    @property
    def graphs(self) -> int:
        """Graphs compiled so far (grows on first use of each shape and mode)."""
        return sum(b.graphs for b in self._backends)

    def describe(self, first_step_s: Optional[float] = None) -> str:
        line = f"compile: {self.blocks} Swin blocks -> {self.graphs} graphs ({self.shapes} distinct block shapes)"
        return line if first_step_s is None else f"{line}, first step {first_step_s:.1f} s"


def compile_swin_blocks(model: nn.Module, backend: str = "inductor") -> CompileSummary:
    """Compile every Swin block of `model`, one graph per distinct block shape (and mode), in place."""
    blocks = swin_blocks(model)
    use_tensor_drop_path_rates(blocks)
    backends: dict[type, _CountingBackend] = {}
    compiled: dict[type, Callable] = {}
    for block in blocks:
        kind = type(block)
        if kind not in compiled:
            backends[kind] = _CountingBackend(backend)
            # Static shapes: after a second resolution dynamo would otherwise recompile the block
            # shape-generic, which compiles far slower (minutes on a CPU) and runs slower.
            compiled[kind] = torch.compile(kind.forward, backend=backends[kind], dynamic=False)
        set_block_forward(block, types.MethodType(compiled[kind], block))
    shapes = {block_shape(b) for b in blocks}
    most_per_class = max((sum(s[0] == kind.__name__ for s in shapes) for kind in compiled), default=0)
    # The limit counts graphs per code object, i.e. per block class; only ever raised.
    limit = max(torch._dynamo.config.recompile_limit, GRAPHS_PER_SHAPE * most_per_class)
    torch._dynamo.config.recompile_limit = limit
    return CompileSummary(len(blocks), len(shapes), limit, list(backends.values()))


def _window_attentions(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if hasattr(m, "fused_attn") and hasattr(m, "relative_position_bias_table")]


def apply_speedups(model: nn.Module, sdpa_attention: bool, compile_blocks: bool,
                   backend: str = "inductor") -> Optional[CompileSummary]:
    """Switch `model` (a timm Swin, or a module holding one) to the chosen fast paths, in place.

    Returns what compiling did (None without compile), for the trainer to report.
    """
    for attention in _window_attentions(model):
        attention.fused_attn = sdpa_attention
    return compile_swin_blocks(model, backend) if compile_blocks else None
