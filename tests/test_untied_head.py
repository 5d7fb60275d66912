"""untied_head on real checkpoints: tied heads share, untied heads are the
checkpoint's own, and the separate head is the one the model consults."""

import json
import re

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from helpers import TOKENS, assert_same_bits, snapshot
from hypothesis import given, settings
from hypothesis import strategies as st
from mlx_lm.models.cache import make_prompt_cache
from safetensors.numpy import load_file, save_file

import graphpatch
from graphpatch import GraphpatchError
from graphpatch.opening import load
from graphpatch.passes import last_token, untied_head

CHECKPOINTS = [
    pytest.param({}, id="float"),
    pytest.param({"shards": 3}, id="float-sharded"),
    pytest.param({"quant": "affine4"}, id="affine4"),
    pytest.param({"quant": "affine4", "shards": 3}, id="affine4-sharded"),
]


def apply_untied(model, model_dir):
    return graphpatch.apply(model, ["untied_head"], model_dir=str(model_dir))


@pytest.mark.parametrize("quant", [None, "affine4", "mxfp4"])
def test_tied_head_shares_the_embedding_arrays(zoo_dir, quant):
    model_dir = zoo_dir("qwen2", quant=quant)
    model, _ = load(model_dir)
    reference = model(TOKENS)
    mx.eval(reference)
    before = mx.get_active_memory()
    report = apply_untied(model, model_dir)
    (site,) = report.rewritten()
    assert (site.kind, site.note) == ("tied", untied_head.NO_CHECKPOINT_HEAD)
    assert report.bytes_delta == 0
    embedding = model.model.embed_tokens
    for key, array in embedding.lm_head.items():
        assert array is embedding[key]
    assert mx.get_active_memory() == before
    assert mx.array_equal(model(TOKENS), reference)


def test_a_bare_array_head_is_named_and_left_alone(load_zoo):
    model, _ = load_zoo("talkie")  # out @ self.lm_head.T, lm_head an mx.array
    reference = model(TOKENS)
    report = graphpatch.apply(model, ["untied_head", "last_token:short=4"])
    (site,) = report.skipped("untied_head")
    assert site.reason == untied_head.BARE_ARRAY.format(path="lm_head")
    (kept,) = report.rewritten("last_token")  # at the body, beside the array
    assert kept.path == "model"
    assert mx.array_equal(model(TOKENS), reference)  # no cache: every position
    with last_token.prefill():  # a declared prefill into an empty cache: cut
        cut = model(TOKENS, cache=make_prompt_cache(model))
    assert mx.array_equal(cut, reference[:, -1:])


def test_without_a_model_dir_the_report_says_the_checkpoint_was_not_read(load_zoo):
    model, _ = load_zoo("llama")
    (site,) = graphpatch.apply(model, ["untied_head"]).rewritten()
    assert site.note == untied_head.NOT_READ


@pytest.mark.parametrize("build", CHECKPOINTS)
def test_checkpoint_head_equal_to_the_embedding_gives_the_tied_logits(zoo_dir, build):
    tied_dir = zoo_dir("llama", **build)
    same_dir = zoo_dir("llama", head="same", **build)
    tied, _ = load(tied_dir)
    model, _ = load(same_dir)
    report = apply_untied(model, same_dir)
    (site,) = report.rewritten()
    assert (site.kind, site.note) == ("tied", untied_head.SAME_AS_EMBEDDING)
    assert mx.array_equal(model(TOKENS), tied(TOKENS))


def numpy_logits(model, model_dir, config) -> np.ndarray:
    """h @ W.T with W read from the safetensors by numpy alone."""
    arrays = {}
    for file in model_dir.glob("model*.safetensors"):
        arrays.update(load_file(file))
    weight = arrays["lm_head.weight"]
    if "lm_head.scales" in arrays:
        q = config["quantization"]
        weight = dequantize(
            weight, arrays["lm_head.scales"], arrays["lm_head.biases"], **q
        )
    h = np.array(model.model(TOKENS))
    return h @ weight.T


def dequantize(packed, scales, biases, group_size, bits, mode="affine"):
    assert mode == "affine" and 32 % bits == 0
    shifts = np.arange(0, 32, bits, dtype=np.uint32)
    q = (packed[..., None] >> shifts) & ((1 << bits) - 1)
    q = q.reshape(packed.shape[0], -1).astype(np.float32)
    expand = lambda a: np.repeat(a.astype(np.float32), group_size, axis=1)  # noqa: E731
    return q * expand(scales) + expand(biases)


@pytest.mark.parametrize("build", CHECKPOINTS)
def test_negated_checkpoint_head_is_the_one_consulted(zoo_dir, build):
    model_dir = zoo_dir("llama", head="negated", **build)
    # mlx-lm drops lm_head.* (tied config)
    model, _, config = load(model_dir, return_config=True)
    tied = model(TOKENS)
    report = apply_untied(model, model_dir)
    (site,) = report.rewritten()
    assert site.kind == "untied"
    assert "config tie_word_embeddings=true" in site.note
    (check,) = report.checks
    assert check.rebased and check.top1 < 0.5
    logits = np.array(model(TOKENS))
    expected = numpy_logits(model, model_dir, config)
    np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-4)
    assert (logits.argmax(-1) == expected.argmax(-1)).all()
    assert (logits.argmax(-1) != np.array(tied).argmax(-1)).any()


