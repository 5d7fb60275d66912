"""mlx-lm's pipeline parallelism (``PipelineMixin``) from the outside: find the
pipelined body, hand rank 0's token or logits to every rank, stand in for the
head on the others, and run the body without its all-gather of the final
hidden state.

Every PipelineMixin body in mlx-lm ends its forward with
``if pipeline_size > 1: h = mx.distributed.all_gather(h)[: h.shape[0]]`` so
that every rank can run the head on rank 0's h. Once rank 0's token is
broadcast, no rank needs that h. ``Ungathered`` bodies answer ``> 1`` with
False for the length of their own forward only; their recv, send and the
cache edges that keep the ranks in step are untouched. ``gather_taken``
proves it worked: a rank that still gathers sees rank 0's h exactly.
"""

from collections.abc import Callable
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten
from mlx_lm.models.pipeline import PipelineMixin

from graphpatch.contract import GraphpatchError, mark_at, module_at, unmark_at, walk
from graphpatch.embedding import EMBEDDINGS
from graphpatch.loading import read_arrays
from graphpatch.passes.heads import StandIn, TakenOver

RELEASED = "head skipped; its {mib:.1f} MiB released (re-read from the checkpoint)"
TIED = "head skipped; its arrays stay: they are the embedding's"
KEPT = "head skipped; its arrays stay in memory (no checkpoint copy to reload)"


WRONG_GROUP = (
    "the model is pipelined over {size} ranks (this is rank {rank}) but the "
    "global group has {group_size} ranks (this is rank {group_rank}): "
    "elide_head needs the pipeline on the global group"
)


class ElideError(GraphpatchError):
    """The pipeline and the distributed group do not match."""


def check_group(body: PipelineMixin) -> None:
    """Raise ElideError unless ``body`` is pipelined over the global group."""
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


def pipelined(model: nn.Module) -> tuple[str, PipelineMixin] | None:
    """The path and module of the model's PipelineMixin body, if it has one."""
    for path, module in walk(model):
        if isinstance(module, PipelineMixin):
            return path, module
    return None


def from_rank_0(x: mx.array, group: mx.distributed.Group | None = None) -> mx.array:
    """Rank 0's ``x`` on every rank: an all_sum in which the others add x * 0."""
    group = group or mx.distributed.init()
    # Times 0, not zeros_like: the sum must wait for this rank's own x (its
    # forward, its send), or the ranks would meet in different collectives.
    return mx.distributed.all_sum(x * (1 if group.rank() == 0 else 0), group=group)


def broadcast_token(
    token: mx.array, group: mx.distributed.Group | None = None
) -> mx.array:
    """Rank 0's token on every rank (a few bytes)."""
    return from_rank_0(token.astype(mx.uint32), group)


def sampler(
    sample: Callable[[mx.array], mx.array] | None = None,
    group: mx.distributed.Group | None = None,
) -> Callable[[mx.array], mx.array]:
    """An mlx-lm ``sampler=`` for elided models: ``sample`` (default greedy)
    runs on every rank, rank 0's result is the one every rank returns."""
    sample = sample or (lambda logprobs: mx.argmax(logprobs, axis=-1))

    def sample_on_rank_0(logprobs: mx.array) -> mx.array:
        return broadcast_token(sample(logprobs), group)

    return sample_on_rank_0


def broadcast_logits(logits: mx.array) -> mx.array:
    """Rank 0's logits on every rank, in float32: the ranks then agree on the
    dtype whatever their heads would have returned."""
    return from_rank_0(logits.astype(mx.float32))


class Elided(StandIn, TakenOver):
    """The marker on the head of a rank that does not produce the output: it
    returns zeros of the logits' shape, or rank 0's logits with ``share``.

    A released head holds no arrays while marked: undo reads them back from
    ``model_dir`` (set only when they were released)."""

    vocab: int = 0
    share: bool = False
    model_dir: str | None = None

    def __call__(self, h: mx.array) -> mx.array:
        # last_token cuts h itself, before the head: its positions are the logits'
        shape = (*h.shape[:-1], self.vocab)
        zeros = mx.broadcast_to(mx.zeros((1,) * len(shape), h.dtype), shape)
        zeros = mx.depends(zeros, h)
        return broadcast_logits(zeros).astype(h.dtype) if self.share else zeros


class Kept(TakenOver):
    """The marker elide_head puts on rank 0's head, which still computes."""


