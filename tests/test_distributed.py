"""Passes under MLX's own distributed engine: 2 ranks of a ring group on
localhost, started with the hostfile and environment mlx.launch writes."""

import pytest
from helpers import launch


@pytest.mark.parametrize(
    "name, build, sharding, fused",
    [
        ("llama", {}, "mlx-lm", "AllToShardedLinear 256"),
        ("llama", {"quant": "affine4"}, "mlx-lm", "QuantizedAllToShardedLinear 256"),
        ("qwen3_moe", {"quant": "affine4"}, "mlx-lm", "QuantizedSwitchLinear 128"),
        ("mixtral", {"quant": "mxfp4"}, "exo", "QuantizedSwitchLinear 256"),
    ],
)
def test_fuse_glu_fuses_local_shards_exactly(zoo_dir, name, build, sharding, fused):
    extra = ["exo"] if sharding == "exo" else []
    ranks = launch("tp_fuse.py", str(zoo_dir(name, **build)), "fuse_glu", *extra)
    assert [r["rank"] for r in ranks] == [0, 1]
    for r in ranks:
        # each fused layer holds this rank's half of gate and of up
        assert r["fused"] == [fused, fused] and r["skipped"] == []
        assert r["max_error"] == 0.0
    assert ranks[0]["rewritten"] == ranks[1]["rewritten"]
