"""The token embedding: which module it is, and how wide its rows are.
Core facts a pass and the input checks (``limits``) both need."""

import mlx.core as mx
import mlx.nn as nn

from graphpatch.compare import PROBE_TOKENS
from graphpatch.contract import walk

EMBEDDINGS = (nn.Embedding, nn.QuantizedEmbedding)


def logits_width(model: nn.Module) -> int | None:
    """The last dimension of the model's output, from the shapes of a forward
    that is built but never evaluated; None when the model cannot run."""
    try:
        return model(mx.array(PROBE_TOKENS)[:1, :2]).shape[-1]
    except Exception:
        return None


def find_embedding(model: nn.Module) -> tuple[str, nn.Module] | None:
    """The token embedding: the first embedding with one row per logit (a
    position embedding, like gpt2's wpe, has other rows)."""
    embeddings = [(p, m) for p, m in walk(model) if isinstance(m, EMBEDDINGS)]
    width = logits_width(model) if len(embeddings) > 1 else None
    for path, module in embeddings:
        if width in (None, module.weight.shape[0]):
            return path, module
    return embeddings[0] if embeddings else None


def dims_of(embedding: nn.Module) -> int:
    if isinstance(embedding, nn.QuantizedEmbedding):
        return embedding.dims
    return embedding.weight.shape[1]
