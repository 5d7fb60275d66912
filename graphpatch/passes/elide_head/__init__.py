"""elide_head: pipeline ranks that do not produce the output skip the LM head.

Rewrite:       on a pipelined model (mlx-lm's PipelineMixin after
               ``model.model.pipeline(group)``; rank 0 runs the last layers),
               ranks other than 0: head(h) -> zeros of the logits' shape that
               depend on h, so any edge a runtime hangs on the logits still
               runs. Rank 0 keeps its head. ``sampler(...)`` wraps an mlx-lm
               sampler: rank 0 samples, the token reaches every rank through
               an all_sum of B integers. With ``elide_head:logits`` the
               others get rank 0's logits instead (one all_sum of the head's
               output; pair with last_token), so a program's own sampler
               works unchanged. Then, on every rank, the body's all-gather of
               h -> nothing (pipeline.Ungathered);
               ``elide_head:keep_gather`` keeps it. An untied head's arrays
               are released on the elided ranks when they can be re-read
               from the checkpoint (undo reloads them).
Preconditions: a pipeline group of more than one rank, the global group the
               pipeline was built on, and an explicit head (untied_head). The
               gather goes only once the head is elided on every rank, and
               only if the body then really stops gathering (proven).
Equivalence:   the sampled token on every rank equals the unpatched model's;
               rank 0's logits are unchanged; logits on the other ranks are
               zeros by design, or rank 0's with ``logits``.
"""

import mlx.core as mx
import mlx.nn as nn

from graphpatch.compare import PROBE_TOKENS
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
    module_at,
    unmark_at,
    walk,
)
from graphpatch.passes.elide_head.pipeline import (
    Elided,
    Kept,
    Shared,
    Ungathered,
    broadcast_token,
    check_group,
    gather_taken,
    is_elided,
    pipelined,
    restore,
    stand_in,
)
from graphpatch.passes.elide_head.pipeline import ElideError as ElideError  # find's
from graphpatch.passes.elide_head.pipeline import sampler as sampler  # documented
from graphpatch.passes.heads import head_path

ALREADY_APPLIED = "already applied"
NOT_PIPELINED = "not a pipelined model (no PipelineMixin)"
ONE_RANK = "pipeline of one rank: every rank produces the output"
NO_HEAD = "no explicit LM head: untied_head made none (see its report)"
GATHER_KEPT = "all-gather kept (elide_head:keep_gather)"
HEAD_NOT_ELIDED = "the head is not elided, so the logits still need the gathered h"
STILL_GATHERS = (
    "the body still all-gathers h without its `pipeline_size > 1` test; restored"
)
UNSAVABLE = "an elided model is one rank's view: save it before elide_head"
NEEDS_SAMPLER = (
    "elide_head needs elide_head.sampler(...) where the program samples, "
    "which graphpatch run cannot add: use elide_head:logits (rank 0's "
    "logits reach every rank), or apply it from your runtime"
)
SAMPLER = (
    "elide_head: ranks other than 0 return zero logits; sample with "
    "graphpatch.passes.elide_head.sampler(...) (mlx-lm's sampler=) so every "
    "rank gets rank 0's token, or apply elide_head:logits"
)


def find(model: nn.Module, options: Options, context: Context) -> list[Site]:
    found = pipelined(model)
    if found is None:
        return [Site("", "none", skip=NOT_PIPELINED)]
    body_path, body = found
    if body.pipeline_size == 1:
        return [Site("", "none", skip=ONE_RANK)]
    check_group(body)
    path = head_path(model)
    if path is None:
        return [Site("", "none", skip=NO_HEAD)]
    # Every rank has these two sites: their checks are collectives.
    if body.pipeline_rank == 0:
        head = Site(path, "final", collective=True)
    else:
        moves = not options["logits"]  # zeros, unless rank 0's are shared
        head = Site(path, "elided", collective=True, changes_logits=moves)
    return [head, Site(body_path, "gather", collective=True, detail={"head": path})]


def why_not(
    model: nn.Module, site: Site, options: Options, context: Context
) -> str | None:
    module = module_at(model, site.path)
    if is_elided(module) or isinstance(module, Ungathered):
        return ALREADY_APPLIED
    if site.kind != "gather":
        return None
    if options["keep_gather"]:
        return GATHER_KEPT
    if not is_elided(module_at(model, site.detail["head"])):
        return HEAD_NOT_ELIDED
    return None


def rewrite(
    model: nn.Module, site: Site, options: Options, context: Context
) -> str | None:
    if site.kind == "elided":
        return stand_in(model, site.path, context.model_dir, options["logits"])
    if site.kind == "gather":
        mark_at(model, site.path, Ungathered)
    else:
        mark_at(model, site.path, Shared if options["logits"] else Kept)
    return None


def undo(model: nn.Module, path: str) -> None:
    if isinstance(module_at(model, path), Elided):
        restore(model, path)
    else:
        unmark_at(model, path)


def applied(model: nn.Module) -> list[str]:
    return [p for p, m in walk(model) if is_elided(m) or isinstance(m, Ungathered)]


def probe(model: nn.Module, site: Site, options: Options, context: Context) -> Probe:
    tokens = mx.array(PROBE_TOKENS)

    def run() -> list[mx.array]:
        logits = model(tokens)[:, -1, :]
        token = broadcast_token(mx.argmax(logits, axis=-1)).astype(mx.float32)
        # Every rank's logits must stay when the gather goes, and when the
        # head goes with ``logits``; without it the others' turn to zeros,
        # so the head's own check can only ask for the token.
        if site.kind == "gather" or options["logits"]:
            return [token, logits]
        return [token]

    return run


def confirm(
    model: nn.Module, site: Site, options: Options, context: Context
) -> str | None:
    if site.kind != "gather":
        return None
    tokens = mx.array(PROBE_TOKENS)
    return STILL_GATHERS if gather_taken(module_at(model, site.path), tokens) else None


def warnings(model: nn.Module, options: Options, context: Context) -> list[str]:
    found = pipelined(model)
    if options["logits"] or not found or found[1].pipeline_size == 1:
        return []
    return [SAMPLER]


def needs_caller(options: Options) -> str | None:
    return None if options["logits"] else NEEDS_SAMPLER


PASS = Pass(
    name="elide_head",
    summary="pipeline ranks other than 0 skip the LM head, every rank the gather; "
    "use elide_head.sampler",
    find=find,
    why_not=why_not,
    rewrite=rewrite,
    undo=undo,
    applied=applied,
    proof=Proof(probe, confirm=confirm),
    saving=Saving(refused=UNSAVABLE),
    settings=Settings(
        defaults={"keep_gather": False, "logits": False},
        warnings=warnings,
        needs_caller=needs_caller,
    ),
    requires=("untied_head",),
)
