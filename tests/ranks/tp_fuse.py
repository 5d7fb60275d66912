"""One rank of the tensor-parallel fusion tests: shard, fuse, compare.

argv: MODEL_DIR PASS [exo], PASS fuse_glu or fuse_qkv. Shards with mlx-lm's
own ``model.shard(group)``, or
with ``exo``, the way exo shards an MoE mlx-lm cannot: each ``switch_mlp``'s
gate/up all-to-sharded and down sharded-to-all in place, its output summed
over the group. Prints one JSON line: what the pass did on this rank's shards
and the largest difference between fused and unfused sharded logits.
"""

import json
import sys

import mlx.core as mx
import mlx.nn as nn
import mlx_lm
from mlx.nn.layers.distributed import shard_inplace

import graphpatch


class SummedOverGroup(nn.Module):
    def __init__(self, inner: nn.Module, group):
        super().__init__()
        self.inner = inner
        self.group = group

    def __call__(self, x, indices):
        return mx.distributed.all_sum(self.inner(x, indices), group=self.group)


def exo_shard(model: nn.Module, group) -> None:
    for _, module in model.named_modules():
        if "switch_mlp" in module:
            switch = module["switch_mlp"]
            shard_inplace(switch.gate_proj, "all-to-sharded", group=group)
            shard_inplace(switch.up_proj, "all-to-sharded", group=group)
            shard_inplace(switch.down_proj, "sharded-to-all", group=group)
            module["switch_mlp"] = SummedOverGroup(switch, group)


group = mx.distributed.init(backend="ring", strict=True)
model, _ = mlx_lm.load(sys.argv[1])
FUSED = {"fuse_glu": "gate_up_proj", "fuse_qkv": "qkv_proj"}[sys.argv[2]]
if sys.argv[3:] == ["exo"]:
    exo_shard(model, group)
else:
    model.shard(group)
tokens = mx.array(
    [[5, 9, 33, 2, 17, 41, 8, 3, 12, 60], [7, 1, 4, 4, 30, 2, 9, 10, 11, 3]]
)
unfused = model(tokens)
mx.eval(unfused)
report = graphpatch.apply(model, [sys.argv[2]])
fused = model(tokens)
fused_layers = [
    # the joined layer's own class, under fusion's Joined marker
    f"{getattr(type(m), 'original', type(m)).__name__} {m.weight.shape[-2]}"
    for path, m in model.named_modules()
    if path.endswith(FUSED)
]
result = {
    "rank": group.rank(),
    "size": group.size(),
    "rewritten": [f"{s.path} ({s.kind})" for s in report.rewritten()],
    "skipped": [s.reason for s in report.skipped()],
    "fused": sorted(fused_layers),
    "max_error": mx.abs(fused - unfused).max().item(),
}
print(json.dumps(result))