def test_config_without_tie_word_embeddings_follows_the_checkpoint(zoo_dir):
    model_dir = zoo_dir("llama", head="negated", tie_word_embeddings=None)
    model, _, config = load(model_dir, return_config=True)
    (site,) = apply_untied(model, model_dir).rewritten()
    assert "config has no tie_word_embeddings" in site.note
    expected = numpy_logits(model, model_dir, config)
    np.testing.assert_allclose(np.array(model(TOKENS)), expected, atol=1e-4)


def test_a_top_level_head_is_already_explicit_and_consulted(zoo_dir):
    model_dir = zoo_dir("llama_untied", quant="affine4")
    model, _, config = load(model_dir, return_config=True)
    (site,) = apply_untied(model, model_dir).skipped()
    assert site.reason == untied_head.ALREADY_EXPLICIT.format(cls="QuantizedLinear")
    expected = numpy_logits(model, model_dir, config)
    np.testing.assert_allclose(np.array(model(TOKENS)), expected, atol=1e-4)


def test_idempotent_and_reverted_bit_for_bit(zoo_dir):
    model_dir = zoo_dir("llama", head="negated", quant="affine4")
    model, _ = load(model_dir)
    before = snapshot(model)
    apply_untied(model, model_dir)
    (again,) = apply_untied(model, model_dir).skipped()
    assert again.reason == untied_head.ALREADY_APPLIED
    assert graphpatch.revert(model) == ["untied_head:model.embed_tokens"]
    assert_same_bits(before, snapshot(model))


def broken(model_dir, tmp_path, edit):
    """A copy of a model directory with ``edit(dir)`` applied to it."""
    import shutil

    out = tmp_path / "broken"
    shutil.copytree(model_dir, out)
    edit(out)
    return out


def wrong_shape(out):
    file = out / "model.safetensors"
    arrays = load_file(file)
    arrays["lm_head.weight"] = arrays["lm_head.weight"][:, :64].copy()
    save_file(arrays, file)


def missing_shard(out):
    index = json.loads((out / "model.safetensors.index.json").read_text())
    index["weight_map"]["lm_head.weight"] = "model-00009-of-00009.safetensors"
    (out / "model.safetensors.index.json").write_text(json.dumps(index))


def truncated(out):
    file = out / "model.safetensors"
    file.write_bytes(file.read_bytes()[:-100])


@pytest.mark.parametrize(
    "edit, shards, message",
    [
        (wrong_shape, 1, "lm_head.weight has shape (512, 64), expected (512, 128)"),
        (missing_shard, 2, "points at missing shard model-00009-of-00009"),
        (truncated, 1, "truncated"),
    ],
)
def test_a_bad_checkpoint_head_is_one_error_and_the_model_untouched(
    zoo_dir, tmp_path, edit, shards, message
):
    good_dir = zoo_dir("llama", head="negated", shards=shards)
    model, _ = load(good_dir)
    before = snapshot(model)
    with pytest.raises(GraphpatchError, match=re.escape(message)):
        apply_untied(model, broken(good_dir, tmp_path, edit))
    assert untied_head.applied(model) == []
    assert_same_bits(before, snapshot(model))


def test_a_quantized_head_for_a_float_embedding_is_refused(zoo_dir, load_zoo):
    model, _ = load_zoo("llama")
    with pytest.raises(GraphpatchError, match="the embedding is not quantized"):
        apply_untied(model, zoo_dir("llama", head="negated", quant="affine4"))


def test_the_reference_matmul_works_a_block_of_rows_at_a_time(load_zoo):
    from graphpatch.passes.untied_head.checkpoint import dense_matmul, tied_head

    model, _ = load_zoo("qwen2", quant="affine4")
    head = tied_head(model.model.embed_tokens)
    h = mx.random.normal((2, 3, 128), key=mx.random.key(1))
    whole = dense_matmul(h, head, chunk=512)
    assert whole.shape == (2, 3, 512)
    assert mx.array_equal(dense_matmul(h, head, chunk=100), whole)
    assert mx.allclose(whole, head(h), atol=1e-4)


MODES = {
    "affine": [(2, 32), (3, 64), (4, 64), (5, 128), (6, 32), (8, 64)],
    "mxfp4": [(4, 32)],
    "mxfp8": [(8, 32)],
    "nvfp4": [(4, 16)],
}


@settings(max_examples=20, deadline=None)
@given(
    mode=st.sampled_from([None, *MODES]),
    setting=st.integers(0, 5),
    vocab=st.integers(1, 40).map(lambda n: 8 * n),
    dims=st.sampled_from([128, 256]),
    dtype=st.sampled_from([mx.float32, mx.float16, mx.bfloat16]),
    positions=st.integers(1, 6),
)
def test_tied_head_property(mode, setting, vocab, dims, dtype, positions):
    """The explicit tied head is the embedding's as_linear, bit for bit, for
    every quantization mode, width and dtype, and holds its very arrays."""
    from graphpatch.passes.untied_head.checkpoint import tied_head

    mx.random.seed(vocab + dims)
    embedding = nn.Embedding(vocab, dims)
    embedding.set_dtype(dtype)
    if mode is not None:
        bits, group_size = MODES[mode][setting % len(MODES[mode])]
        embedding = embedding.to_quantized(group_size, bits, mode=mode)
    head = tied_head(embedding)
    h = mx.random.normal((2, positions, dims)).astype(dtype)
    assert mx.array_equal(head(h), embedding.as_linear(h))
    assert all(head[k] is embedding[k] for k in head)
