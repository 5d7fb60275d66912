"""A user's edit after apply is never silently undone: a fused part the user
replaced stays the user's through revert and through the plain weights a save
writes (issue: trust, second round, item 4)."""

import mlx.core as mx
import mlx.nn as nn
import mlx_lm
import pytest
from helpers import TOKENS
from mlx.utils import tree_flatten

import graphpatch
from graphpatch.manager import replaced


def _users_layer(module: nn.Module, part: str) -> nn.Module:
    """A float layer of the fused ``part``'s shape with the user's weights."""
    fused_part = module[part]
    out_dims = fused_part.call.sizes[fused_part.index]
    in_dims = module[fused_part.call.fused].weight.shape[-1]
    layer = nn.Linear(in_dims, out_dims, bias=False)
    layer.weight = mx.random.normal(layer.weight.shape, key=mx.random.key(7)) * 0.02
    return layer


def _edited(load_zoo, passes: str, child: str, part: str):
    """A zoo llama patched with ``passes``, whose layer 0 ``child.part`` the
    user then replaced; with the user's layer and the edited logits."""
    model, _ = load_zoo("llama")
    graphpatch.apply(model, passes)
    module = model.model.layers[0][child]
    users = _users_layer(module, part)
    module[part] = users
    logits = model(TOKENS)
    mx.eval(logits)
    return model, module, users, logits


@pytest.mark.parametrize(
    ("passes", "child", "part"),
    [
        ("fuse_glu", "mlp", "up_proj"),
        ("fuse_glu", "mlp", "gate_proj"),
        ("fuse_qkv", "self_attn", "k_proj"),
        ("fuse_glu,fuse_qkv", "self_attn", "q_proj"),
    ],
)
def test_revert_keeps_a_part_the_user_replaced(load_zoo, passes, child, part):
    model, module, users, logits = _edited(load_zoo, passes, child, part)
    name = "fuse_qkv" if child == "self_attn" else "fuse_glu"
    assert replaced(model) == [f"{name}:model.layers.0.{child}.{part}"]
    restored = graphpatch.revert(model)
    assert f"{name}:model.layers.0.{child} ({part} kept: replaced after apply)" in (
        restored
    )
    assert module[part] is users
    assert mx.array_equal(model(TOKENS), logits)  # what it computed before
    assert replaced(model) == [] and graphpatch.revert(model) == []


def test_the_plain_weights_hold_the_users_part(load_zoo, zoo_dir):
    # What a plain save writes: loaded into the unpatched architecture, it
    # computes what the edited model computes, the user's layer included.
    model, _, _, logits = _edited(load_zoo, "fuse_glu", "mlp", "up_proj")
    weights = dict(tree_flatten(model.parameters()))
    weights = graphpatch.PASSES["fuse_glu"].saving.plain(model, weights)
    fresh, _ = mlx_lm.load(str(zoo_dir("llama")))
    fresh.load_weights(list(weights.items()), strict=True)
    assert mx.array_equal(fresh(TOKENS), logits)


def test_quantizing_the_fused_layer_is_no_replaced_part(load_zoo):
    model, _ = load_zoo("llama")
    graphpatch.apply(model, "fuse_glu")
    nn.quantize(model, group_size=32, bits=8)
    assert replaced(model) == []
    assert graphpatch.revert(model) == [
        "fuse_glu:model.layers.0.mlp",
        "fuse_glu:model.layers.1.mlp",
    ]
    assert isinstance(model.model.layers[0].mlp.up_proj, nn.QuantizedLinear)
