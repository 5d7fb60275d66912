"""The blocks the pass shards, found by structure, and each one's plan.

A plan says, for ``n`` ranks, which layers of a block are split on which
axis and where each rank's part lies, which head counts change and to what,
which per-head arrays are sliced, and whether the block sums its own output.
It depends on ``n`` alone, so every rank makes the same one; ``local`` then
builds one rank's block from it.
"""

from dataclasses import dataclass, field
from typing import TypeVar

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.switch_layers import QuantizedSwitchLinear, SwitchLinear

from graphpatch.contract import mark, rebuilt, walk
from graphpatch.passes.shard import heads as counts
from graphpatch.passes.shard.heads import Heads
from graphpatch.passes.shard.split import (
    Group,
    Ranges,
    bias_once,
    even,
    in_dims,
    out_dims,
    sharded,
    why_not_split,
)

# Projections whose outputs a block's heads, or its hidden units, split.
QKV = ("q_proj", "k_proj", "v_proj")
FUSED_QKV = ("qkv_proj", "c_attn", "query_key_value", "Wqkv", "wqkv", "W_pack", "qkv")
OUTPUTS = ("o_proj", "out_proj", "dense", "wo", "c_proj")
# Multi-head latent attention (deepseek's MLA): the query, or its low-rank
# up projection; low-rank down projections ("_a_") feed every head whole,
# up projections ("_b_") and per-head layers (embed_q) hold heads.
LATENT_Q = ("q_b_proj", "q_proj")
DOWN, UP = "_a_", "_b_"
LAYOUTS = ("segments", "heads")
FUSED_GLU = "gate_up_proj"  # phi3's and glm4's [gate; up]
MLPS = (
    (("gate_proj", "up_proj"), "down_proj"),
    ((FUSED_GLU,), "down_proj"),
    (("w1", "w3"), "w2"),
    (("c_fc",), "c_proj"),
    (("fc1",), "fc2"),
    (("dense_h_to_4h",), "dense_4h_to_h"),
)
EXPERTS = (SwitchLinear, QuantizedSwitchLinear)
DENSE = (nn.Linear, nn.QuantizedLinear)

NORM_OVER_HEADS = (
    "{name} normalizes the whole {width}-wide {what} (over every head): "
    "a rank holds only its heads"
)
NORM_OVER_UNITS = "{name} normalizes the whole {width}-wide hidden layer"
UNKNOWN_PART = "{name} ({cls}, {out} outputs) is neither a projection nor per head"
UNKNOWN_ARRAY = "its array {name} of shape {shape} is not per head"
FUSED_WIDTH = "{name}'s {rows} rows are not {q} q + 2 x {kv} kv heads of one width"
RECURRENT = (
    "a recurrent block ({cls}: a convolution and a state over its channels): "
    "the pass does not know its segments; kept whole on every rank"
)
MOE_SHARDED = "already sharded (its sharding_group is set: the model's own shard())"
NOT_PER_HEAD = "{name}: {what} {size} not divisible by its {heads} heads"
PARTS_DIFFER = "{a} and {b} have {x} and {y} outputs"


@dataclass
class Plan:
    """How one block is sharded over ``n`` ranks (plain numbers and names).

    Attributes:
        parts: child path -> (axis, every rank's ranges, whether mlx's
            sharded layer replaces it); an axis is ``rows`` (outputs) or
            ``cols`` (inputs).
        counts: attribute -> its value on every rank.
        arrays: the block's own array -> every rank's ranges on axis 0.
        summed: the block's output is a partial sum the block itself sums
            (its parts are split in place, as MoE experts are).
        before: the counts' values before the rewrite, for ``undo``.
    """

    n: int
    parts: dict[str, tuple[str, list[Ranges], bool]] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)
    arrays: dict[str, list[Ranges]] = field(default_factory=dict)
    summed: bool = False
    before: dict[str, int] = field(default_factory=dict)  # counts, unsharded
    layout: str = "segments"  # a fused qkv's (``layouts``)
    experts: str = ""  # shard:experts: the child whose experts are this rank's


def kind_of(module: nn.Module) -> str | None:
    """``attention``, ``mlp`` or ``moe`` for a block the pass shards;
    ``recurrent`` for one it finds and keeps whole."""
    if experts_in(module):
        return "moe"
    if isinstance(module.get("conv1d"), nn.Conv1d) and out_name(module):
        return "recurrent"
    if out_name(module) and (
        all(isinstance(module.get(k), nn.Module) for k in QKV)
        or fused_name(module)
        or latent_q(module)
    ):
        return "attention"
    if mlp_names(module, DENSE):
        return "mlp"
    return None


