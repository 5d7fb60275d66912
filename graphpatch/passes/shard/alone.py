"""Shard checked in one process: every rank's block built here, run on the
same inputs, and their outputs summed, which is the maths of the all_sum the
ranks would do (a sharded-to-all bias counted once, on rank 0). No collective
runs and nothing in mlx is replaced; it is how the coverage table checks
every architecture over ``n`` ranks without starting them.
"""

from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn

from graphpatch.compare import compare
from graphpatch.contract import Recorded, module_at
from graphpatch.passes.shard.blocks import Plan, find_blocks
from graphpatch.passes.shard.plan import layouts, plan
from graphpatch.passes.shard.probes import Call, block_inputs, outputs, taps
from graphpatch.passes.shard.rank import local
from graphpatch.tapped import recording


@dataclass
class Checked:
    path: str
    kind: str
    reason: str | None = None  # None: sharded and within tolerance
    max_error: float | None = None
    tolerance: float | None = None
    layout: str = "segments"


def cover_alone(model: nn.Module, n: int, tokens: list[list[int]]) -> list[Checked]:
    """``check_alone`` on the inputs one forward of ``tokens`` feeds each
    block (a block the forward does not reach gets a float32 input)."""
    _, recorded = recording(
        model, taps(find_blocks(model, False)), lambda: model(mx.array(tokens))
    )
    return check_alone(model, n, recorded, mx.float32)


def check_alone(
    model: nn.Module,
    n: int,
    recorded: Recorded,
    dtype: mx.Dtype,
    moe_only: bool = False,
) -> list[Checked]:
    """Every block of ``model`` sharded over ``n`` simulated ranks, checked
    against the unsharded block on the inputs ``recorded`` for it."""
    results = []
    for path, kind in find_blocks(model, moe_only):
        module = module_at(model, path)
        inputs = block_inputs(module, path, kind, recorded, dtype)
        results.append(Checked(path, kind, *best(module, kind, n, inputs)))
    return results


def best(
    module: nn.Module, kind: str, n: int, inputs: list[Call]
) -> tuple[str | None, float | None, float | None, str]:
    """The first of the block's layouts whose ranks sum to it: (None, its
    error, tolerance, layout); or the last layout's reason."""
    found: tuple[str | None, float | None, float | None, str] = ("", None, None, "")
    for layout in layouts(module, kind):
        p = plan(module, kind, n, layout)
        if isinstance(p, str):
            found = (p, None, None, layout)
            continue
        found = (*summed(module, p, inputs), layout)
        if found[0] is None:
            break
    return found


def summed(
    module: nn.Module, p: Plan, inputs: list[Call]
) -> tuple[str | None, float | None, float | None]:
    """(reason or None, max error, tolerance) of the sum of every rank's
    block against the block."""
    try:
        whole = outputs(module, inputs)
    except Exception as e:
        return f"cannot run the block on a probe: {e}", None, None
    group = mx.distributed.init()
    try:
        ranks = [outputs(local(module, p, r, group, True), inputs) for r in range(p.n)]
        cmp = compare(whole, [sum(parts) for parts in zip(*ranks, strict=True)])
    except Exception as e:
        return f"the sharded block fails on the probe: {e}", None, None
    if not cmp.ok:
        why = f"sharded off by {cmp.max_error:.3g} (tolerance {cmp.tolerance:.3g})"
        return why, cmp.max_error, cmp.tolerance
    return None, cmp.max_error, cmp.tolerance
