"""elide_head: pipeline ranks that do not produce the output skip the LM head.

Rewrite:       on a pipelined model (mlx-lm's PipelineMixin after
               ``model.model.pipeline(group)``; rank 0 runs the last layers),
               ranks other than 0: head(h) -> zeros of the logits' shape that
               depend on h, so mlx-lm's all-gather of h (and any edge a
               runtime hangs on the logits) still runs. Rank 0 keeps its head.
               ``sampler(...)`` wraps an mlx-lm sampler: rank 0 samples, the
               token reaches every rank through an all_sum of B integers.
               An untied head's arrays are released on the elided ranks when
               they can be re-read from the checkpoint (undo reloads them).
Preconditions: a pipeline group of more than one rank, the global group the
               pipeline was built on, and an explicit head (untied_head).
Equivalence:   the sampled token on every rank equals the unpatched model's;
               logits on ranks other than 0 are zeros (by design).
"""

import functools

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten
from mlx_lm.models.pipeline import PipelineMixin

from graphpatch.contract import (
    GraphpatchError,
    Pass,
    Site,
    module_at,
    parent_and_key,
    rebuilt,
    walk,
)
from graphpatch.heads import EMBEDDINGS, StandIn, head_path
from graphpatch.loading import read_arrays
from graphpatch.verify import PROBE_TOKENS

ALREADY_APPLIED = "already applied"
NOT_PIPELINED = "not a pipelined model (no PipelineMixin)"
ONE_RANK = "pipeline of one rank: every rank produces the output"
NO_HEAD = "no explicit LM head: untied_head made none (see its report)"
WRONG_GROUP = (
    "the model is pipelined over {size} ranks (this is rank {rank}) but the "
    "global group has {group_size} ranks (this is rank {group_rank}): "
    "elide_head needs the pipeline on the global group"
)
RELEASED = "head skipped; its {mib:.1f} MiB released (re-read from the checkpoint)"
TIED = "head skipped; its arrays stay: they are the embedding's"
KEPT = "head skipped; its arrays stay in memory (no checkpoint copy to reload)"


SAMPLER = (
    "elide_head: ranks other than 0 return zero logits; sample with "
    "graphpatch.passes.elide_head.sampler(...) (mlx-lm's sampler=) so every "
    "rank gets rank 0's token"
)


class ElideError(GraphpatchError):
    """The pipeline and the distributed group do not match."""


def broadcast_token(token: mx.array, group: mx.distributed.Group | None = None):
    """Rank 0's token on every rank: an all_sum in which the others add zeros."""
    group = group or mx.distributed.init()
    # Times 0, not zeros_like: the sum must wait for this rank's forward (its
    # send and all-gather), or the ranks would meet in different collectives.
    mine = token.astype(mx.uint32) * (1 if group.rank() == 0 else 0)
    return mx.distributed.all_sum(mine, group=group)


def sampler(sample=None, group: mx.distributed.Group | None = None):
    """An mlx-lm ``sampler=`` for elided models: ``sample`` (default greedy)
    runs on every rank, rank 0's result is the one every rank returns."""
    sample = sample or (lambda logprobs: mx.argmax(logprobs, axis=-1))

    def sample_on_rank_0(logprobs: mx.array) -> mx.array:
        return broadcast_token(sample(logprobs), group)

    return sample_on_rank_0


class ElidedHead(StandIn, nn.Module):
    """Stands where the head was on ranks that do not produce the output."""

    def __init__(self, held: nn.Module, vocab: int, released: bool):
        super().__init__()
        self.vocab = vocab
        if released:
            vars(self)["held"] = held  # not a child: its arrays are unevaluated
        else:
            self.held = held  # still in memory, so still counted

    def __call__(self, h: mx.array) -> mx.array:
        keep = getattr(self.held, "keep", None)  # last_token's, when applied
        positions = h.shape[-2] if keep is None else min(keep, h.shape[-2])
        shape = (*h.shape[:-2], positions, self.vocab)
        zeros = mx.broadcast_to(mx.zeros((1,) * len(shape), h.dtype), shape)
        return mx.depends(zeros, h)


class Kept:
    """Marks rank 0's head; ``original`` names the class it was made from."""

    original: type


@functools.cache
def kept_class(cls: type) -> type:
    return type(f"Kept{cls.__name__}", (Kept, cls), {"original": cls})


