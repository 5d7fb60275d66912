"""last_token: long calls run the LM head on their last ``keep`` positions.

Rewrite:       head(h) -> head(h[:, -keep:, :]) when the call has more than
               ``short`` positions (a prefill), head(h) otherwise (decode,
               speculative verification of num_draft + 1 positions), at the
               explicit head that untied_head provides (a top-level lm_head /
               output, or the embedding's lm_head for tied models). The head
               becomes a subclass copy of its own class (same arrays, same
               parameter paths); everything after it in __call__ still runs.
               A head computed inline (no head module): the body holding
               the layers returns the kept positions instead (inline.py).
Preconditions: an explicit head (untied_head runs first and is pulled in),
               or a body, consulted by the model's __call__ (the patched
               model must return keep positions for a long call).
Equivalence:   the last ``keep`` positions of a long call and every position
               of a short one equal the unpatched model's.
"""

import mlx.core as mx
import mlx.nn as nn

from graphpatch.contract import (
    Context,
    Pass,
    Site,
    TakenOver,
    mark,
    marked,
    module_at,
    parent_and_key,
    unmark,
)
from graphpatch.heads import head_input, head_path, head_tap
from graphpatch.limits import context_length
from graphpatch.passes.last_token.inline import (
    INLINE,
    Keeps,
    LastPositions,
    body_path,
    body_probe,
    long_tokens,
)

# The head's positions at each call; beyond this the pass saves nothing, and
# the probe (keep+ positions) would cost more than a real prompt.
MAX_KEEP = 1024
ALREADY_APPLIED = "already applied"
NO_HEAD = "no explicit LM head: untied_head made none (see its report)"
HEAD_ELIDED = (
    "the head is elided (elide_head): name last_token in the same apply, "
    "which runs it first"
)
NOT_CONSULTED = "the model's __call__ does not run its head through {path}"
SPECULATIVE = (
    "last_token:short={short}: calls of up to {n} positions keep every "
    "position; speculative decoding needs num_draft + 1 of them"
)


class LastToken(Keeps):
    """The marker this pass puts on a head: it runs on the last ``keep``
    positions of calls longer than ``short``."""

    def __call__(self, x):
        if x.ndim >= 3:
            x = x[..., -self.kept(x.shape[-2]) :, :]
        return super().__call__(x)  # type: ignore[misc]  # the head's own


def find(model: nn.Module, options: dict, context: Context) -> list[Site]:
    # Every rank of a sharded or pipelined model has its head, and the
    # probe runs the whole model: its collectives.
    if (path := head_path(model)) is not None:
        return [Site(path, "head", collective=True)]
    if (path := body_path(model)) is not None:
        return [Site(path, "body", note=INLINE, collective=True)]
    return [Site("", "none")]


def why_not(
    model: nn.Module, site: Site, options: dict, context: Context
) -> str | None:
    if site.kind == "none":
        return NO_HEAD
    head = module_at(model, site.path)
    if isinstance(head, TakenOver):
        return HEAD_ELIDED
    if isinstance(head, Keeps):
        return ALREADY_APPLIED
    return None


def rewrite(model: nn.Module, site: Site, options: dict, context: Context) -> None:
    parent, key = parent_and_key(model, site.path)
    keep, short = options["keep"], options["short"]
    marker = LastToken if site.kind == "head" else LastPositions
    parent[key] = mark(parent[key], marker, keep=keep, short=short)


def undo(model: nn.Module, path: str) -> None:
    parent, key = parent_and_key(model, path)
    parent[key] = unmark(parent[key])


def applied(model: nn.Module) -> list[str]:
    return marked(model, Keeps)


def options_in(model: nn.Module) -> dict:
    heads = [module_at(model, path) for path in applied(model)]
    return {"keep": heads[0].keep, "short": heads[0].short} if heads else {}


def taps(model: nn.Module, options: dict, context: Context) -> list[tuple[str, str]]:
    tap = head_tap(model)
    return [tap] if tap else []


def _long(options: dict) -> int:
    return max(options["keep"], options["short"]) + 1


def probe(
    model: nn.Module, site: Site, dtype, options: dict, recorded: dict, context: Context
):
    # The head's recorded input (a head matmul, not a forward): its last
    # positions repeated into a long call, and two of them as a short one.
    # The head treats each position alike; only the last keep of a long call
    # are computed, before (sliced here) and after (sliced by the pass).
    keep = options["keep"]
    if site.kind == "body":
        return body_probe(model, site.path, _long(options), keep)
    h = head_input(model, dtype, recorded, positions=2)
    long = mx.concatenate([h] * _long(options), axis=-2)[..., -_long(options) :, :]
    short = h[..., -min(2, max(keep, options["short"])) :, :]

    def run():
        head = module_at(model, site.path)
        last = long if isinstance(head, LastToken) else long[..., -keep:, :]
        return [head(last), head(short)]

    return run


def confirm(
    model: nn.Module, site: Site, options: dict, context: Context
) -> str | None:
    """A long call's output really has ``keep`` positions: read from the shape
    of a forward that is built, never evaluated."""
    shape = model(long_tokens(_long(options))).shape
    return None if shape[1] == options["keep"] else NOT_CONSULTED.format(path=site.path)


def validate(options: dict, model: nn.Module | None = None) -> str | None:
    for key in ("keep", "short"):
        low = 1 if key == "keep" else 0
        if not low <= (value := options[key]) <= MAX_KEEP:
            return f"last_token:{key} must be between {low} and {MAX_KEEP}, got {value}"
    if model is not None and _long(options) > (context := context_length(model)):
        return (
            f"last_token:keep={options['keep']},short={options['short']} "
            f"reach past the model's context ({context})"
        )
    return None


def warnings(model: nn.Module, options: dict, context: Context) -> list[str]:
    n = max(options["keep"], options["short"])
    return [SPECULATIVE.format(short=options["short"], n=n)] if n < 8 else []


PASS = Pass(
    name="last_token",
    summary="LM head on the last keep positions only: no (B, S, vocab) on prefill",
    find=find,
    why_not=why_not,
    rewrite=rewrite,
    undo=undo,
    applied=applied,
    probe=probe,
    options={"keep": 1, "short": 32},
    requires=("untied_head",),
    validate=validate,
    warnings=warnings,
    options_in=options_in,
    taps=taps,
    confirm=confirm,
)
