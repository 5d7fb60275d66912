"""Record what the model really feeds its sites, during one forward.

A tap is ``(path, method)``: the module at ``path`` and the method whose
arguments to keep (``__call__``, or ``as_linear`` for a tied head). For the
one reference forward, each tapped module is replaced by a recording copy (a
subclass of its own class holding the same arrays, so the model's code and
its ``isinstance`` checks see what they always see); the originals are put
back before anything else runs. Site checks then replay the recorded inputs,
in their real dtypes and shapes (and, for MoE, the real expert indices).
"""

import functools
from collections.abc import Callable

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from graphpatch.contract import parent_and_key, rebuilt

Tap = tuple[str, str]
Recorded = dict[Tap, list[tuple[tuple, dict]]]


@functools.cache
def _recording_class(cls: type, method: str) -> type:
    original = getattr(cls, method)

    def record(self, *args, **kwargs):
        vars(self)["graphpatch_calls"].append((args, kwargs))
        return original(self, *args, **kwargs)

    return type(f"Recording{cls.__name__}", (cls,), {method: record})


def recording(model: nn.Module, taps: list[Tap], run: Callable[[], mx.array]):
    """Run ``run()`` with every tap recording; returns (its result, the
    calls each tap saw). Arrays are evaluated with the result."""
    held: list[tuple] = []
    recorded: Recorded = {}
    try:
        for path, method in dict.fromkeys(taps):
            parent, key = parent_and_key(model, path)
            original = parent[key]
            copy = rebuilt(original, _recording_class(original.__class__, method))
            vars(copy)["graphpatch_calls"] = recorded.setdefault((path, method), [])
            held.append((parent, key, original))
            parent[key] = copy
        result = run()
    finally:
        for parent, key, original in reversed(held):
            parent[key] = original
    leaves = tree_flatten(list(recorded.values()))
    mx.eval(result, [v for _, v in leaves if isinstance(v, mx.array)])
    return result, recorded


def inputs(recorded: Recorded, tap: Tap) -> list[tuple]:
    """The positional arguments of each recorded call of ``tap``."""
    return [args for args, _ in recorded.get(tap, [])]
