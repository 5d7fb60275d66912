"""One rank of the trust-agreement test: apply ``shard,fuse_glu`` through
``trust.apply`` in cached mode, with this rank's own record cache (argv:
MODEL_DIR CACHE_ROOT_PREFIX; the cache is PREFIX-RANK). Prints one JSON line:
whether this rank trusted a record or verified, and its logits' checksum."""

import json
import os
import sys

import mlx.core as mx
import mlx_lm

group = mx.distributed.init(backend="ring", strict=True)
os.environ["XDG_CACHE_HOME"] = f"{sys.argv[2]}-{group.rank()}"

from graphpatch import trust  # noqa: E402  (after the cache is chosen)

model, _ = mlx_lm.load(sys.argv[1])
report = trust.apply(model, "shard,fuse_glu", sys.argv[1], "cached")
logits = model(mx.array([[5, 9, 33, 2, 17, 41, 8, 3]]))[:, -1]
print(
    json.dumps(
        {
            "trusted": bool(report.record_used and report.record_used.trusted),
            "verified": report.verified,
            "sum": logits.astype(mx.float32).sum().item(),
        }
    )
)
