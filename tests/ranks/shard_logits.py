"""One rank of the shard tests: load, shard, compare with the unsharded model.

argv: MODEL_DIR [SPEC] [--mlx-lm] [--lazy]. SPEC is the pass spec (default
``shard``). ``--mlx-lm`` also shards a second copy with mlx-lm's own
``model.shard(group)`` and reports its logits and bytes; ``--lazy`` loads
lazily and applies unverified, as mlx-lm's sharded_load does. Prints one
JSON line.
"""

import json
import sys

import mlx.core as mx
import mlx_lm
from mlx.utils import tree_flatten

import graphpatch
from graphpatch.compare import compare

TOKENS = mx.array(
    [[5, 9, 33, 2, 17, 41, 8, 3, 12, 60], [7, 1, 4, 4, 30, 2, 9, 10, 11, 3]]
)


def nbytes(model) -> int:
    return sum(v.nbytes for _, v in tree_flatten(model.parameters()))


group = mx.distributed.init(backend="ring", strict=True)
args = sys.argv[1:]
path, spec = args[0], next((a for a in args[1:] if not a.startswith("--")), "shard")
reference, _ = mlx_lm.load(path)
expected = reference(TOKENS)
mx.eval(expected)
whole = nbytes(reference)
model, _ = mlx_lm.load(path, lazy="--lazy" in args)
report = graphpatch.apply(model, [spec], verify="--lazy" not in args)
logits = model(TOKENS)
mx.eval(logits)
cmp = compare([expected], [logits])
result = {
    "rank": group.rank(),
    "size": group.size(),
    "rewritten": [f"{s.path} ({s.kind})" for s in report.rewritten()],
    "skipped": sorted({s.reason for s in report.skipped()}),
    "max_error": cmp.max_error,
    "ok": cmp.ok,
    "top1": cmp.top1,
    "bytes": [whole, nbytes(model)],
    "sites": [[s.bytes_before, s.bytes_after] for s in report.rewritten()],
}
if "--mlx-lm" in args:
    theirs, _ = mlx_lm.load(path)
    theirs.shard(group)
    out = theirs(TOKENS)
    mx.eval(out)
    result["mlx_lm"] = {
        "max_error": compare([expected], [out]).max_error,
        "bytes": nbytes(theirs),
        "vs_ours": mx.abs(out - logits).max().item(),
    }
print(json.dumps(result))
