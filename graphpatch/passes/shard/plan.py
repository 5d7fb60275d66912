"""The plan of any block the pass finds: attention, MLP, MoE."""

import mlx.core as mx
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
from graphpatch.passes.shard.heads import HEADS_NOT_DIVISIBLE
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
        return plan_delta(module, n)
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


# A gated delta net laid out as qwen3.5's: q, k and v one after the other in
# in_proj_qkv and in the channels of its depthwise conv1d; z, b, a and the
# per-head dt_bias and A_log by value heads; out_proj by its inputs.
DELTA = ("in_proj_qkv", "in_proj_z", "in_proj_b", "in_proj_a", "conv1d", "out_proj")
DELTA_SIZES = ("num_k_heads", "num_v_heads", "key_dim", "value_dim", "conv_dim")


def plan_delta(module: nn.Module, n: int) -> Plan | str:
    """A recurrent block's plan, where its segments are known (above)."""
    sizes = {k: vars(module).get(k) for k in DELTA_SIZES}
    known = all(isinstance(module.get(k), nn.Module) for k in DELTA)
    if not known or any(type(v) is not int for v in sizes.values()):
        return RECURRENT.format(cls=type(module).__name__)
    hk, hv, kd, vd, channels = (int(v) for v in sizes.values())
    if hk % n or hv % n:
        return HEADS_NOT_DIVISIBLE.format(heads=f"{hk} k and {hv} v", n=n)
    conv = module["conv1d"]
    if channels != 2 * kd + vd or conv.weight.shape[0] != channels:
        return RECURRENT.format(cls=type(module).__name__)
    segments = [even(kd, n), even(kd, n), even(vd, n)]
    offsets = [0, kd, 2 * kd]
    pieces = list(zip(segments, offsets, strict=True))
    every = [[(a + o, b + o) for seg, o in pieces for a, b in seg[r]] for r in range(n)]
    p = Plan(n, counts={k: int(v) // n for k, v in sizes.items()})
    p.counts["conv1d.groups"] = conv.groups // n
    rows = {"in_proj_qkv": every, "in_proj_z": even(vd, n)}
    rows |= {"in_proj_b": even(hv, n), "in_proj_a": even(hv, n)}
    for name, split in rows.items():
        if why := why_not_split(name, module[name], "rows", n):
            return why
        p.parts[name] = ("rows", split, True)
    if why := why_not_split("out_proj", module["out_proj"], "cols", n):
        return why
    p.parts["out_proj"] = ("cols", even(vd, n), True)
    p.parts["conv1d"] = ("heads", every, False)  # its channels, on axis 0
    for name, array in module.items():
        if isinstance(array, mx.array) and array.ndim and array.shape[0] == hv:
            p.arrays[name] = even(hv, n)
    return p
