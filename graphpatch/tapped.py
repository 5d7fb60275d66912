"""Record what the model really feeds its sites, during one forward.

A tap is ``(path, method)``: the module at ``path`` and the method whose
arguments to keep (``__call__``, or ``as_linear`` for a tied head). For the
one reference forward, each tapped module is replaced by a recording copy
(``mark``: its own class behind a recording marker, the same arrays, so the
model's code and its ``isinstance`` checks see what they always see); the
originals are put back before anything else runs. Site checks then replay
the recorded inputs, in their real dtypes and shapes (and, for MoE, the real
expert indices).
"""

from collections.abc import Callable

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from graphpatch.contract import Recorded, Tap, mark_at, module_at, replace_at


class RecordsCall:
    """The marker on a tapped module whose calls are recorded."""

    record: Callable  # set by ``mark``: where each call's arguments go

    def __call__(self, *args, **kwargs):
        self.record((args, kwargs))
        return super().__call__(*args, **kwargs)  # type: ignore[misc]


class RecordsAsLinear:
    """The marker on a tied head (an embedding) whose ``as_linear`` is tapped."""

    record: Callable

    def as_linear(self, *args, **kwargs):
        self.record((args, kwargs))
        return super().as_linear(*args, **kwargs)  # type: ignore[misc]


MARKERS = {"__call__": RecordsCall, "as_linear": RecordsAsLinear}


def recording(model: nn.Module, taps: list[Tap], run: Callable[[], mx.array]):
    """Run ``run()`` with every tap recording; returns (its result, the
    calls each tap saw). Arrays are evaluated with the result."""
    held: list[tuple] = []
    recorded: Recorded = {}
    try:
        for path, method in dict.fromkeys(taps):
            calls = recorded.setdefault((path, method), [])
            held.append((path, module_at(model, path)))
            mark_at(model, path, MARKERS[method], record=calls.append)
        result = run()
    finally:
        for path, original in reversed(held):
            replace_at(model, path, original)
    leaves = tree_flatten(list(recorded.values()))
    mx.eval(result, [v for _, v in leaves if isinstance(v, mx.array)])
    return result, recorded


def inputs(recorded: Recorded, tap: Tap) -> list[tuple]:
    """The positional arguments of each recorded call of ``tap``."""
    return [args for args, _ in recorded.get(tap, [])]