class Shared(Kept):
    """Rank 0's head, whose logits every rank receives (``logits``)."""

    def __call__(self, h: mx.array) -> mx.array:
        logits = super().__call__(h)  # type: ignore[misc]  # the head's own class
        return broadcast_logits(logits).astype(logits.dtype)


def is_elided(head: nn.Module) -> bool:
    """Whether elide_head stands in for this head, or marks it as rank 0's."""
    return isinstance(head, (Elided, Kept))


class NoGather(int):
    """The pipeline size, except that ``size > 1`` (mlx-lm's test for the
    gather) is False. Arithmetic gives plain ints, so recv and send still
    address the real neighbours.

    Why a value and not a module swap: the gather is a line inside the body's
    own ``__call__`` (``mx.distributed.all_gather``, a process-wide function
    whose replacement would reach every model and thread), and the only
    per-instance state that line reads is ``pipeline_size``, which the same
    forward also uses to address recv and send. A size that differs only in
    ``> 1`` is the one per-body switch; ``gather_taken`` proves it worked."""

    def __gt__(self, other: int) -> bool:
        return False if other == 1 else int(self) > other

    def __repr__(self) -> str:
        return f"NoGather({int(self)})"


class Ungathered:
    """The marker on a pipelined body whose forward skips the final gather."""

    pipeline_size: int  # the body's own

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        size = self.pipeline_size
        self.pipeline_size = NoGather(size)
        try:
            return super().__call__(*args, **kwargs)  # type: ignore[misc]  # the body's class
        finally:
            self.pipeline_size = size


def gather_taken(body: nn.Module, tokens: mx.array) -> bool:
    """Whether any rank's body output is still rank 0's (the gather ran).

    Runs the body once on every rank (a collective): after the gather every
    rank holds rank 0's h bit for bit; without it each holds its own."""
    group = mx.distributed.init()
    h = body(tokens).astype(mx.float32)
    same = mx.array_equal(h, from_rank_0(h)) & (group.rank() != 0)
    return mx.distributed.all_sum(same.astype(mx.int32), group=group).item() > 0


def is_tied(model: nn.Module, head: nn.Module) -> bool:
    """Whether the head's arrays are an embedding's (a tied head)."""
    arrays = {id(v) for _, v in tree_flatten(head.parameters())}
    return any(
        id(v) in arrays
        for path, m in walk(model)
        if isinstance(m, EMBEDDINGS)
        for _, v in tree_flatten(m.parameters())
        if not path.endswith("lm_head")
    )


def head_arrays(model_dir: str) -> dict[str, mx.array]:
    """The checkpoint's ``lm_head.*`` arrays under the head's own names."""
    on_disk = read_arrays(model_dir, "lm_head.")
    return {k.removeprefix("lm_head."): v for k, v in on_disk.items()}


def release_to_checkpoint(head: nn.Module, model_dir: str | None) -> bool:
    """Drop the head's arrays when the checkpoint's ``lm_head.*`` equal them,
    so that they take no memory until undo reads them back."""
    if not model_dir:
        return False
    held = dict(tree_flatten(head.parameters()))
    if any("." in k for k in held):  # only a head's own arrays are put back
        return False
    on_disk = head_arrays(model_dir)
    if on_disk.keys() != held.keys() or not all(
        on_disk[k].shape == v.shape and mx.array_equal(on_disk[k], v).item()
        for k, v in held.items()
    ):
        return False
    for key in held:
        del head[key]
    return True


def stand_in(model: nn.Module, path: str, model_dir: str | None, share: bool) -> str:
    """Mark the head at ``path`` as elided; returns the note that says what
    became of its arrays."""
    head = module_at(model, path)
    mib = sum(v.nbytes for _, v in tree_flatten(head.parameters())) / 2**20
    tied = is_tied(model, head)
    elided = mark_at(model, path, Elided, vocab=head.weight.shape[0], share=share)
    if tied:
        return TIED
    if release_to_checkpoint(elided, model_dir):
        elided.model_dir = model_dir
        return RELEASED.format(mib=mib)
    return KEPT


def restore(model: nn.Module, path: str) -> None:
    """Undo ``stand_in``: the head, its released arrays read back (lazily)
    from the checkpoint."""
    model_dir = module_at(model, path).model_dir
    head = unmark_at(model, path)
    if model_dir:
        for key, value in head_arrays(model_dir).items():
            head[key] = value
