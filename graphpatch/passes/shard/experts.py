"""shard:experts, expert parallelism: each rank holds E/N whole experts.

The router stays whole on every rank and picks among all experts; a rank runs
the picks that fall on its experts (renumbered to its own) and gives zeros for
the rest, and the block sums every rank's output once. Nothing is split
inside an expert, so no quantization group is ever cut. Shared experts are
split on their hidden dim as in plain shard (every rank runs them).
"""

import mlx.nn as nn

from graphpatch.passes.shard.blocks import (
    DENSE,
    EXPERTS,
    Plan,
    experts_in,
    found,
    mlp_names,
)
from graphpatch.passes.shard.plan import MOE_SHARDED, plan_mlp
from graphpatch.passes.shard.split import even

EXPERTS_NOT_DIVISIBLE = "{experts} experts not divisible by {n} ranks"


def plan_experts(module: nn.Module, n: int) -> Plan | str:
    """The MoE block's expert-parallel plan over ``n`` ranks, or the reason."""
    if getattr(module, "sharding_group", None) is not None:
        return MOE_SHARDED
    name = found(experts_in(module))
    switch = module[name]
    ups, down = found(mlp_names(switch, EXPERTS))
    count = switch[down].weight.shape[0]
    if count % n:
        return EXPERTS_NOT_DIVISIBLE.format(experts=count, n=n)
    p = Plan(n, summed=True, experts=name)
    for part in (*ups, down):
        p.parts[f"{name}.{part}"] = ("heads", even(count, n), False)
    for key, child in module.items():
        if key != name and isinstance(child, nn.Module) and mlp_names(child, DENSE):
            shared = plan_mlp(child, n, own=False, prefix=key + ".")
            if isinstance(shared, str):
                return f"{key}: {shared}"
            p.parts.update(shared.parts)
    return p
