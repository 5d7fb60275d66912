"""Joining layers on the output axis and splitting them back: what fuse_glu
and fuse_qkv do alike, with one fused matmul serving a module's projections
(``parts``: gate and up; q, k and v), so the module's own ``__call__`` runs
unchanged.

A projection wrapped in one of mlx-lm's LoRA adapters (``mlx_lm.load`` with
``adapter_path``) is fused by its base: the part stands where the adapter's
``linear`` stood, and the adapter adds its own delta to its own part. mlx-lm's
``linear_to_lora_layers`` (training) gives each part an adapter of its own,
under the unpatched names, and leaves the joined layer alone, so a patched
model trains the adapter the unpatched one would.
"""

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.nn.layers.distributed import AllToShardedLinear, QuantizedAllToShardedLinear

from graphpatch.contract import (
    Context,
    Options,
    Saving,
    Site,
    SiteHook,
    Weights,
    mark,
    module_at,
    rebuilt,
    replace_at,
    unmark,
    walk,
)
from graphpatch.parts import (
    ADAPTERS,
    FusedCall,
    FusedPart,
    Joined,
    Pinned,
    any_thread,
)
from graphpatch.timing import interleaved_ratio

# Dense layers whose arrays join on the output axis (a pass adds its own kinds).
DENSE = (
    nn.Linear,
    nn.QuantizedLinear,
    AllToShardedLinear,
    QuantizedAllToShardedLinear,
)
NOT_A_LAYER = "{name} is a {cls}, not a linear layer that can be concatenated"
KINDS_DIFFER = "{a} is a {x} and {b} a {y}"
SETTING_DIFFERS = "{a} and {b} differ in {key} ({x} vs {y})"
BIAS_DIFFERS = "some of {names} have a bias and others have none"
DTYPE_DIFFERS = "{a} and {b} {key} differ in dtype ({x} vs {y})"
SHAPE_DIFFERS = "{a} and {b} {key} shapes {x} and {y} do not concatenate"
GLOBAL_SCALES = "nvfp4 layers with different global scales for {a} and {b}"


def why_not_joined(layers: dict[str, nn.Module], kinds: tuple[type, ...]) -> str | None:
    """Why ``layers`` (name -> layer) cannot be joined on the output axis
    exactly, or None: one kind, equal settings, arrays that concatenate."""
    for name, layer in layers.items():
        if type(layer) not in kinds:
            return NOT_A_LAYER.format(name=name, cls=type(layer).__name__)
    (a, first), *others = layers.items()
    for b, other in others:
        words = {"a": a.removesuffix("_proj"), "b": b.removesuffix("_proj")}
        if type(first) is not type(other):
            x, y = type(first).__name__, type(other).__name__
            return KINDS_DIFFER.format(a=a, b=b, x=x, y=y)
        why = _settings_differ(first, other, words)
        why = why or _arrays_differ(first, other, words, list(layers))
        if why:
            return why
    return None


def _settings(layer: nn.Module) -> dict[str, Any]:
    return {k: v for k, v in vars(layer).items() if k not in ("_no_grad", "_training")}


def _settings_differ(
    first: nn.Module, other: nn.Module, words: dict[str, str]
) -> str | None:
    ours, theirs = _settings(first), _settings(other)
    for key in sorted(ours.keys() | theirs.keys()):
        x, y = ours.get(key), theirs.get(key)
        if x is not y and x != y:
            return SETTING_DIFFERS.format(key=key, x=x, y=y, **words)
    return None


def _arrays_differ(
    first: nn.Module, other: nn.Module, words: dict[str, str], names: list[str]
) -> str | None:
    if ("bias" in first) != ("bias" in other):
        return BIAS_DIFFERS.format(names=" and ".join(names))
    if first.keys() != other.keys():
        return SETTING_DIFFERS.format(
            key="arrays", x=list(first), y=list(other), **words
        )
    for key in first:
        x, y = first[key], other[key]
        if x.dtype != y.dtype:
            return DTYPE_DIFFERS.format(key=key, x=x.dtype, y=y.dtype, **words)
        if key == "global_scale":
            if x.shape != y.shape or not mx.array_equal(x, y).item():
                return GLOBAL_SCALES.format(**words)
            continue
        axis = output_axis(key, x)
        if x.ndim != y.ndim or without(x.shape, axis) != without(y.shape, axis):
            return SHAPE_DIFFERS.format(key=key, x=x.shape, y=y.shape, **words)
    return None


