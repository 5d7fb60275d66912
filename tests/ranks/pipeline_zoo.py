"""One rank of elide_head on any pipelined architecture: build it from the
coverage's small config (the same seeded weights on every rank), pipeline it,
decode greedily, apply elide_head, decode again.

argv: ARCH [LAYERS]. Prints one JSON line: this rank's tokens before and after, and
each elide_head site's kind, status and reason, or the error it got.
"""

import json
import sys

import mlx.core as mx
from mlx_lm.models.cache import make_prompt_cache

import graphpatch
from graphpatch.passes import elide_head
from graphpatch.passes.elide_head.pipeline import pipelined
from graphpatch.testing.small_configs import build

PROMPT = [[1, 7, 42, 5, 60, 3, 11, 2]]

group = mx.distributed.init(backend="ring", strict=True)
layers = {"num_hidden_layers": int(sys.argv[2])} if sys.argv[2:] else {}
model = build(sys.argv[1], **layers)
_, body = pipelined(model)
body.pipeline(group)
mx.eval(model.parameters())


def decode(sample, steps: int = 6) -> list[int]:
    """Prefill, then decode: every rank evaluates only the sampled token."""
    cache = make_prompt_cache(model)
    y, tokens = mx.array(PROMPT), []
    for _ in range(steps):
        token = sample(model(y, cache=cache)[:, -1, :])
        mx.eval(token)
        tokens.append(token.item())
        y = token[:, None]
    return tokens


result = {"rank": group.rank(), "plain": decode(lambda x: mx.argmax(x, axis=-1))}
try:
    report = graphpatch.apply(model, ["elide_head"])
except graphpatch.GraphpatchError as e:
    print(json.dumps(result | {"error": str(e)}))
    sys.exit(0)
sites = report.for_pass("elide_head")
result["sites"] = [[s.kind, s.status, s.reason] for s in sites]
result["elided"] = decode(elide_head.sampler())
print(json.dumps(result))
