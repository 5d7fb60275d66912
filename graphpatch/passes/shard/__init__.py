"""shard: tensor parallelism over the process's world group, by structure.

Rewrite:       attention: q, k, v (or a fused qkv: by its q/k/v segments,
               or by whole heads where q, k and v of a head lie together,
               whichever the block's ranks, summed in this process, fit;
               unverified, that one block runs on a synthetic input)
               -> mlx's all-to-sharded layers holding this rank's heads, and
               its output projection -> sharded-to-all (one all_sum, its bias
               added once); the head counts the block's __call__ reads become
               this rank's, per-head arrays (sinks) and per-head gates are
               sliced. kv heads fewer than ranks are replicated (each rank
               keeps the one its q heads read) where N is a multiple of them.
               MLA (deepseek's latent attention): the query (or its q_b up
               projection), kv_b and the per-head embed_q / unembed_out by
               heads, the low-rank down projections (q_a, kv_a) whole.
               GLU and plain MLPs: up projections all-to-sharded, down
               sharded-to-all. MoE: the routed experts (SwitchGLU) split in
               place on their hidden dim, shared experts likewise, the router
               whole, and the block sums its output once (routed + shared).
               Embeddings, norms and the LM head stay whole on every rank.
               ``shard:moe_only`` shards the MoE blocks alone (exo #1996).
               ``shard:experts``: expert parallelism, each rank holding E/N
               whole experts (no quantization group is ever cut), the
               router whole, picks of other ranks' experts giving zeros,
               one sum a block (shared experts split as above).
               Recurrent blocks laid out as qwen3.5's GatedDeltaNet: q, k, v
               segments of in_proj_qkv and of its conv1d's channels, z, b,
               a, dt_bias and A_log by value heads, out_proj sharded-to-all;
               other recurrent blocks (Mamba) stay whole.
Preconditions: a group of more than one rank; head counts held in attributes
               named as counts and agreeing with the projections' shapes;
               every split size divisible by N; no quantization group cut by
               a split; no norm over the split axis (MiniMax's q/k norm over
               every head); no per-block array the pass cannot place; a
               block whose output is one array; a recurrent block only as
               qwen3.5's (Mamba's stays whole); no pipeline on the group; the
               same model on every rank (else one error on every rank).
Equivalence:   each block's output after its all_sum equals the unsharded
               block's on the inputs the model fed it, on every rank, within
               the dtype tolerance of ``compare.TOLERANCE``: the all_sum
               reorders the additions of a dot product (N partial sums,
               each rounded, then summed), which float32's 1e-5 relative
               bound holds by orders of magnitude; half types round each
               partial once more, within their bound at N = 2 on the zoo.
               Then the model's logits, on every rank: held to the logits'
               dtype, which float32 logits over half activations (Gemma 3's
               float32 norms) can exceed over many reordered sums.
"""

import zlib
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from graphpatch.compare import dtype_name
from graphpatch.contract import (
    Context,
    GraphpatchError,
    Options,
    Pass,
    Probe,
    Proof,
    Saving,
    Settings,
    Simulated,
    Site,
    Tap,
    mark,
    marked,
    module_at,
    replace_at,
    unmark_at,
    walk,
)
from graphpatch.parts import any_thread
from graphpatch.passes.shard import probes
from graphpatch.passes.shard.alone import best, cover_alone
from graphpatch.passes.shard.blocks import Plan, find_blocks
from graphpatch.passes.shard.experts import plan_experts
from graphpatch.passes.shard.plan import layouts, plan
from graphpatch.passes.shard.rank import local
from graphpatch.passes.shard.split import Group, Ranges, gathered

ALREADY_APPLIED = "already applied"
GROUP_OF_ONE = "one rank in the group: nothing to shard"
PIPELINED = "the model is pipelined over the group (elide_head's case): not sharded"
OTHER_MODEL = (
    "the {n} ranks hold different models (rank {rank} found {blocks} blocks): "
    "every rank must load the same one"
)
FUSED_LAYOUT = "neither layout of its fused qkv (segments, whole heads) fits: {reason}"
NOTHING_TO_SHARD = (
    "shard: nothing in this model can be sharded over {n} ranks "
    "(each block's reason is in the report)"
)
SAVE_REFUSED = (
    "a sharded model holds one rank's part of each block: save the unsharded "
    "model and apply shard when each rank loads it"
)


