"""What token ids and lengths a model can take, checked before MLX sees them
(MLX crashes on an id outside the embedding or a probe past all memory)."""

import mlx.nn as nn

from graphpatch.contract import GraphpatchError
from graphpatch.embedding import find_embedding, logits_width


class TokenError(GraphpatchError, ValueError):
    """Token ids the model cannot take: outside its vocabulary, or more
    positions than its context (MLX would crash on either, not raise)."""


CONTEXT_KEYS = (
    "max_position_embeddings",
    "n_positions",
    "n_ctx",
    "context_length",
    "seq_length",
)
UNKNOWN_CONTEXT = 8192  # assumed for a model whose args name no context


def context_length(model: nn.Module) -> int:
    """The longest sequence the model's config allows."""
    args = getattr(model, "args", None)
    for source in (args, getattr(args, "text_config", None)):
        values = source if isinstance(source, dict) else getattr(source, "__dict__", {})
        for key in CONTEXT_KEYS:
            value = values.get(key)
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return value
    return UNKNOWN_CONTEXT


def vocab_size(model: nn.Module) -> int | None:
    embedding = find_embedding(model)
    return embedding[1].weight.shape[0] if embedding else logits_width(model)


def check_tokens(model: nn.Module, rows: list[list[int]], what: str) -> None:
    """Refuse ids outside the vocabulary and rows longer than the context.

    Raises:
        TokenError: naming ``what`` (the probe, a golden prompt) and the limit.
    """
    vocab, context = vocab_size(model), context_length(model)
    for row in rows:
        if not row:
            raise TokenError(f"{what}: an empty row of token ids")
        if len(row) > context:
            raise TokenError(
                f"{what}: {len(row)} tokens, more than the model's context ({context})"
            )
        bad = [t for t in row if t < 0 or (vocab is not None and t >= vocab)]
        if bad:
            raise TokenError(
                f"{what}: token id {bad[0]} is outside the vocabulary "
                f"(0..{(vocab or 1) - 1})"
            )
