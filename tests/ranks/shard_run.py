"""One rank that loads with mlx_lm.load, for graphpatch run --passes shard.

argv: MODEL_DIR. Prints one JSON line: the all-to-sharded layers this rank
holds and the argmax of its last-position logits.
"""

import json
import sys

import mlx.core as mx
import mlx_lm
from mlx.nn.layers.distributed import AllToShardedLinear

group = mx.distributed.init(backend="ring", strict=True)
model, _ = mlx_lm.load(sys.argv[1])
sharded = [p for p, m in model.named_modules() if isinstance(m, AllToShardedLinear)]
logits = model(mx.array([[5, 9, 33, 2, 17, 41, 8, 3]]))
result = {
    "rank": group.rank(),
    "sharded": len(sharded),
    "argmax": mx.argmax(logits[:, -1], axis=-1).tolist(),
    "logits": logits[0, -1, :8].tolist(),
}
print(json.dumps(result))