class Sharded:
    """The marker of a block shard rewrote: its plan and its counts before."""

    shard_plan: Plan
    shard_group = None


class SummedSharded(Sharded):
    """A block whose parts are split in place (MoE): it sums its output."""

    def __call__(self, *args: Any, **kwargs: Any) -> mx.array:
        y = super().__call__(*args, **kwargs)  # type: ignore[misc]
        return mx.distributed.all_sum(y, group=self.shard_group)


def materialize(model: nn.Module) -> None:
    """Evaluate a lazily loaded model sharded unverified, one array at a
    time: each full checkpoint array is read, sliced and freed before the
    next, so a rank's peak is its part plus one array, never the whole model
    (one ``mx.eval`` of every array may read them all first)."""
    for _, array in tree_flatten(model.parameters()):
        mx.eval(array)


def _shapes(module: nn.Module) -> list[tuple[str, tuple[int, ...], str]]:
    """Names, shapes and dtypes only: nothing of a lazy model is evaluated."""
    arrays = tree_flatten(module.parameters())
    return [(k, tuple(v.shape), str(v.dtype)) for k, v in arrays]


def _group() -> Group:
    return mx.distributed.init()


def warnings(model: nn.Module, options: Options, context: Context) -> list[str]:
    """One line when a group of ranks finds nothing it could shard."""
    n = _group().size()
    if n == 1:
        return []
    for path, kind in find_blocks(model, options["moe_only"]):
        module = module_at(model, path)
        for layout in layouts(module, kind):
            if not isinstance(_plan(module, kind, n, layout, options), str):
                return []
    return [NOTHING_TO_SHARD.format(n=n)]


def _plan(
    module: nn.Module, kind: str, n: int, layout: str, options: Options
) -> Plan | str:
    if kind == "moe" and options["experts"]:
        return plan_experts(module, n)
    return plan(module, kind, n, layout)


def find(model: nn.Module, options: Options, context: Context) -> list[Site]:
    n = _group().size()
    if any(getattr(m, "pipeline_size", 1) > 1 for _, m in walk(model)):
        # each rank holds other layers: one site alike on every rank says so
        return [Site("", "pipeline", skip=PIPELINED, collective=True)]
    sites = []
    dtype = dtype_name(context.dtype or mx.float32)
    for path, kind in find_blocks(model, options["moe_only"]):
        module = module_at(model, path)
        held = probes.held_in(path, context.recorded, dtype)
        site = Site(path, kind, collective=True, reorders_sums=held)
        if isinstance(module, Sharded):
            site.skip = ALREADY_APPLIED
        elif n == 1:
            site.skip = GROUP_OF_ONE
        elif len(layouts(module, kind)) > 1:
            site.skip = _pick_layout(module, site, n, context)
        elif isinstance(p := _plan(module, kind, n, "segments", options), str):
            site.skip = p
        sites.append(site)
    _same_everywhere(model, sites, n)
    return sites


def _pick_layout(module: nn.Module, site: Site, n: int, context: Context) -> str | None:
    """A fused qkv's layout, told by summing every rank's block in this
    process (the block's arrays are read: unverified, on a synthetic input);
    every rank computes the same. None, or the reason neither fits."""
    dtype = context.dtype or mx.float32
    inputs = probes.block_inputs(module, site.path, site.kind, context.recorded, dtype)
    reason, *_, layout = best(module, site.kind, n, inputs)
    site.detail["layout"] = layout
    return None if reason is None else FUSED_LAYOUT.format(reason=reason)


def _same_everywhere(model: nn.Module, sites: list[Site], n: int) -> None:
    """Every rank must shard the same blocks of the same shapes: each check
    runs collectives, and a rank holding another model would wait forever
    or sum the wrong parts."""
    if n == 1:
        return
    shapes = [
        (s.path, s.kind, s.skip, s.detail, _shapes(module_at(model, s.path)))
        for s in sites
    ]
    mine = mx.array([zlib.crc32(repr(shapes).encode())], mx.uint32)
    every = mx.distributed.all_gather(mine, group=_group()).tolist()
    if len(set(every)) > 1:
        raise GraphpatchError(
            OTHER_MODEL.format(n=n, rank=_group().rank(), blocks=len(sites))
        )


