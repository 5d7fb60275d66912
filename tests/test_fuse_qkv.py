"""fuse_qkv on real mlx-lm models: q, k and v as one matmul, exactly."""

import mlx.core as mx
import mlx.nn as nn
import mlx_lm
import pytest
from helpers import (
    TOKENS,
    assert_exact_and_redone,
    assert_same_bits,
    calls_of,
    launch,
    snapshot,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import graphpatch
from graphpatch.passes import fuse_qkv
from graphpatch.testing import zoo

# name, build options, sites rewritten, reasons of the sites left alone
ARCHITECTURES = [
    ("llama", {}, 2, []),  # GQA: 4 query heads, 2 key/value heads
    ("llama_untied", {"dtype": "bfloat16"}, 2, []),
    ("qwen2", {"dtype": "float16"}, 2, []),  # q/k/v biases
    ("qwen3", {"quant": "affine8"}, 2, []),  # q/k norms after the projections
    ("qwen3_moe", {"quant": "mxfp4"}, 2, []),
    ("mixtral", {"quant": "affine4"}, 2, []),
    ("gemma2", {}, 2, []),
    ("gpt_oss", {}, 2, []),  # sinks, sliding window
    ("phi3", {}, 0, ["already fused (qkv_proj) in the model itself"] * 2),
]


@pytest.mark.parametrize("name, build, rewritten, reasons", ARCHITECTURES)
def test_architectures(load_zoo, name, build, rewritten, reasons):
    model, tokenizer = load_zoo(name, **build)
    reference = model(TOKENS)
    text = mlx_lm.generate(model, tokenizer, "The quick brown", max_tokens=8)
    report = graphpatch.apply(model, ["fuse_qkv"])
    assert len(report.rewritten()) == rewritten
    assert [s.reason for s in report.skipped()] == reasons
    assert all(s.max_error == 0.0 for s in report.rewritten())
    assert mx.array_equal(model(TOKENS), reference)
    assert mlx_lm.generate(model, tokenizer, "The quick brown", max_tokens=8) == text


def test_one_matmul_for_q_k_and_v(load_zoo):
    model, _ = load_zoo("qwen2")
    graphpatch.apply(model, ["fuse_qkv"])
    attention = model.model.layers[0].self_attn
    # 4 query heads and 2 key/value heads of 32: 128 + 64 + 64 rows, with bias
    assert attention.qkv_proj.weight.shape == (256, 128)
    assert attention.qkv_proj.bias.shape == (256,)
    assert calls_of(attention.qkv_proj, lambda: model(TOKENS)) == 1


MODES = st.sampled_from(
    [None, ("mxfp4", 4, 32), ("mxfp8", 8, 32)]
    + [("affine", b, g) for b in (2, 3, 4, 6, 8) for g in (32, 64, 128)]
)


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    mode=MODES,
    dtype=st.sampled_from(["float32", "bfloat16", "float16"]),
    heads=st.sampled_from([(4, 4), (4, 2), (4, 1), (8, 2)]),
    head_dim=st.sampled_from([16, 32, 64]),
    batch=st.integers(1, 3),
    length=st.integers(1, 20),
    seed=st.integers(0, 2**16),
)
def test_equivalence_property(mode, dtype, heads, head_dim, batch, length, seed):
    config = zoo.config_for(
        "qwen2",
        num_attention_heads=heads[0],
        num_key_value_heads=heads[1],
        hidden_size=128,
        head_dim=head_dim,
    )
    model = zoo.make_model(config, seed)
    tokens = mx.random.randint(0, 512, (batch, length), key=mx.random.key(seed))
    assert_exact_and_redone(model, config, mode, dtype, tokens, "fuse_qkv")


def test_revert_restores_every_bit(load_zoo):
    model, _ = load_zoo("qwen2", quant="affine4")
    before = snapshot(model)
    graphpatch.apply(model, ["fuse_glu", "fuse_qkv"])
    assert graphpatch.revert(model)
    assert_same_bits(before, snapshot(model))
    assert fuse_qkv.PASS.applied(model) == []


def test_q_k_v_that_differ_in_quantization_are_left_alone(load_zoo):
    config = zoo.config_for("llama")
    model = zoo.make_model(config)
    nn.quantize(model, bits=4, class_predicate=lambda p, m: p.endswith("k_proj"))
    report = graphpatch.apply(model, ["fuse_qkv"])
    assert report.rewritten() == []
    assert {s.reason for s in report.skipped()} == {
        "q_proj is a Linear and k_proj a QuantizedLinear"
    }


def test_weights_are_freed():
    model = zoo.make_model(zoo.config_for("llama", hidden_size=512))
    mx.eval(model.parameters())
    mx.clear_cache()
    unpatched = mx.get_active_memory()
    report = graphpatch.apply(model, ["fuse_qkv"])
    mx.clear_cache()
    assert len(report.rewritten()) == 2
    assert abs(mx.get_active_memory() - unpatched) <= 0.01 * unpatched


@pytest.mark.parametrize(
    "build, fused",
    [
        ({}, "AllToShardedLinear 128"),
        ({"quant": "affine4"}, "QuantizedAllToShardedLinear 128"),
    ],
)
def test_fuses_local_shards_exactly(zoo_dir, build, fused):
    ranks = launch("tp_fuse.py", str(zoo_dir("qwen2", **build)), "fuse_qkv")
    assert [r["rank"] for r in ranks] == [0, 1]
    for r in ranks:
        # each rank holds its 2 query heads and 1 key/value head of 32
        assert r["fused"] == [fused, fused] and r["skipped"] == []
        assert r["max_error"] == 0.0
    assert ranks[0]["rewritten"] == ranks[1]["rewritten"]
