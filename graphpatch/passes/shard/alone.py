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
from graphpatch.passes.shard.blocks import find_blocks, local, plan
from graphpatch.passes.shard.probes import block_inputs, outputs, taps
from graphpatch.tapped import recording


@dataclass
class Checked:
    path: str
    kind: str
    reason: str | None = None  # None: sharded and within tolerance
    max_error: float | None = None
    tolerance: float | None = None


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
    group = mx.distributed.init()
    results = []
    for path, kind in find_blocks(model, moe_only):
        result = Checked(path, kind)
        results.append(result)
        module = module_at(model, path)
        p = plan(module, kind, n)
        if isinstance(p, str):
            result.reason = p
            continue
        inputs = block_inputs(module, path, kind, recorded, dtype)
        try:
            whole = outputs(module, inputs)
        except Exception as e:
            result.reason = f"cannot run the block on a probe: {e}"
            continue
        try:
            ranks = [
                outputs(local(module, p, r, group, True), inputs) for r in range(n)
            ]
            cmp = compare(whole, [sum(parts) for parts in zip(*ranks, strict=True)])
        except Exception as e:
            result.reason = f"the sharded block fails on the probe: {e}"
            continue
        result.max_error, result.tolerance = cmp.max_error, cmp.tolerance
        if not cmp.ok:
            result.reason = (
                f"sharded off by {cmp.max_error:.3g} (tolerance {cmp.tolerance:.3g})"
            )
    return results
