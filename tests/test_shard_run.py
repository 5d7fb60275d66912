"""``graphpatch run --passes shard`` around a program that loads with mlx-lm's
``sharded_load`` (its server and chat under mlx.launch): every rank gets the
model sharded by graphpatch, for an architecture mlx-lm cannot shard."""

import json
import sys

import mlx.core as mx
import mlx_lm
from helpers import GRAPHPATCH, RANKS

from graphpatch.testing import ring


def test_sharded_load_shards_an_architecture_mlx_lm_cannot(zoo_dir):
    model_dir = str(zoo_dir("starcoder2"))  # no shard() in mlx-lm
    command = [sys.executable, str(RANKS / "sharded_load_run.py"), model_dir]
    plain = ring.launch(command, 2, timeout=120)
    patched = ring.launch([GRAPHPATCH, "run", "--passes", "shard", "--", *command])
    reference = mlx_lm.load(model_dir)[0](mx.array([[5, 9, 33, 2, 17, 41, 8, 3]]))
    for before, after in zip(plain, patched, strict=True):
        assert before.returncode == after.returncode == 0, after.stderr
        assert after.stderr.count("shard: 4 rewritten") == 1, after.stderr  # once
        before, after = (json.loads(r.stdout.splitlines()[-1]) for r in (before, after))
        assert "does not support any sharding" in before["error"]
        assert after["sharded"] == 8  # 2 layers x q, k, v, c_fc
        assert mx.allclose(mx.array(after["logits"]), reference[0, -1], atol=1e-4)


def test_a_tensor_group_smaller_than_the_world_is_left_to_mlx_lm(zoo_dir):
    """graphpatch's shard splits over the world group, so a program asking
    for a smaller tensor group gets mlx-lm's own loader (which refuses this
    architecture), never a model sharded over other ranks than it asked."""
    model_dir = str(zoo_dir("starcoder2"))
    command = [sys.executable, str(RANKS / "sharded_load_run.py"), model_dir, "alone"]
    ranks = ring.launch([GRAPHPATCH, "run", "--passes", "shard", "--", *command])
    for r in ranks:
        assert r.returncode == 0, r.stderr
        assert "shard:" not in r.stderr
        result = json.loads(r.stdout.splitlines()[-1])
        assert "does not support tensor parallelism" in result["error"]