def why_not(
    model: nn.Module, site: Site, options: Options, context: Context
) -> str | None:
    return None  # every reason is known when the site is found


def rewrite(model: nn.Module, site: Site, options: Options, context: Context) -> str:
    group = _group()
    module = module_at(model, site.path)
    layout = site.detail.get("layout", "segments")
    p = _plan(module, site.kind, group.size(), layout, options)
    assert not isinstance(p, str)  # find gave this site no skip
    before = {name: _count(module, name) for name in p.counts}
    # unverified, the slices stay unevaluated until the model's first call,
    # which may come on another thread (fusion.joined's reason)
    where = any_thread() if context.unverified else mx.default_device()
    with mx.stream(where):
        new = local(module, p, group.rank(), group)
    marker = SummedSharded if p.summed else Sharded
    p.before = before
    replace_at(model, site.path, mark(new, marker, shard_plan=p, shard_group=group))
    return _note(p, before)


def _count(module: nn.Module, name: str) -> int:
    """A count the plan changes: the block's own, or a child's."""
    head, _, key = name.rpartition(".")
    return int(vars(module_at(module, head))[key])


def _note(p: Plan, before: dict[str, int]) -> str:
    counts = ", ".join(f"{k} {v} -> {p.counts[k]}" for k, v in before.items())
    parts = f"{len(p.parts)} layers split over {p.n} ranks"
    return f"{parts}; {counts}" if counts else parts


def undo(model: nn.Module, path: str) -> None:
    """Every rank's parts gathered back (an all_gather: exact), then the
    counts and the block's class as they were."""
    module = module_at(model, path)
    p, group = module.shard_plan, module.shard_group
    for part, (axis, every, _) in p.parts.items():
        replace_at(module, part, gathered(module_at(module, part), axis, every, group))
    for name, every in p.arrays.items():
        parts = mx.distributed.all_gather(module[name][None], group=group)
        module[name] = _rows_back(parts, every)
    for name, value in p.before.items():
        head, _, key = name.rpartition(".")
        vars(module_at(module, head))[key] = value
    if p.experts:
        unmark_at(module, p.experts)
    unmark_at(model, path)


def _rows_back(parts: mx.array, every: list[Ranges]) -> mx.array:
    found: dict[int, mx.array] = {}
    for rank, ranges in enumerate(every):
        offset = 0
        for a, b in ranges:
            found.setdefault(a, parts[rank][offset : offset + b - a])
            offset += b - a
    return mx.concatenate([found[a] for a in sorted(found)])


def applied(model: nn.Module) -> list[str]:
    return marked(model, Sharded)


def taps(model: nn.Module, options: Options, context: Context) -> list[Tap]:
    return probes.taps(find_blocks(model, options["moe_only"]))


def probe(model: nn.Module, site: Site, options: Options, context: Context) -> Probe:
    module = module_at(model, site.path)
    inputs = probes.block_inputs(
        module, site.path, site.kind, context.recorded, context.dtype
    )

    def run() -> list[mx.array]:
        return probes.outputs(module_at(model, site.path), inputs)

    return run


def simulate(model: nn.Module, n: int, tokens: list[list[int]]) -> list[Simulated]:
    """Every block over ``n`` ranks summed in one process (``alone``)."""
    checked = cover_alone(model, n, tokens)
    return [Simulated(c.path, c.reason, c.max_error) for c in checked]


PASS = Pass(
    name="shard",
    summary="tensor parallelism over the world group (attention by heads, MLPs, MoE)",
    find=find,
    why_not=why_not,
    rewrite=rewrite,
    undo=undo,
    applied=applied,
    proof=Proof(probe=probe, taps=taps, simulate=simulate),
    saving=Saving(refused=SAVE_REFUSED),
    settings=Settings(
        defaults={"moe_only": False, "experts": False}, warnings=warnings
    ),
    tensor_parallel=True,
)
