"""An attention block's plan: its heads over the ranks.

q, k and v (separate, fused, or MLA's latent projections) by heads, the
output projection by its inputs, per-head gates and arrays with q, norms over
one head whole; a norm over every head, or a part the pass cannot place, is
the reason there is no plan.
"""

import mlx.core as mx
import mlx.nn as nn

from graphpatch.passes.shard import heads as counts
from graphpatch.passes.shard.blocks import (
    DENSE,
    QKV,
    Plan,
    found,
    fused_name,
    latent_q,
    out_name,
)
from graphpatch.passes.shard.heads import Heads
from graphpatch.passes.shard.split import (
    Ranges,
    even,
    in_dims,
    out_dims,
    why_not_split,
)

# Low-rank down projections ("_a_") feed every head whole; up projections
# ("_b_") hold heads.
DOWN, UP = "_a_", "_b_"

NORM_OVER_HEADS = (
    "{name} normalizes the whole {width}-wide {what} (over every head): "
    "a rank holds only its heads"
)
UNKNOWN_PART = "{name} ({cls}, {out} outputs) is neither a projection nor per head"
UNKNOWN_ARRAY = "its array {name} of shape {shape} is not per head"
FUSED_WIDTH = "{name}'s {rows} rows are not {q} q + 2 x {kv} kv heads of one width"
NOT_PER_HEAD = "{name}: {what} {size} not divisible by its {heads} heads"


def plan_attention(module: nn.Module, n: int, layout: str) -> Plan | str:
    heads = counts.find_heads(module)
    if isinstance(heads, str):
        return heads
    if heads.q % n:
        return counts.HEADS_NOT_DIVISIBLE.format(heads=heads.q, n=n)
    kv = counts.kv_heads(heads, n)
    if isinstance(kv, str):
        return kv
    p = Plan(n, counts=counts.local_counts(module, heads, n), layout=layout)
    q = even(heads.q, n)
    split = _latent if latent_q(module) else _qkv
    why = split(module, p, heads, q, kv) or _extras(module, p, heads, q, kv)
    return why or _per_head(module, p, heads, q, kv) or p


def _latent(
    module: nn.Module, p: Plan, heads: Heads, q: list[Ranges], kv: list[Ranges]
) -> str | None:
    """MLA: the query and output projections by heads (the rest: _extras)."""
    query, out = found(latent_q(module)), found(out_name(module))
    for name, axis in ((query, "rows"), (out, "cols")):
        if why := why_not_split(name, module[name], axis, p.n):
            return why
        size = out_dims(module[name]) if axis == "rows" else in_dims(module[name])
        if size % heads.q:
            what = "outputs" if axis == "rows" else "inputs"
            return NOT_PER_HEAD.format(name=name, what=what, size=size, heads=heads.q)
    p.parts[query] = (
        "rows",
        counts.scaled(q, out_dims(module[query]) // heads.q),
        True,
    )
    p.parts[out] = ("cols", counts.scaled(q, in_dims(module[out]) // heads.q), True)
    return None


def _qkv(
    module: nn.Module, p: Plan, heads: Heads, q: list[Ranges], kv: list[Ranges]
) -> str | None:
    if fused := fused_name(module):
        layer = module[fused]
        if why := why_not_split(fused, layer, "rows", 1):
            return why
        rows, width = out_dims(layer), out_dims(layer) // (heads.q + 2 * heads.kv)
        if width * (heads.q + 2 * heads.kv) != rows:
            return FUSED_WIDTH.format(name=fused, rows=rows, q=heads.q, kv=heads.kv)
        parts = [
            counts.scaled(q, width),
            counts.scaled(kv, width, heads.q * width),
            counts.scaled(kv, width, (heads.q + heads.kv) * width),
        ]
        every = [sum((part[r] for part in parts), []) for r in range(p.n)]
        if p.layout == "heads":  # whole kv groups a rank: none to replicate
            if heads.kv % p.n:
                return counts.KV_NOT_SPLIT.format(kv=heads.kv, n=p.n)
            every = even(rows, p.n)
        p.parts[fused] = ("rows", every, True)
    else:
        for name, split in zip(QKV, (q, kv, kv), strict=True):
            layer = module[name]
            size = heads.q if name == "q_proj" else heads.kv
            if why := why_not_split(name, layer, "rows", size):
                return why
            width = out_dims(layer) // size
            p.parts[name] = ("rows", counts.scaled(split, width), True)
    out = found(out_name(module))
    if why := why_not_split(out, module[out], "cols", p.n):
        return why
    width = in_dims(module[out]) // heads.q
    p.parts[out] = ("cols", counts.scaled(q, width), True)
    return None


def _extras(
    module: nn.Module, p: Plan, heads: Heads, q: list[Ranges], kv: list[Ranges]
) -> str | None:
    """Other children: per-head gates are split with q; norms over one head
    stay whole; a norm over every head, or anything else, is a reason."""
    widths = {"q": (_rows(module, "q"), heads.q), "kv": (_rows(module, "kv"), heads.kv)}
    for name, child in module.items():
        if name in p.parts or not isinstance(child, nn.Module):
            continue
        if isinstance(child, DENSE):
            if DOWN in name:
                continue  # a low-rank down projection every head reads whole
            rows = out_dims(child)
            per_head = UP in name and rows % heads.q == 0
            if per_head or (rows in (heads.q, widths["q"][0]) and rows % p.n == 0):
                p.parts[name] = ("rows", counts.scaled(q, rows // heads.q), True)
                continue
            return UNKNOWN_PART.format(name=name, cls=type(child).__name__, out=rows)
        if _by_heads(child, heads.q):
            p.parts[name] = ("heads", q, True)
            continue
        width = child["weight"].shape[-1] if "weight" in child else None
        for what, (full, many) in widths.items():
            if width is not None and width == full and many > 1:
                return NORM_OVER_HEADS.format(name=name, width=width, what=what)
    return None


def _by_heads(child: nn.Module, heads: int) -> bool:
    """A layer holding one matrix per head (MLA's embed_q, unembed_out)."""
    arrays = [v for v in child.values() if isinstance(v, mx.array)]
    return bool(arrays) and all(a.ndim == 3 and a.shape[0] == heads for a in arrays)


def _rows(module: nn.Module, which: str) -> int:
    """The q (or kv) projection's width, fused or not."""
    if fused := fused_name(module):
        return out_dims(module[fused])
    if query := latent_q(module):
        return out_dims(module[query])
    return out_dims(module["q_proj" if which == "q" else "k_proj"])


def _per_head(
    module: nn.Module, p: Plan, heads: Heads, q: list[Ranges], kv: list[Ranges]
) -> str | None:
    for name, array in module.items():
        if isinstance(array, nn.Module) or not hasattr(array, "shape"):
            continue
        if array.ndim == 0:
            continue
        if array.shape[0] == heads.q:
            p.arrays[name] = q
        elif array.shape[0] == heads.kv:
            p.arrays[name] = kv
        else:
            return UNKNOWN_ARRAY.format(name=name, shape=tuple(array.shape))
    return None
