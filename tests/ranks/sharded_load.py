"""One rank that loads through mlx-lm's sharded_load, for graphpatch run.

argv: MODEL_DIR tensor|pipeline. Prints one JSON line: the fused layers this
rank holds and the argmax of its last-position logits.
"""

import json
import sys

import mlx.core as mx
from mlx_lm.utils import sharded_load

group = mx.distributed.init(backend="ring", strict=True)
kind = "tensor_group" if sys.argv[2] == "tensor" else "pipeline_group"
model, _ = sharded_load(sys.argv[1], **{kind: group})
# the joined layer's own class, under fusion's Joined marker
fused = [
    getattr(type(m), "original", type(m)).__name__
    for p, m in model.named_modules()
    if "gate_up_proj" in p
]
logits = model(mx.array([[5, 9, 33, 2, 17, 41, 8, 3]]))
result = {
    "rank": group.rank(),
    "fused": sorted(fused),
    "argmax": mx.argmax(logits[:, -1], axis=-1).tolist(),
}
print(json.dumps(result))
