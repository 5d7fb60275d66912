"""One rank that loads with mlx-lm's own ``sharded_load`` (what its server
and chat use under mlx.launch), for graphpatch run --passes shard.

argv: MODEL_DIR [alone]; with ``alone`` the tensor group is a group of
this rank alone, smaller than the world (ring groups cannot split, so it is
a backend's group of one). Prints one JSON line: the all-to-sharded layers this rank
holds and its last-position logits, or the loader's error.
"""

import json
import sys

import mlx.core as mx
from mlx.nn.layers.distributed import AllToShardedLinear
from mlx_lm.utils import sharded_load

group = mx.distributed.init(backend="ring", strict=True)
alone = sys.argv[2:] == ["alone"]
tensor_group = mx.distributed.init(backend="mpi", strict=False) if alone else None
try:
    model, _ = sharded_load(sys.argv[1], tensor_group=tensor_group)
except ValueError as e:
    print(json.dumps({"rank": group.rank(), "error": str(e)}))
    raise SystemExit(0) from None
sharded = [p for p, m in model.named_modules() if isinstance(m, AllToShardedLinear)]
logits = model(mx.array([[5, 9, 33, 2, 17, 41, 8, 3]]))[0, -1]
result = {"rank": group.rank(), "sharded": len(sharded), "logits": logits.tolist()}
print(json.dumps(result))
