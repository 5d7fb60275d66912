"""One rank's part of a layer, and the whole layer back from every rank's.

A split is given per rank as ranges of the layer's logical rows (outputs) or
columns (inputs): a plain split is one range per rank, a fused projection one
range per segment, replicated kv heads the same range on several ranks. The
same ranges map quantized arrays (packed weights, per-group scales) and say
how ``gathered`` puts the whole layer back together.
"""

from typing import TypeAlias

import mlx.core as mx
import mlx.nn as nn
from mlx.nn.layers.distributed import (
    AllToShardedLinear,
    QuantizedAllToShardedLinear,
    QuantizedShardedToAllLinear,
    ShardedToAllLinear,
)
from mlx_lm.models.switch_layers import QuantizedSwitchLinear, SwitchLinear

Ranges = list[tuple[int, int]]  # one rank's [start, stop) on the split axis
Arrays = dict[str, mx.array]
Group: TypeAlias = mx.distributed.Group

LAYERS = (nn.Linear, nn.QuantizedLinear, SwitchLinear, QuantizedSwitchLinear)
# The class a layer becomes when its sharded form communicates itself.
SHARDED = {
    ("rows", nn.Linear): AllToShardedLinear,
    ("rows", nn.QuantizedLinear): QuantizedAllToShardedLinear,
    ("cols", nn.Linear): ShardedToAllLinear,
    ("cols", nn.QuantizedLinear): QuantizedShardedToAllLinear,
}
PLAIN = {v: k[1] for k, v in SHARDED.items()}

GROUP_CUT = (
    "{name}: a split of its {dims} inputs in {n} cuts its quantization "
    "groups of {group}"
)
NOT_DIVISIBLE = "{name}: {what} {size} not divisible by {n} ranks"
NOT_A_LAYER = "{name} is a {cls}, not a layer the pass can split"
ALREADY_SHARDED = "{name} is already sharded ({cls}: the model's own shard())"


def is_quantized(layer: nn.Module) -> bool:
    return "scales" in layer


def out_dims(layer: nn.Module) -> int:
    return layer.weight.shape[-2]


def in_dims(layer: nn.Module) -> int:
    if is_quantized(layer):
        return layer.scales.shape[-1] * layer.group_size
    return layer.weight.shape[-1]


def even(size: int, n: int) -> list[Ranges]:
    """``size`` in ``n`` equal contiguous ranges, one per rank."""
    step = size // n
    return [[(r * step, (r + 1) * step)] for r in range(n)]


