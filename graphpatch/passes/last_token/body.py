"""Where last_token cuts: the body holding the layers, whatever computes the
head from its output (a head module, or ``h @ W.T`` inline in the model's own
``__call__``: seed_oss tied, talkie), and the checks that the cut follows
the rule (rule.py).
"""

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.cache import make_prompt_cache

from graphpatch.compare import PROBE_TOKENS
from graphpatch.contract import Probe, module_at, walk
from graphpatch.passes.last_token.rule import LastPositions, prefill, takes_cache

INLINE = "the head is computed inline: the body's output keeps the last positions"


def body_path(model: nn.Module) -> str | None:
    """The body whose output the head reads: the module holding the model's
    layers in a list (``model.model``, ``language_model.model``), or the
    nearest module above it that takes the cache (plamo's layers sit in a
    container that is never called). None when there is none below the
    model itself."""
    layers = getattr(model, "layers", None)
    if not isinstance(layers, list) or not layers:
        return None
    for path, module in walk(model):
        lists = [v for v in module.values() if isinstance(v, list)]
        # by identity: a pipelined body's list starts with other ranks' Nones
        if any(any(x is layers[0] for x in v) for v in lists):
            return _taking_cache(model, path)
    return None


def _taking_cache(model: nn.Module, path: str) -> str | None:
    """``path`` or its nearest ancestor whose ``__call__`` takes a cache
    (``path`` itself when none does: the skip reason names it)."""
    parts = path.split(".") if path else []
    for end in range(len(parts), 0, -1):
        if takes_cache(type(module_at(model, ".".join(parts[:end])))):
            return ".".join(parts[:end])
    return path or None


def long_tokens(length: int) -> mx.array:
    """One row of probe tokens, ``length`` long."""
    row = PROBE_TOKENS[0] * (1 + length // len(PROBE_TOKENS[0]))
    return mx.array([row[:length]])


def body_probe(model: nn.Module, site_path: str, length: int, keep: int) -> Probe:
    """The model's logits on a declared prefill into an empty cache (its
    last ``keep``) and on a short call without a cache."""
    long, short = long_tokens(length), long_tokens(2)

    def run() -> list[mx.array]:
        with prefill():
            logits = model(long, cache=make_prompt_cache(model))
        if not isinstance(module_at(model, site_path), LastPositions):
            logits = logits[:, -keep:, :]
        return [logits, model(short)]

    return run


def positions(model: nn.Module, length: int) -> tuple[int, int, int]:
    """How many positions a call of ``length`` returns as a declared prefill
    into an empty cache, without a cache, and continuing a cache: read from
    the shapes of forwards that are built, never evaluated."""
    tokens = long_tokens(length)
    with prefill():
        cut = model(tokens, cache=make_prompt_cache(model)).shape[1]
        cache = make_prompt_cache(model)
        model(tokens[:, :1], cache=cache)
        continued = model(tokens, cache=cache).shape[1]
    return cut, model(tokens).shape[1], continued