def find_blocks(model: nn.Module, moe_only: bool) -> list[tuple[str, str]]:
    """(path, kind) of every block, in reading order; an MoE block's shared
    experts belong to it (one sum for routed and shared)."""
    found: list[tuple[str, str]] = []
    inside: list[str] = []
    for path, module in walk(model):
        if any(path.startswith(p + ".") for p in inside):
            continue
        kind = kind_of(module)
        if kind == "moe":
            inside.append(path)
        if kind and (kind == "moe" or not moe_only):
            found.append((path, kind))
    return found


T = TypeVar("T")


def found(value: T | None) -> T:
    """A part ``find_blocks`` saw in the block (the block is one it found)."""
    if value is None:
        raise ValueError("not a block shard finds")
    return value


def out_name(module: nn.Module) -> str | None:
    return next((k for k in OUTPUTS if isinstance(module.get(k), nn.Module)), None)


def latent_q(module: nn.Module) -> str | None:
    """The query projection of an attention with no k and v projections."""
    if any(isinstance(module.get(k), nn.Module) for k in QKV[1:]):
        return None
    return next((k for k in LATENT_Q if isinstance(module.get(k), nn.Module)), None)


def fused_name(module: nn.Module) -> str | None:
    return next((k for k in FUSED_QKV if isinstance(module.get(k), nn.Module)), None)


def mlp_names(
    module: nn.Module, kinds: tuple[type, ...]
) -> tuple[tuple[str, ...], str] | None:
    """The (up projections, down projection) of an MLP of layers ``kinds``."""
    for ups, down in MLPS:
        if all(isinstance(module.get(k), kinds) for k in (*ups, down)):
            return ups, down
    return None


def experts_in(module: nn.Module) -> str | None:
    """The child holding a block's routed experts (a SwitchGLU), if any."""
    for key, child in module.items():
        if isinstance(child, nn.Module) and mlp_names(child, EXPERTS):
            return key
    return None


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
        return _attention(module, n, layout)
    if kind == "mlp":
        return _mlp(module, n, layout=layout)
    return _moe(module, n)


def _attention(module: nn.Module, n: int, layout: str) -> Plan | str:
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


def _mlp(
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
    p = _mlp(module[experts], n, own=False, prefix=experts + ".")
    if isinstance(p, str):
        return f"{experts}: {p}"
    p.summed = True
    for name, child in module.items():
        if name != experts and isinstance(child, nn.Module):
            if mlp_names(child, DENSE):  # shared experts, summed with the rest
                shared = _mlp(child, n, own=False, prefix=name + ".")
                if isinstance(shared, str):
                    return f"{name}: {shared}"
                p.parts.update(shared.parts)
    return p


def local(
    module: nn.Module, p: Plan, rank: int, group: Group, alone: bool = False
) -> nn.Module:
    """Rank ``rank``'s copy of the block (the original is left as it was).
    ``alone``: a rank simulated in one process: its layers are the layers'
    own classes holding their slices (no collective runs), a split input's
    bias is added on rank 0 only, and summing the ranks' outputs is the
    all_sum's maths."""
    new = rebuilt(module)
    copies: dict[str, nn.Module] = {"": new}
    for path, (axis, every, own) in p.parts.items():
        parent_path, _, key = path.rpartition(".")
        parent = _copied(copies, parent_path)
        layer = sharded(parent[key], axis, every[rank], group, own and not alone)
        if axis == "cols" and (alone or not own):
            layer = bias_once(layer, rank)
        parent[key] = layer
    for name, every in p.arrays.items():
        new[name] = take_rows(new[name], every[rank])
    vars(new).update(p.counts)
    if p.experts:
        inside = [v for k, v in p.parts.items() if k.startswith(p.experts + ".")]
        (first, stop), *_ = inside[0][1][rank]  # this rank's experts
        switch = _copied(copies, p.experts)
        new[p.experts] = mark(switch, LocalExperts, first=first, count=stop - first)
    return new


class LocalExperts:
    """The marker of a rank's experts (shard:experts): the router's picks
    that fall on them are renumbered to this rank's, the others give zeros."""

    first: int = 0
    count: int = 0

    def __call__(self, x: mx.array, indices: mx.array) -> mx.array:
        local = indices - self.first
        mine = (local >= 0) & (local < self.count)
        y = super().__call__(x, mx.where(mine, local, 0))  # type: ignore[misc]
        return y * mx.expand_dims(mine, -1).astype(y.dtype)


def _copied(copies: dict[str, nn.Module], path: str) -> nn.Module:
    """The copy of the block's child at ``path``, made once (never the
    original: a failed check restores the original as it was)."""
    if path not in copies:
        head, _, key = path.rpartition(".")
        parent = _copied(copies, head)
        copies[path] = parent[key] = rebuilt(parent[key])
    return copies[path]


def take_rows(array: mx.array, ranges: Ranges) -> mx.array:
    """An array's rows in ``ranges`` (a per-head array: sinks, gates)."""
    rows = [array[a:b] for a, b in ranges]
    return mx.contiguous(rows[0] if len(rows) == 1 else mx.concatenate(rows))