def output_axis(key: str, array: mx.array) -> int:
    # bias is (..., out); weight, scales, biases are (..., out, in)
    return array.ndim - 1 if key == "bias" else array.ndim - 2


def without(shape: tuple[int, ...], axis: int) -> tuple[int, ...]:
    return shape[:axis] + shape[axis + 1 :]


def holder(module: nn.Module, name: str) -> tuple[nn.Module, str]:
    """Where the layer of projection ``name`` lives: the module's own child,
    or the base of an adapter wrapping it (``gate_proj.linear``)."""
    child = module[name]
    return (child, "linear") if isinstance(child, ADAPTERS) else (module, name)


def layer_of(module: nn.Module, name: str) -> nn.Module:
    """The layer of projection ``name`` (an adapter's base; see ``holder``)."""
    container, key = holder(module, name)
    return container[key]


def _place(module: nn.Module, name: str) -> str:
    """``layer_of``'s path inside ``module``: ``gate_proj`` or
    ``gate_proj.linear``."""
    container, key = holder(module, name)
    return name if container is module else f"{name}.{key}"


def joined(*layers: nn.Module, any_thread_stream: bool = False) -> nn.Module:
    """One layer of the first's kind holding them all on the output axis;
    built where any thread may evaluate it with ``any_thread_stream`` (an
    unverified apply leaves it unevaluated)."""
    fused = rebuilt(layers[0])
    where = (
        any_thread() if any_thread_stream else mx.default_stream(mx.default_device())
    )
    with mx.stream(where):
        for key in layers[0]:
            if key != "global_scale":
                axis = output_axis(key, layers[0][key])
                arrays = [layer[key] for layer in layers]
                fused[key] = mx.concatenate(arrays, axis=axis)
    return fused


def rows(key: str, array: mx.array, start: int, stop: int | None) -> mx.array:
    """The output rows ``start:stop`` of one array of a joined layer."""
    if key == "global_scale":
        return array  # one scale for every part (the passes check they agree)
    index = [slice(None)] * array.ndim
    index[output_axis(key, array)] = slice(start, stop)
    return array[tuple(index)]


def part(fused: nn.Module, start: int, stop: int | None) -> nn.Module:
    """The output rows ``start:stop`` of a joined layer, as a layer."""
    part = unmark(fused) if isinstance(fused, Joined) else rebuilt(fused)
    for key in fused:
        part[key] = rows(key, fused[key], start, stop)
    return part


def fuse(
    module: nn.Module, names: tuple[str, ...], fused: str, layer: nn.Module
) -> None:
    """Put ``layer`` (the joined ``names``) under ``fused`` and a part of it
    where each of ``names`` stood; the old layers are released."""
    sizes = [layer_of(module, name).weight.shape[-2] for name in names]
    call = FusedCall(module, fused, sizes)
    joined = mark(layer, Joined)
    joined._no_grad = Pinned(joined._no_grad, fused)  # training it is refused
    replace_at(module, fused, joined)
    for index, name in enumerate(names):
        replace_at(module, _place(module, name), FusedPart(call, index))


def parts_in(module: nn.Module, names: tuple[str, ...]) -> list[str]:
    """Those of ``names`` that are still parts of the module's fused matmul
    (a user may have replaced one since: ``mlp.up_proj = ...``)."""
    return [
        name
        for name in names
        if isinstance(module.get(name), nn.Module)
        and isinstance(layer_of(module, name), FusedPart)
    ]


def unfuse(module: nn.Module, names: tuple[str, ...], fused: str) -> None:
    """The parts back as layers of their own, bit for bit. A part the user
    replaced since stays as the user left it, so the module computes what it
    computed before."""
    for name in parts_in(module, names):
        fused_part = layer_of(module, name)
        layer = part(module[fused], *fused_part.call.bounds(fused_part.index))
        replace_at(module, _place(module, name), layer)
        if fused_part.call.settled:  # as evaluated as before: any thread runs it
            mx.eval(layer.parameters())
    replace_at(module, fused, None)