def _pipelined(model: nn.Module) -> PipelineMixin | None:
    for _, module in walk(model):
        if isinstance(module, PipelineMixin):
            return module
    return None


def find(model: nn.Module, options: dict) -> list[Site]:
    body = _pipelined(model)
    if body is None:
        return [Site("", "none", {"why": NOT_PIPELINED})]
    if body.pipeline_size == 1:
        return [Site("", "none", {"why": ONE_RANK})]
    group = mx.distributed.init()
    if (group.size(), group.rank()) != (body.pipeline_size, body.pipeline_rank):
        raise ElideError(
            WRONG_GROUP.format(
                size=body.pipeline_size,
                rank=body.pipeline_rank,
                group_size=group.size(),
                group_rank=group.rank(),
            )
        )
    path = head_path(model)
    if path is None:
        return [Site("", "none", {"why": NO_HEAD})]
    if body.pipeline_rank == 0:
        return [Site(path, "final")]
    return [Site(path, "elided", {"changes_logits": True})]


def why_not(model: nn.Module, site: Site, options: dict) -> str | None:
    if site.kind == "none":
        return site.detail["why"]
    if isinstance(module_at(model, site.path), (Kept, ElidedHead)):
        return ALREADY_APPLIED
    return None


def _is_tied(model: nn.Module, head: nn.Module) -> bool:
    arrays = {id(v) for _, v in tree_flatten(head.parameters())}
    return any(
        id(v) in arrays
        for path, m in walk(model)
        if isinstance(m, EMBEDDINGS)
        for _, v in tree_flatten(m.parameters())
        if not path.endswith("lm_head")
    )


def _release(head: nn.Module, model_dir: str | None) -> bool:
    """Swap the head's arrays for unevaluated reads of the checkpoint's equal
    ``lm_head.*``, so they take no memory until undo puts the head back."""
    if not model_dir:
        return False
    held = dict(tree_flatten(head.parameters()))
    on_disk = {
        k.removeprefix("lm_head."): v
        for k, v in read_arrays(model_dir, "lm_head.").items()
    }
    if on_disk.keys() != held.keys() or not all(
        on_disk[k].shape == v.shape and mx.array_equal(on_disk[k], v).item()
        for k, v in held.items()
    ):
        return False
    lazy = read_arrays(model_dir, "lm_head.")  # fresh, never evaluated
    head.update(
        tree_unflatten([(k.removeprefix("lm_head."), v) for k, v in lazy.items()])
    )
    return True


def rewrite(model: nn.Module, site: Site, options: dict) -> None:
    parent, key = parent_and_key(model, site.path)
    head = parent[key]
    if site.kind == "final":
        parent[key] = rebuilt(head, kept_class(type(head)))
        return
    mib = sum(v.nbytes for _, v in tree_flatten(head.parameters())) / 2**20
    released = False
    if _is_tied(model, head):
        site.detail["note"] = TIED
    elif released := _release(head, options.get("model_dir")):
        site.detail["note"] = RELEASED.format(mib=mib)
    else:
        site.detail["note"] = KEPT
    parent[key] = ElidedHead(head, head.weight.shape[0], released)


def undo(model: nn.Module, path: str) -> None:
    parent, key = parent_and_key(model, path)
    head = parent[key]
    if isinstance(head, ElidedHead):
        parent[key] = head.held
    else:
        parent[key] = rebuilt(head, type(head).original)


def applied(model: nn.Module) -> list[str]:
    return [p for p, m in walk(model) if isinstance(m, (Kept, ElidedHead))]


def probe(model: nn.Module, site: Site, dtype, options: dict):
    tokens = mx.array(PROBE_TOKENS)

    def run():
        token = broadcast_token(mx.argmax(model(tokens)[:, -1, :], axis=-1))
        return [token.astype(mx.float32)]

    return run


def warnings(model: nn.Module, options: dict) -> list[str]:
    body = _pipelined(model)
    return [SAMPLER] if body is not None and body.pipeline_size > 1 else []


PASS = Pass(
    name="elide_head",
    summary="pipeline ranks other than 0 skip the LM head; use elide_head.sampler",
    find=find,
    why_not=why_not,
    rewrite=rewrite,
    undo=undo,
    applied=applied,
    probe=probe,
    requires=("untied_head",),
    warnings=warnings,
)
