"""One rank of the collective-failure test: a user's collective pass whose
rewritten site runs an all_sum when probed (as shard's blocks do), over every
RMSNorm of a zoo model. Rank 1's probe raises on the first site before any
rewrite; rank 0's rewrite raises on the second; rank 1's confirm refuses the
third and rank 0's raises on the fourth. Every rank must skip all four,
rewrite the rest and end. argv: MODEL_DIR. Prints one JSON line."""

import json
import sys

import mlx.core as mx
import mlx.nn as nn
import mlx_lm

import graphpatch
from graphpatch.contract import (
    Pass,
    Proof,
    Site,
    mark_at,
    marked,
    module_at,
    unmark_at,
    walk,
)

group = mx.distributed.init(backend="ring", strict=True)
rank = group.rank()


class Summed:
    """The norm's output, summed over the ranks and divided by their number:
    the same values, through a collective."""

    def __call__(self, x: mx.array) -> mx.array:
        out = super().__call__(x)  # type: ignore[misc]
        return mx.distributed.all_sum(out, group=group) / group.size()


def find(model, options, context):
    norms = [p for p, m in walk(model) if isinstance(m, nn.RMSNorm)]
    return [Site(p, "norm", collective=True) for p in norms]


def rewrite(model, site, options, context):
    if rank == 0 and site.path == find(model, options, context)[1].path:
        raise RuntimeError("rank 0 cannot rewrite this one")
    mark_at(model, site.path, Summed)


def probe(model, site, options, context):
    if rank == 1 and site.path == find(model, options, context)[0].path:
        raise RuntimeError("rank 1 cannot probe this one")
    norm = module_at(model, site.path)
    x = mx.ones((1, 2, norm.weight.shape[0]))
    return lambda: [module_at(model, site.path)(x)]


def confirm(model, site, options, context):
    third, fourth = (s.path for s in find(model, options, context)[2:4])
    if rank == 1 and site.path == third:
        return "rank 1 does not confirm this one"
    if rank == 0 and site.path == fourth:
        raise RuntimeError("rank 0 cannot confirm this one")
    return None


PASS = Pass(
    name="summed_norm",
    summary="every RMSNorm through an all_sum (its output unchanged)",
    find=find,
    why_not=lambda model, site, options, context: None,
    rewrite=rewrite,
    undo=unmark_at,
    applied=lambda model: marked(model, Summed),
    proof=Proof(probe, confirm=confirm),
)

model, _ = mlx_lm.load(sys.argv[1])
report = graphpatch.apply(model, [PASS])
print(
    json.dumps(
        {
            "rewritten": [s.path for s in report.rewritten()],
            "skipped": [[s.path, s.reason] for s in report.skipped()],
            "checks": [c.ok for c in report.checks],
        }
    )
)
