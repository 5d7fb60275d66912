"""last_token on a model that computes its head inline (``h @ W.T`` in its
own ``__call__``: seed_oss tied, talkie), where there is no head to wrap: the
body whose output the head reads returns the kept positions instead.
"""

import mlx.core as mx
import mlx.nn as nn

from graphpatch.contract import module_at, walk
from graphpatch.verify import PROBE_TOKENS

INLINE = "the head is computed inline: the body's output keeps the last positions"


class Keeps:
    """How many positions a call keeps: the last ``keep`` of calls longer
    than ``short``, every one of shorter calls."""

    keep: int = 1
    short: int = 32

    def kept(self, length: int) -> int:
        """How many positions a call of ``length`` returns (elide_head's
        stand-in asks, to shape its zeros like rank 0's logits)."""
        return self.keep if length > max(self.keep, self.short) else length


class LastPositions(Keeps):
    """The marker on a body whose output an inline head reads."""

    def __call__(self, *args, **kwargs):
        h = super().__call__(*args, **kwargs)  # type: ignore[misc]  # the body's
        return h[..., -self.kept(h.shape[-2]) :, :] if h.ndim >= 3 else h


def body_path(model: nn.Module) -> str | None:
    """The child of the model holding its layers (``model.model``): the
    body whose output the head reads, or None."""
    layers = getattr(model, "layers", None)
    if not isinstance(layers, list) or not layers:
        return None
    for key, child in model.items():
        if isinstance(child, nn.Module) and any(m is layers[0] for _, m in walk(child)):
            return key
    return None


def long_tokens(length: int) -> mx.array:
    """One row of probe tokens, ``length`` long."""
    row = PROBE_TOKENS[0] * (1 + length // len(PROBE_TOKENS[0]))
    return mx.array([row[:length]])


def body_probe(model: nn.Module, site_path: str, length: int, keep: int):
    """The model's logits on a long call (its last ``keep``) and a short one."""
    long, short = long_tokens(length), long_tokens(2)

    def run():
        logits = model(long)
        if not isinstance(module_at(model, site_path), LastPositions):
            logits = logits[:, -keep:, :]
        return [logits, model(short)]

    return run