def why_not_split(name: str, layer: nn.Module, axis: str, n: int) -> str | None:
    """Why ``layer`` cannot be split evenly on ``axis`` (rows or cols)."""
    if type(layer) in PLAIN:
        return ALREADY_SHARDED.format(name=name, cls=type(layer).__name__)
    if type(layer) not in LAYERS:
        return NOT_A_LAYER.format(name=name, cls=type(layer).__name__)
    size = out_dims(layer) if axis == "rows" else in_dims(layer)
    what = "outputs" if axis == "rows" else "inputs"
    if size % n:
        return NOT_DIVISIBLE.format(name=name, what=what, size=size, n=n)
    if axis == "cols" and is_quantized(layer) and (size // n) % layer.group_size:
        return GROUP_CUT.format(name=name, dims=size, n=n, group=layer.group_size)
    return None


def _axis(key: str, array: mx.array, axis: str) -> int | None:
    """The array's axis a split on the layer's rows, columns or heads (one
    matrix a head, on axis 0) cuts."""
    if array.ndim == 0 or key == "global_scale":
        return None
    if axis == "heads":
        return 0
    if key == "bias":
        return array.ndim - 1 if axis == "rows" else None
    return array.ndim - 2 if axis == "rows" else array.ndim - 1


def _logical(layer: nn.Module, axis: str) -> int:
    if axis == "heads":
        return int(layer.weight.shape[0])
    return out_dims(layer) if axis == "rows" else in_dims(layer)


def _scaled(ranges: Ranges, array: mx.array, logical: int, axis: int) -> Ranges:
    """``ranges`` of logical columns in the units of ``array`` (packed words,
    scale groups): exact because every range is a multiple of a group."""
    factor = array.shape[axis] / logical
    return [(int(a * factor), int(b * factor)) for a, b in ranges]


def take(layer: nn.Module, axis: str, ranges: Ranges) -> Arrays:
    """The layer's arrays restricted to ``ranges`` on ``axis``: lazy slices,
    evaluated by whoever evaluates the model (a lazy load stays lazy)."""
    logical = _logical(layer, axis)
    arrays = {}
    for key, array in layer.items():
        if not isinstance(array, mx.array):
            continue
        cut = _axis(key, array, axis)
        if cut is None:
            arrays[key] = array
            continue
        pieces = [
            _slice(array, cut, a, b) for a, b in _scaled(ranges, array, logical, cut)
        ]
        joined = pieces[0] if len(pieces) == 1 else mx.concatenate(pieces, axis=cut)
        arrays[key] = mx.contiguous(joined)
    return arrays


def _slice(array: mx.array, axis: int, start: int, stop: int) -> mx.array:
    index = [slice(None)] * array.ndim
    index[axis] = slice(start, stop)
    return array[tuple(index)]


def with_arrays(
    layer: nn.Module, arrays: Arrays, cls: type | None = None, **settings: object
) -> nn.Module:
    """A new layer of ``cls`` (default: the layer's own) with the layer's
    settings and ``arrays``; nothing of the original layer is changed."""
    new = nn.Module.__new__(cls or type(layer))
    nn.Module.__init__(new)
    for key, value in vars(layer).items():
        if key not in ("_no_grad", "_training"):
            vars(new)[key] = value
    new._no_grad = set(layer._no_grad)
    new._training = layer._training
    vars(new).update(settings)
    dict.update(new, arrays)
    return new


def sharded(
    layer: nn.Module, axis: str, ranges: Ranges, group: Group, own: bool = True
) -> nn.Module:
    """Rank's part of ``layer``: with ``own``, mlx's all-to-sharded or
    sharded-to-all layer (which sums over ``group`` itself); otherwise the
    layer's own class holding its slice (its block sums)."""
    arrays = take(layer, axis, ranges)
    if own and type(layer) in (nn.Linear, nn.QuantizedLinear):
        cls = SHARDED[axis, type(layer)]
        return with_arrays(layer, arrays, cls, group=group)
    return with_arrays(layer, arrays)


def bias_once(layer: nn.Module, rank: int) -> nn.Module:
    """A partial layer whose bias only rank 0 adds: the sum over ranks then
    adds it once, as the unsharded layer does."""
    if "bias" not in layer or rank == 0:
        return layer
    return with_arrays(
        layer, {**dict(layer.items()), "bias": mx.zeros_like(layer.bias)}
    )


def gathered(
    layer: nn.Module, axis: str, every: list[Ranges], group: Group
) -> nn.Module:
    """The whole layer back, exactly, from every rank's part (``every``: each
    rank's ranges of the logical rows or columns): an all_gather,
    each range taken from the first rank holding it. A bias only rank 0 kept
    (``bias_once``) comes from rank 0."""
    arrays = {}
    for key, array in layer.items():
        if not isinstance(array, mx.array):
            continue
        cut = _axis(key, array, axis)
        if cut is None and key != "bias":
            arrays[key] = array
            continue
        parts = mx.distributed.all_gather(array[None], group=group)
        if cut is None:  # a sharded-to-all bias: rank 0's is the whole one
            arrays[key] = parts[0]
            continue
        arrays[key] = _joined(parts, cut, every)
    whole = with_arrays(layer, arrays, PLAIN.get(type(layer), type(layer)))
    vars(whole).pop("group", None)  # mlx's sharded layers' own setting
    return whole


def _joined(parts: mx.array, cut: int, every: list[Ranges]) -> mx.array:
    found: dict[int, mx.array] = {}
    for rank, ranges in enumerate(every):
        local = parts[rank]
        factor = local.shape[cut] / sum(b - a for a, b in ranges)
        offset = 0
        for a, b in ranges:
            width = int((b - a) * factor)
            found.setdefault(a, _slice(local, cut, offset, offset + width))
            offset += width
    return mx.concatenate([found[a] for a in sorted(found)], axis=cut)
