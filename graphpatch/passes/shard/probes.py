"""What a block's check runs it on: the calls the model really made of it in
the reference forward (arguments and keywords: masks, position ids), and for
MoE one more input long enough to reach SwitchGLU's sorted path."""

from typing import Any

import mlx.core as mx
import mlx.nn as nn

from graphpatch.compare import dtype_name
from graphpatch.contract import Recorded, Tap
from graphpatch.passes.shard.blocks import (
    DENSE,
    EXPERTS,
    QKV,
    experts_in,
    found,
    fused_name,
    mlp_names,
)
from graphpatch.passes.shard.split import in_dims

Call = tuple[tuple[Any, ...], dict[str, Any]]  # a call's args and kwargs
SORTED = 64  # SwitchGLU sorts tokens by expert from this many indices on
NOT_ONE_ARRAY = (
    "the block returns {what}, not one array: its rank-local parts cannot be checked"
)


def width(module: nn.Module, kind: str) -> int:
    """The block's input width (its first projection's inputs)."""
    if kind == "attention":
        return in_dims(module[fused_name(module) or QKV[0]])
    if kind == "moe":
        module = module[found(experts_in(module))]
        return in_dims(module[found(mlp_names(module, EXPERTS))[0][0]])
    return in_dims(module[found(mlp_names(module, DENSE))[0][0]])


def synthetic(
    module: nn.Module, kind: str, dtype: mx.Dtype, shape: tuple[int, ...], seed: int
) -> Call:
    x = mx.random.normal((*shape, width(module, kind)), key=mx.random.key(seed))
    return (x.astype(dtype),), {}


def block_inputs(
    module: nn.Module, path: str, kind: str, recorded: Recorded, dtype: mx.Dtype | None
) -> list[Call]:
    """The recorded calls of the block at ``path``, else a synthetic one."""
    calls = list(recorded.get((path, "__call__"), []))
    if calls:
        dtype = calls[0][0][0].dtype if calls[0][0] else dtype
    else:
        calls.append(synthetic(module, kind, dtype, (2, 8), 0))
    if kind == "moe":
        calls.append(synthetic(module, kind, dtype, (2, SORTED), 1))
    return calls


def outputs(block: nn.Module, inputs: list[Call]) -> list[mx.array]:
    """The block's output on each call; one array each, or TypeError."""
    found = [block(*args, **kwargs) for args, kwargs in inputs]
    for out in found:
        if not isinstance(out, mx.array):
            raise TypeError(NOT_ONE_ARRAY.format(what=type(out).__name__))
    return found


def taps(blocks: list[tuple[str, str]]) -> list[Tap]:
    """Each block's calls, and those of the layer holding it (``held_in``)."""
    layers = dict.fromkeys(path.rpartition(".")[0] for path, _ in blocks)
    return [(path, "__call__") for path in [*(p for p, _ in blocks), *layers] if path]


def held_in(path: str, recorded: Recorded, fallback: str) -> str:
    """The dtype of the hidden state a block's output is added to: what the
    layer holding it passes on, read from the next layer's input, or from its
    own where it is the last (Gemma: float16, under float32 blocks)."""
    layer = path.rpartition(".")[0]
    head, _, index = layer.rpartition(".")
    after = [f"{head}.{int(index) + 1}"] if index.isdigit() else []
    for tap in [*after, layer]:
        calls = recorded.get((tap, "__call__"), [])
        if calls and calls[0][0] and isinstance(calls[0][0][0], mx.array):
            return dtype_name(calls[0][0][0].dtype)
    return fallback
