"""One fused matmul serving two callers: what fuse_glu puts in place of a
GLU's gate_proj and up_proj, so the GLU's own ``__call__`` runs unchanged;
and joining two layers on the output axis, and splitting them back.
"""

import weakref

import mlx.core as mx
import mlx.nn as nn

from graphpatch.contract import rebuilt


class FusedCall:
    """The one fused matmul behind a GLU's two halves.

    The first half called computes ``owner.gate_up_proj`` once and keeps the
    other half until the sibling asks for it with the very same arguments; any
    other call computes its own fused matmul, so a ``__call__`` that feeds gate
    and up different inputs stays correct, only slower. The owner is looked up
    on each call, so a later ``nn.quantize`` of ``gate_up_proj`` is honoured.
    """

    def __init__(self, owner: nn.Module, split: int):
        self.owner = weakref.ref(owner)
        self.split = split
        self.pending = None

    def half(self, index: int, args: tuple, kwargs: dict) -> mx.array:
        pending, self.pending = self.pending, None
        if pending is not None and _same_call(pending, index, args, kwargs):
            return pending[3]
        out = self.owner().gate_up_proj(*args, **kwargs)
        halves = mx.split(out, [self.split], axis=-1)
        self.pending = (1 - index, args, kwargs, halves[1 - index])
        return halves[index]


def _same_call(pending: tuple, index: int, args: tuple, kwargs: dict) -> bool:
    want, old_args, old_kwargs, _ = pending
    return (
        want == index
        and len(args) == len(old_args)
        and all(a is b for a, b in zip(args, old_args, strict=True))
        and old_kwargs.keys() == kwargs.keys()
        and all(old_kwargs[k] is v for k, v in kwargs.items())
    )


class GLUHalf(nn.Module):
    """Stands where gate_proj (index 0) or up_proj (index 1) stood."""

    def __init__(self, call: FusedCall, index: int):
        super().__init__()
        self.call = call
        self.index = index

    def __call__(self, *args, **kwargs) -> mx.array:
        return self.call.half(self.index, args, kwargs)


def output_axis(key: str, array: mx.array) -> int:
    # bias is (..., out); weight, scales, biases are (..., out, in)
    return array.ndim - 1 if key == "bias" else array.ndim - 2


def without(shape: tuple, axis: int) -> tuple:
    return shape[:axis] + shape[axis + 1 :]


def joined(gate: nn.Module, up: nn.Module) -> nn.Module:
    """One layer of ``gate``'s kind holding [gate; up] on the output axis."""
    fused = rebuilt(gate)
    for key in gate:
        if key != "global_scale":
            fused[key] = mx.concatenate(
                [gate[key], up[key]], axis=output_axis(key, gate[key])
            )
    return fused


def rows(key: str, array: mx.array, start: int, stop: int | None) -> mx.array:
    """The output rows ``start:stop`` of one array of a joined layer."""
    if key == "global_scale":
        return array  # one scale for both halves (fuse_glu checks they agree)
    index = [slice(None)] * array.ndim
    index[output_axis(key, array)] = slice(start, stop)
    return array[tuple(index)]


def part(fused: nn.Module, start: int, stop: int | None) -> nn.Module:
    """The output rows ``start:stop`` of a joined layer, as a layer."""
    part = rebuilt(fused)
    for key in fused:
        part[key] = rows(key, fused[key], start, stop)
    return part