def fused_paths(model: nn.Module, names: tuple[str, ...]) -> list[str]:
    """Modules one of whose ``names`` is a part of a fused matmul."""
    return [p for p, m in walk(model) if parts_in(m, names)]


def plain(
    model: nn.Module, weights: Weights, names: tuple[str, ...], fused: str
) -> Weights:
    """Each fused array of the ``fused_paths`` back under the names of the
    parts still fused (a part the user replaced has arrays of its own)."""
    for path in fused_paths(model, names):
        module = module_at(model, path)
        prefix = f"{path}.{fused}."
        for name in [n for n in weights if n.startswith(prefix)]:
            key, array = name[len(prefix) :], weights.pop(name)
            for part_name in parts_in(module, names):
                fused_part = layer_of(module, part_name)
                start, stop = fused_part.call.bounds(fused_part.index)
                place = f"{path}.{_place(module, part_name)}"
                weights[f"{place}.{key}"] = rows(key, array, start, stop)
    return weights


def timed(
    module: nn.Module,
    names: tuple[str, ...],
    fused: str,
    calls: dict[str, tuple[mx.array, ...]],
) -> dict[str, float]:
    """Unfused/fused time of ``module`` on each of ``calls`` (name -> args),
    interleaved (``tune``): above 1 means fused is faster."""
    parts = {_place(module, name): layer_of(module, name) for name in names}
    call = next(iter(parts.values())).call
    unfused = {n: part(module[fused], *call.bounds(i)) for i, n in enumerate(parts)}
    mx.eval([m.parameters() for m in unfused.values()])

    def put(children: dict[str, nn.Module]) -> None:
        for place, layer in children.items():
            replace_at(module, place, layer)

    def run_with(
        children: dict[str, nn.Module], args: tuple[mx.array, ...]
    ) -> Callable[[], None]:
        def run() -> None:
            put(children)
            mx.eval(module(*args))

        return run

    ratios = {
        name: interleaved_ratio(run_with(unfused, args), run_with(parts, args))
        for name, args in calls.items()
    }
    put(parts)
    return ratios


def names_in(
    module: nn.Module, fusions: dict[str, tuple[str, ...]]
) -> tuple[tuple[str, ...], str]:
    """(names, fused): the entry of ``fusions`` whose parts ``module`` has."""
    for fused, names in fusions.items():
        if all(isinstance(module.get(name), nn.Module) for name in names):
            return names, fused
    raise KeyError(f"none of {list(fusions.values())} in {type(module).__name__}")


@dataclass(frozen=True)
class Hooks:
    """What every fusing pass does alike, as its ``Pass`` fields."""

    rewrite: SiteHook[str | None]
    undo: Callable[[nn.Module, str], None]
    applied: Callable[[nn.Module], list[str]]
    replaced: Callable[[nn.Module, str], list[str]]
    saving: Saving


def hooks(fusions: dict[str, tuple[str, ...]]) -> Hooks:
    """A fusing pass's hooks: rewrite joins the names of the entry of
    ``fusions`` the site has under its fused name; undo, applied, replaced
    and the save's plain names and fused children follow from it."""

    def rewrite(
        model: nn.Module, site: Site, options: Options, context: Context
    ) -> None:
        module = module_at(model, site.path)
        names, fused = names_in(module, fusions)
        layers = [layer_of(module, n) for n in names]
        fuse(
            module, names, fused, joined(*layers, any_thread_stream=context.unverified)
        )

    def undo(model: nn.Module, path: str) -> None:
        module = module_at(model, path)
        unfuse(module, *names_in(module, fusions))

    def applied(model: nn.Module) -> list[str]:
        paths = {p for names in fusions.values() for p in fused_paths(model, names)}
        return [p for p, _ in walk(model) if p in paths]  # in reading order

    def replaced(model: nn.Module, path: str) -> list[str]:
        module = module_at(model, path)
        names, _ = names_in(module, fusions)
        ours = parts_in(module, names)
        return [name for name in names if name not in ours]

    def plain_weights(model: nn.Module, weights: Weights) -> Weights:
        for fused, names in fusions.items():
            weights = plain(model, weights, names, fused)
        return weights

    saving = Saving(plain=plain_weights, fuses=dict(fusions))
    return Hooks(rewrite, undo, applied, replaced, saving)
