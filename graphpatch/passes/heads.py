"""The LM head: where it is, where its input can be recorded, and the markers
the head passes put on it. Shared by untied_head, last_token and elide_head.
"""

from collections.abc import Iterator
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from graphpatch.contract import Recorded
from graphpatch.embedding import dims_of, find_embedding
from graphpatch.tapped import inputs

HEADS = (nn.Linear, nn.QuantizedLinear)


class TakenOver:
    """Marks a head one pass has taken over (elide_head's stand-in, and rank
    0's head it keeps): passes that wrap heads leave such a head alone, so
    that every rank of a group decides alike."""


class StandIn:
    """Marks a head another pass stands in for: it may hold no vocabulary
    weight, only ``vocab``."""

    vocab: int


def _vocab_size(module: nn.Module) -> int | None:
    if isinstance(module, StandIn):  # a head's arrays may be released
        return module.vocab
    return module.weight.shape[0] if isinstance(module, HEADS) else None


class Headed:
    """The marker untied_head puts on an embedding: its ``as_linear`` runs
    its explicit ``lm_head`` child."""

    lm_head: nn.Module  # set by untied_head

    def as_linear(self, x: mx.array) -> mx.array:
        return self.lm_head(x)


def _near_top(model: nn.Module) -> Iterator[tuple[str, Any]]:
    """Children of the model and of its direct sub-modules (``lm_head``,
    ``model.embed_out``), never inside layer lists."""
    for key, child in model.items():
        yield key, child
        if isinstance(child, nn.Module):
            for name, grandchild in child.items():
                yield f"{key}.{name}", grandchild


def head_path(
    model: nn.Module, embedding: tuple[str, nn.Module] | None = None
) -> str | None:
    """Where the explicit head is: a vocabulary linear at the top (or one
    level down), or the ``lm_head`` untied_head gave the embedding."""
    embedding = embedding or find_embedding(model)
    if embedding is None:
        return None
    path, module = embedding
    for key, child in _near_top(model):
        if _vocab_size(child) == module.weight.shape[0]:
            return key
    return f"{path}.lm_head" if isinstance(module, Headed) else None


def bare_head(model: nn.Module, embedding: nn.Module) -> str | None:
    """A vocabulary matrix at the top kept as a bare array (talkie's
    ``lm_head``), which the model's ``__call__`` multiplies inline."""
    rows = embedding.weight.shape[0]
    for key, child in _near_top(model):
        if isinstance(child, mx.array) and child.ndim == 2 and child.shape[0] == rows:
            return key
    return None


def head_tap(model: nn.Module) -> tuple[str, str] | None:
    """Where the head's input can be recorded: a top-level vocabulary
    linear's ``__call__``, or the embedding's ``as_linear`` (a tied head,
    before and after untied_head gives it an explicit lm_head)."""
    embedding = find_embedding(model)
    if embedding is None:
        return None
    path, module = embedding
    for key, child in _near_top(model):
        if _vocab_size(child) == module.weight.shape[0]:
            return key, "__call__"
    return path, "as_linear"


def head_input(
    model: nn.Module, dtype: mx.Dtype | None, recorded: Recorded, positions: int
) -> mx.array:
    """The last ``positions`` of what the model fed its head in the reference
    forward (the head treats each position alike, and with a large vocabulary
    it is most of a forward); synthetic inputs of ``dtype`` only where nothing
    was recorded."""
    tap = head_tap(model)
    calls = inputs(recorded, tap) if tap else []
    if calls:
        return calls[0][0][..., -positions:, :]
    embedding = find_embedding(model)
    if embedding is None:
        raise ValueError("no token embedding to size a head's input by")
    dims = dims_of(embedding[1])
    shape = (2, positions, dims)
    return mx.random.normal(shape, key=mx.random.key(7)).astype(dtype)
