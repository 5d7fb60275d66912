"""last_token: a prefill runs the LM head on its last ``keep`` positions.

Rewrite:       body(...) -> body(...)[:, -keep:, :] at the body holding the
               layers (``model.model``), for the calls rule.py lets it cut:
               a call into an empty cache, longer than ``max(keep, short)``,
               that its caller declared a prefill (``prefill()``) or, with
               ``last_token:prefill``, any such call. Every other call
               (without a cache: scoring, perplexity, training; continuing a
               cache: decode, speculative verification) is left whole. The
               body becomes a subclass copy of its own class (same arrays,
               same parameter paths); the head and everything after it in
               the model's __call__ run on the kept positions, whether the
               head is a module or computed inline.
Preconditions: a body holding the model's layers whose __call__ takes a
               ``cache`` (else: the reason), a head not elided (elide_head).
Equivalence:   the last ``keep`` positions of a cut call, and every position
               of any other call, equal the unpatched model's.
"""

import mlx.nn as nn

from graphpatch.contract import (
    Context,
    Options,
    Pass,
    Probe,
    Proof,
    Saving,
    Settings,
    Site,
    mark_at,
    marked,
    module_at,
    unmark_at,
)
from graphpatch.limits import context_length
from graphpatch.passes.heads import TakenOver, head_path
from graphpatch.passes.last_token.body import (
    INLINE,
    body_path,
    body_probe,
    positions,
)
from graphpatch.passes.last_token.rule import LastPositions, takes_cache
from graphpatch.passes.last_token.rule import prefill as prefill  # documented

# The head's positions at each call; beyond this the pass saves nothing, and
# the probe (keep+ positions) would cost more than a real prompt.
MAX_KEEP = 1024
ALREADY_APPLIED = "already applied"
NO_BODY = "no module holding the model's layers: nothing sees a call's cache"
NO_CACHE = (
    "{path}.__call__ takes no cache: a prefill cannot be told from a call "
    "that scores every position"
)
HEAD_ELIDED = (
    "the head is elided (elide_head): name last_token in the same apply, "
    "which runs it first"
)
NOT_CONSULTED = (
    "{path} does not shape the model's output: {length} positions gave "
    "{got} (a prefill, without a cache, continuing one; want {want})"
)
UNDECLARED = (
    "last_token:prefill cuts every call into an empty cache longer than {n} "
    "positions: not for scoring with a fresh cache (mlx_lm evaluate's "
    "loglikelihood_rolling) nor speculative decoding from a one-token prompt "
    "with num_draft >= {n}"
)


def find(model: nn.Module, options: Options, context: Context) -> list[Site]:
    # Every rank of a sharded or pipelined model has its body, and the
    # probe runs the whole model: its collectives.
    if (path := body_path(model)) is None:
        return [Site("", "none", skip=NO_BODY)]
    note = None if head_path(model) is not None else INLINE
    return [Site(path, "body", note=note, collective=True)]


def why_not(
    model: nn.Module, site: Site, options: Options, context: Context
) -> str | None:
    if (head := head_path(model)) is not None and isinstance(
        module_at(model, head), TakenOver
    ):
        return HEAD_ELIDED
    body = module_at(model, site.path)
    if isinstance(body, LastPositions):
        return ALREADY_APPLIED
    return None if takes_cache(type(body)) else NO_CACHE.format(path=site.path)


def rewrite(model: nn.Module, site: Site, options: Options, context: Context) -> None:
    settings = {k: options[k] for k in ("keep", "short", "prefill")}
    mark_at(model, site.path, LastPositions, **settings)


def undo(model: nn.Module, path: str) -> None:
    unmark_at(model, path)


def applied(model: nn.Module) -> list[str]:
    return marked(model, LastPositions)


def options_in(model: nn.Module) -> Options:
    bodies = [module_at(model, path) for path in applied(model)]
    if not bodies:
        return {}
    return {k: getattr(bodies[0], k) for k in ("keep", "short", "prefill")}


def _long(options: Options) -> int:
    return max(options["keep"], options["short"]) + 1


def probe(model: nn.Module, site: Site, options: Options, context: Context) -> Probe:
    return body_probe(model, site.path, _long(options), options["keep"])


def confirm(
    model: nn.Module, site: Site, options: Options, context: Context
) -> str | None:
    """A prefill really returns ``keep`` positions, and a call without a cache
    or continuing one every position."""
    length = _long(options)
    got, want = positions(model, length), (options["keep"], length, length)
    if got == want:
        return None
    return NOT_CONSULTED.format(path=site.path, length=length, got=got, want=want)


def validate(model: nn.Module | None, options: Options) -> str | None:
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


def warnings(model: nn.Module, options: Options, context: Context) -> list[str]:
    n = max(options["keep"], options["short"])
    return [UNDECLARED.format(n=n)] if options["prefill"] else []


PASS = Pass(
    name="last_token",
    summary="LM head on a prefill's last keep positions only: no (B, S, vocab)",
    find=find,
    why_not=why_not,
    rewrite=rewrite,
    undo=undo,
    applied=applied,
    proof=Proof(probe, confirm=confirm),
    saving=Saving(options_in=options_in),
    settings=Settings(
        defaults={"keep": 1, "short": 32, "prefill": False},
        validate=validate,
        warnings=warnings,
    ),
    requires=("untied_head",),
)
