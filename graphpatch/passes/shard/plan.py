"""The plan of any block the pass finds: attention, MLP, MoE."""

import mlx.nn as nn

from graphpatch.passes.shard.attention import plan_attention
from graphpatch.passes.shard.blocks import (
    DENSE,
    EXPERTS,
    FUSED_GLU,
    Plan,
    experts_in,
    found,
    fused_name,
    mlp_names,
)
from graphpatch.passes.shard.split import even, in_dims, out_dims, why_not_split

LAYOUTS = ("segments", "heads")

NORM_OVER_UNITS = "{name} normalizes the whole {width}-wide hidden layer"
PARTS_DIFFER = "{a} and {b} have {x} and {y} outputs"
RECURRENT = (
    "a recurrent block ({cls}: a convolution and a state over its channels): "
    "the pass does not know its segments; kept whole on every rank"
)
MOE_SHARDED = "already sharded (its sharding_group is set: the model's own shard())"


def layouts(module: nn.Module, kind: str) -> tuple[str, ...]:
    """The layouts a block's fused projection may have: its parts one after
    the other (phi3's ``qkv_proj`` and ``gate_up_proj``), or whole heads
    (gpt_neox's q, k, v per head, internlm2's per kv group), which a split of
    its rows by rank keeps whole. Nothing in the tree says which: a
    one-process check picks."""
    fused = fused_name(module) if kind == "attention" else FUSED_GLU in module
    return LAYOUTS if kind in ("attention", "mlp") and fused else LAYOUTS[:1]


def plan(module: nn.Module, kind: str, n: int, layout: str = "segments") -> Plan | str:
    """The block's plan over ``n`` ranks, or the reason it has none."""
    if kind == "recurrent":
        return RECURRENT.format(cls=type(module).__name__)
    if kind == "attention":
        return plan_attention(module, n, layout)
    if kind == "mlp":
        return plan_mlp(module, n, layout=layout)
    return _moe(module, n)


def plan_mlp(
    module: nn.Module,
    n: int,
    own: bool = True,
    prefix: str = "",
    layout: str = "segments",
) -> Plan | str:
    ups, down = found(mlp_names(module, (*DENSE, *EXPERTS)))
    p = Plan(n, layout=layout)
    rows = {name: out_dims(module[name]) for name in ups}
    for name in ups:
        if rows[name] != rows[ups[0]]:
            x, y = rows[ups[0]], rows[name]
            return PARTS_DIFFER.format(a=ups[0], b=name, x=x, y=y)
        if why := why_not_split(name, module[name], "rows", n):
            return why
        p.parts[prefix + name] = ("rows", even(rows[name], n), own)
        if name == FUSED_GLU and layout == "segments":  # each rank: gate and up
            half = [r[0] for r in even(rows[name] // 2, n)]
            every = [
                [(a, b), (a + rows[name] // 2, b + rows[name] // 2)] for a, b in half
            ]
            p.parts[prefix + name] = ("rows", every, own)
    if why := why_not_split(down, module[down], "cols", n):
        return why
    p.parts[prefix + down] = ("cols", even(in_dims(module[down]), n), own)
    for name, child in module.items():
        weight = child.get("weight") if isinstance(child, nn.Module) else None
        if name not in (*ups, down) and weight is not None:
            if weight.shape[-1] == rows[ups[0]]:
                return NORM_OVER_UNITS.format(name=name, width=weight.shape[-1])
    return p


def _moe(module: nn.Module, n: int) -> Plan | str:
    if getattr(module, "sharding_group", None) is not None:
        return MOE_SHARDED
    experts = found(experts_in(module))
    p = plan_mlp(module[experts], n, own=False, prefix=experts + ".")
    if isinstance(p, str):
        return f"{experts}: {p}"
    p.summed = True
    for name, child in module.items():
        if name != experts and isinstance(child, nn.Module):
            if mlp_names(child, DENSE):  # shared experts, summed with the rest
                shared = plan_mlp(child, n, own=False, prefix=name + ".")
                if isinstance(shared, str):
                    return f"{name}: {shared}"
                p.parts.update(shared.parts)
    return p
