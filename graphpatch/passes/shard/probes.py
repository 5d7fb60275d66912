"""What a block's check runs it on: the calls the model really made of it in
the reference forward (arguments and keywords: masks, position ids), and for
MoE one more input long enough to reach SwitchGLU's sorted path."""

import mlx.core as mx
import mlx.nn as nn

from graphpatch.passes.shard.blocks import (
    DENSE,
    EXPERTS,
    QKV,
    experts_in,
    fused_name,
    mlp_names,
)
from graphpatch.passes.shard.split import in_dims

SORTED = 64  # SwitchGLU sorts tokens by expert from this many indices on


def width(module: nn.Module, kind: str) -> int:
    """The block's input width (its first projection's inputs)."""
    if kind == "attention":
        return in_dims(module[fused_name(module) or QKV[0]])
    if kind == "moe":
        module = module[experts_in(module)]
        return in_dims(module[mlp_names(module, EXPERTS)[0][0]])
    return in_dims(module[mlp_names(module, DENSE)[0][0]])


def synthetic(module: nn.Module, kind: str, dtype, shape: tuple, seed: int) -> tuple:
    x = mx.random.normal((*shape, width(module, kind)), key=mx.random.key(seed))
    return (x.astype(dtype),), {}


def block_inputs(
    module: nn.Module, path: str, kind: str, recorded: dict, dtype
) -> list[tuple[tuple, dict]]:
    """The recorded calls of the block at ``path``, else a synthetic one."""
    calls = list(recorded.get((path, "__call__"), []))
    if calls:
        dtype = calls[0][0][0].dtype if calls[0][0] else dtype
    else:
        calls.append(synthetic(module, kind, dtype, (2, 8), 0))
    if kind == "moe":
        calls.append(synthetic(module, kind, dtype, (2, SORTED), 1))
    return calls


def taps(blocks: list[tuple[str, str]]) -> list[tuple[str, str]]:
    return [(path, "__call__") for path, _ in blocks]
