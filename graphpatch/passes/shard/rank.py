"""One rank's block, built from its plan; the original is left as it was."""

import mlx.core as mx
import mlx.nn as nn

from graphpatch.contract import mark, rebuilt
from graphpatch.passes.shard.blocks import Plan
from graphpatch.passes.shard.split import Group, Ranges, bias_once, sharded


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
    for name, value in p.counts.items():  # the block's, or a child's (conv1d.groups)
        head, _, key = name.rpartition(".")
        vars(_copied(copies, head))[key] = value
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
