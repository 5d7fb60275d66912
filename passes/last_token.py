"""last_token: the LM head runs on the last ``keep`` positions only.

Rewrite:       head(h) -> head(h[:, -keep:, :]) at the explicit head that
               untied_head provides (a top-level lm_head / output, or the
               embedding's lm_head for tied models). The head becomes a
               subclass copy of its own class (same arrays, same parameter
               paths); everything after it in the model's __call__ still runs.
Preconditions: an explicit head (untied_head runs first and is pulled in),
               consulted by the model's __call__ (the patched model must
               return keep positions).
Equivalence:   the last ``keep`` positions equal the unpatched model's;
               (B, keep, vocab) when S > keep, unchanged otherwise.
"""

import functools

import mlx.core as mx
import mlx.nn as nn

from graphpatch.contract import Pass, Site, module_at, parent_and_key, rebuilt, walk
from graphpatch.heads import head_input, head_path, head_tap
from graphpatch.limits import context_length
from graphpatch.pipeline import is_elided
from graphpatch.verify import PROBE_TOKENS

# The head's positions at each call; beyond this the pass saves nothing, and
# the probe (2 rows of keep+ tokens) would cost more than a real prompt.
MAX_KEEP = 1024
ALREADY_APPLIED = "already applied"
NO_HEAD = "no explicit LM head: untied_head made none (see its report)"
HEAD_ELIDED = (
    "the head is elided (elide_head): name last_token in the same apply, "
    "which runs it first"
)
NOT_CONSULTED = "the model's __call__ does not run its head through {path}"
SPECULATIVE = (
    "last_token keeps {keep} position(s): speculative decoding needs "
    "keep >= num_draft + 1 (with fewer, mlx-lm checks drafts against the "
    "wrong positions)"
)


class LastToken:
    """Marks the classes this pass makes; ``keep`` is set per instance and
    ``original`` names the class it was made from."""

    keep: int = 1
    original: type


def _last(x: mx.array, keep: int) -> mx.array:
    return x[..., -keep:, :] if x.ndim >= 3 and x.shape[-2] > keep else x


@functools.cache
def last_token_class(cls: type) -> type:
    def __call__(self, x):
        return cls.__call__(self, _last(x, self.keep))

    body = {"__call__": __call__, "original": cls}
    return type(f"LastToken{cls.__name__}", (LastToken, cls), body)


def find(model: nn.Module, options: dict) -> list[Site]:
    path = head_path(model)
    if path is None:
        return [Site("", "none")]
    # Every rank of a sharded or pipelined model has its head, and the
    # probe runs the whole model: its collectives.
    return [Site(path, "head", {"collective": True})]


def why_not(model: nn.Module, site: Site, options: dict) -> str | None:
    if site.kind == "none":
        return NO_HEAD
    head = module_at(model, site.path)
    if is_elided(head):
        return HEAD_ELIDED
    if isinstance(head, LastToken):
        return ALREADY_APPLIED
    return None


def rewrite(model: nn.Module, site: Site, options: dict) -> None:
    parent, key = parent_and_key(model, site.path)
    head = rebuilt(parent[key], last_token_class(type(parent[key])))
    head.keep = options["keep"]
    parent[key] = head


def undo(model: nn.Module, path: str) -> None:
    parent, key = parent_and_key(model, path)
    head = rebuilt(parent[key], type(parent[key]).original)
    del vars(head)["keep"]
    parent[key] = head


def applied(model: nn.Module) -> list[str]:
    return [p for p, m in walk(model) if isinstance(m, LastToken)]


def options_in(model: nn.Module) -> dict:
    heads = [module_at(model, path) for path in applied(model)]
    return {"keep": heads[0].keep} if heads else {}


def taps(model: nn.Module, options: dict) -> list[tuple[str, str]]:
    tap = head_tap(model)
    return [tap] if tap else []


def probe(model: nn.Module, site: Site, dtype, options: dict, recorded: dict):
    # The head's recorded input: a head matmul, not a forward of the model.
    keep = options["keep"]
    h = head_input(model, dtype, recorded, positions=keep + 1)  # S > keep

    def run():
        return [module_at(model, site.path)(h)[..., -keep:, :]]

    return run


def confirm(model: nn.Module, site: Site, options: dict) -> str | None:
    """The model's output really has ``keep`` positions: read from the shape
    of a forward that is built, never evaluated."""
    tokens = mx.array(PROBE_TOKENS)[:1, : options["keep"] + 1]
    shape = model(tokens).shape
    return None if shape[1] == options["keep"] else NOT_CONSULTED.format(path=site.path)


def validate(options: dict, model: nn.Module | None = None) -> str | None:
    keep = options["keep"]
    if not 1 <= keep <= MAX_KEEP:
        return f"last_token:keep must be between 1 and {MAX_KEEP}, got {keep}"
    if model is not None and keep >= (context := context_length(model)):
        return (
            f"last_token:keep={keep} is not less than the model's context ({context})"
        )
    return None


def warnings(model: nn.Module, options: dict) -> list[str]:
    return [SPECULATIVE.format(keep=options["keep"])] if options["keep"] == 1 else []


PASS = Pass(
    name="last_token",
    summary="LM head on the last keep positions only: no (B, S, vocab) on prefill",
    find=find,
    why_not=why_not,
    rewrite=rewrite,
    undo=undo,
    applied=applied,
    probe=probe,
    options={"keep": 1},
    requires=("untied_head",),
    validate=validate,
    warnings=warnings,
    options_in=options_in,
    taps=taps,
    confirm=confirm,
)
