"""last_token on real mlx-lm models: a declared prefill keeps its last
positions, every other call all of them (mlx-lm's callers:
test_last_token_callers.py)."""

import mlx.core as mx
import mlx.nn as nn
import mlx_lm
import pytest
from helpers import TOKENS, assert_same_bits, snapshot
from hypothesis import given, settings
from hypothesis import strategies as st
from mlx_lm.models.cache import make_prompt_cache

import graphpatch
from graphpatch import PassSpecError
from graphpatch.passes import last_token
from graphpatch.passes.last_token import body, rule
from graphpatch.testing import zoo

# name, build options: the body holding the layers is the site in each
ARCHITECTURES = [
    ("llama", {}),  # tied, made explicit
    ("llama_untied", {"quant": "affine4"}),
    ("qwen2", {"dtype": "bfloat16"}),
    ("gemma2", {}),  # softcapping after the head
    ("qwen3_moe", {}),
    ("deepseek_v3", {}),
    ("phi3", {}),
    ("gpt_oss", {"quant": "mxfp4", "dtype": "bfloat16"}),
    ("seed_oss", {}),  # h @ embed.weight.T inline
]


def prefilled(model, tokens: mx.array) -> mx.array:
    """A declared one-call prefill into an empty cache."""
    with last_token.prefill():
        return model(tokens, cache=make_prompt_cache(model))


@pytest.mark.parametrize("name, build", ARCHITECTURES)
def test_architectures(load_zoo, name, build):
    model, tokenizer = load_zoo(name, **build)
    reference = model(TOKENS)
    text = mlx_lm.generate(model, tokenizer, "The quick brown", max_tokens=8)
    report = graphpatch.apply(model, ["last_token:keep=3:short=4"])
    (site,) = report.rewritten("last_token")
    assert (site.path, site.kind) == ("model", "body")
    out = prefilled(model, TOKENS)
    assert out.shape == (1, 3, 512)
    assert mx.array_equal(out, reference[:, -3:])
    short = prefilled(model, TOKENS[:, :4])  # S <= short
    assert mx.array_equal(short, reference[:, :4])
    assert mx.array_equal(model(TOKENS), reference)  # no cache: every position
    assert mlx_lm.generate(model, tokenizer, "The quick brown", max_tokens=8) == text


def test_a_wrapped_model_is_cut_below_its_inner_head(load_zoo):
    """gemma3 wraps gemma3_text (``language_model``, its own head inside):
    the cut is at ``language_model.model``, before that head runs."""
    from graphpatch.testing.small_configs import build

    model = build("gemma3")
    reference = model(TOKENS)
    report = graphpatch.apply(model, ["last_token:short=4"])
    (site,) = report.rewritten("last_token")
    assert site.path == "language_model.model"
    assert mx.array_equal(prefilled(model, TOKENS), reference[:, -1:])


def test_kv_cache_batch_and_compile(load_zoo):
    model, _ = load_zoo("qwen3")
    tokens = mx.concatenate([TOKENS, TOKENS[:, ::-1]])
    cache = make_prompt_cache(model)
    reference = model(tokens, cache=cache)
    step = model(tokens[:, -1:], cache=cache)
    graphpatch.apply(model, ["last_token:short=0"])
    cache = make_prompt_cache(model)
    with last_token.prefill():
        assert mx.array_equal(model(tokens, cache=cache), reference[:, -1:])
        assert mx.array_equal(model(tokens[:, -1:], cache=cache), step)
    compiled = mx.compile(lambda t: model(t))
    assert mx.array_equal(compiled(tokens), model(tokens))
    assert compiled(tokens).shape == (2, 10, 512)


def test_idempotent_and_reverted_bit_for_bit(load_zoo):
    model, _ = load_zoo("gemma2")
    before = snapshot(model)
    graphpatch.apply(model, ["last_token"])
    again = graphpatch.apply(model, ["last_token"])
    assert [s.reason for s in again.skipped()] == [last_token.ALREADY_APPLIED] * 2
    assert again.rewritten() == []
    assert graphpatch.revert(model) == [
        "last_token:model",
        "untied_head:model.embed_tokens",
    ]
    assert type(model.model.embed_tokens) is nn.Embedding
    assert_same_bits(before, snapshot(model))
    assert model(TOKENS).shape == (1, 10, 512)


def test_an_inline_head_keeps_positions_at_the_body_and_reverts(load_zoo):
    model, _ = load_zoo(
        "seed_oss"
    )  # h @ embed.weight.T (float: mlx-lm cannot quantize it)
    before = snapshot(model)
    report = graphpatch.apply(model, ["last_token:short=4"])
    (site,) = report.rewritten("last_token")
    assert (site.path, site.kind, site.note) == ("model", "body", body.INLINE)
    assert prefilled(model, TOKENS).shape == (1, 1, 512)
    again = graphpatch.apply(model, ["last_token:short=4"])
    assert [s.reason for s in again.skipped("last_token")] == [
        last_token.ALREADY_APPLIED
    ]
    settings = set(vars(model.model)) - {"keep", "short", "prefill"}
    assert graphpatch.revert(model) == ["last_token:model"]
    assert_same_bits(before, snapshot(model))
    assert set(vars(model.model)) == settings  # the marker's settings gone too
    assert model(TOKENS).shape == (1, 10, 512)


class InlineHead(nn.Module):
    """A model whose __call__ computes the head inline (h @ embed.T)."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def __call__(self, tokens):
        h = self.inner.model(tokens)
        return h @ self.inner.model.embed_tokens.weight.T


def test_a_head_the_model_does_not_consult_is_skipped(load_zoo):
    model, _ = load_zoo("llama")
    wrapped = InlineHead(model)
    report = graphpatch.apply(wrapped, ["last_token"])
    untied, last = report.skipped()
    assert "does not run its head through inner.model.embed_tokens" in untied.reason
    assert last.reason == last_token.NO_BODY  # no layers: no cache to see
    assert graphpatch.PASSES["untied_head"].applied(wrapped) == []


def test_keep_is_validated_and_only_the_prefill_option_warns():
    with pytest.raises(PassSpecError, match="keep must be between 1 and 1024, got 0"):
        graphpatch.resolve("last_token:keep=0", {})
    with pytest.raises(PassSpecError, match="wants an integer"):
        graphpatch.resolve("last_token:keep=two", {})
    with pytest.raises(PassSpecError, match="short must be between 0 and 1024"):
        graphpatch.resolve("last_token:short=-1", {})
    model = zoo.make_model(zoo.config_for("llama"))
    pulled = "last_token needs untied_head: pulled it in"
    assert graphpatch.apply(model, ["last_token"]).warnings == [pulled]
    graphpatch.revert(model)
    report = graphpatch.apply(model, ["last_token:short=0:prefill"])
    assert report.warnings == [pulled, last_token.UNDECLARED.format(n=1)]


def test_prefill_peak_memory_drops_by_the_logits():
    S, V = 1024, 32768
    model = zoo.make_model(zoo.config_for("llama_untied", vocab_size=V))
    tokens = mx.random.randint(0, V, (1, S), key=mx.random.key(0))

    def peak(forward):
        mx.clear_cache()
        mx.reset_peak_memory()
        mx.eval(forward(tokens))
        return mx.get_peak_memory()

    mx.eval(model.parameters())
    weights = mx.get_active_memory()
    # The body's own activations (attention) set a floor under both peaks.
    inner = peak(model.model) - weights
    unpatched = peak(lambda t: prefilled(model, t))
    graphpatch.apply(model, ["last_token"])
    assert unpatched - peak(lambda t: prefilled(model, t)) >= (S - 1) * V * 4 - inner


PROMPTS = ["The quick brown", "Hello world! Numbers like 1234 and", "A"]


# gemma2 is left out: mlx-lm 0.32.2 own batch path fails on it (mask shapes).
@pytest.mark.parametrize("name", ["llama", "qwen3_moe", "phi3"])
def test_stream_generate_and_batch_generate_are_unchanged(load_zoo, name):
    model, tokenizer = load_zoo(name)
    prompts = [tokenizer.encode(p) for p in PROMPTS]  # lengths differ: left padding

    def tokens():
        streamed = mlx_lm.stream_generate(model, tokenizer, PROMPTS[1], max_tokens=8)
        batch = mlx_lm.batch_generate(model, tokenizer, prompts, max_tokens=8)
        return [r.token for r in streamed], batch.texts

    before = tokens()
    graphpatch.apply(model, ["last_token"])
    assert tokens() == before


@pytest.mark.parametrize("spec", ["last_token", "last_token:prefill:short=0"])
def test_speculative_decoding_gives_the_unpatched_text(load_zoo, spec):
    """mlx-lm verifies num_draft + 1 positions in one call continuing the
    prompt's cache: no rule cuts it (with any draft length and a one-token
    prompt: test_last_token_callers.py)."""
    model, tokenizer = load_zoo("qwen3")
    draft, _ = load_zoo("qwen3", seed=1)
    expected = mlx_lm.generate(model, tokenizer, PROMPTS[0], max_tokens=12)
    graphpatch.apply(model, [spec])

    def speculative(num_draft: int) -> str:
        responses = mlx_lm.stream_generate(
            model,
            tokenizer,
            PROMPTS[0],
            max_tokens=12,
            draft_model=draft,
            num_draft_tokens=num_draft,
        )
        return "".join(r.text for r in responses)

    assert [speculative(n) for n in (1, 2, 3)] == [expected] * 3


_MODELS: dict = {}


@settings(max_examples=20, deadline=None)
@given(
    name=st.sampled_from(["llama", "llama_untied", "gemma2"]),
    quant=st.sampled_from([None, "affine4", "mxfp4"]),
    batch=st.integers(1, 3),
    length=st.integers(1, 20),
    keep=st.integers(1, 8),
    short=st.integers(0, 12),
    declared=st.booleans(),
    cached=st.booleans(),
)
def test_last_positions_property(
    name, quant, batch, length, keep, short, declared, cached
):
    """Any batch, length, keep and short, declared or not, with an empty cache
    or none: a declared prefill into an empty cache longer than
    max(keep, short) returns the unpatched model's last keep positions, bit
    for bit, and any other call every position."""
    key = (name, quant)
    if key not in _MODELS:
        model = zoo.make_model(zoo.config_for(name))
        if quant:
            nn.quantize(model, **zoo.QUANTIZATIONS[quant])
        _MODELS[key] = model
    model = _MODELS[key]
    tokens = mx.random.randint(0, 512, (batch, length), key=mx.random.key(length))
    reference = model(tokens)
    spec = f"last_token:keep={keep}:short={short}"
    graphpatch.apply(model, [spec], verify=False)
    cache = make_prompt_cache(model) if cached else None
    try:
        if declared:
            with last_token.prefill():
                out = model(tokens, cache=cache)
        else:
            out = model(tokens, cache=cache)
    finally:
        graphpatch.revert(model)
    cut = declared and cached and length > max(keep, short)
    kept = keep if cut else length
    assert out.shape == (batch, kept, 512)
    assert mx.array_equal(out, reference[:, -kept:])


def test_an_empty_cache_is_one_with_every_layer_empty(load_zoo):
    model, _ = load_zoo("llama")
    cache = make_prompt_cache(model)
    assert rule.is_empty(cache)
    model(TOKENS, cache=cache)
    assert not rule.is_empty(cache)
    assert not any(rule.is_empty(c) for c in (None, [], [None], "cache", [object()]))


class DropsTheCache(nn.Module):
    """A model that takes a cache and runs its body without it."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    @property
    def layers(self):
        return self.inner.layers

    def __call__(self, tokens, cache=None):
        return self.inner(tokens)


def test_a_body_that_never_sees_the_cache_is_restored_with_the_reason(load_zoo):
    model, _ = load_zoo("llama")
    wrapped = DropsTheCache(model)
    (site,) = graphpatch.apply(wrapped, ["last_token"]).skipped("last_token")
    # its prefill returns 33 positions where the unpatched sliced one has 1
    assert "failed on the probe, restored: shape (1, 33, 512)" in site.reason
    assert graphpatch.PASSES["last_token"].applied(wrapped) == []


def test_a_pipelined_body_is_found_past_the_other_ranks_layers():
    """Rank 0 of mlx-lm's pipeline keeps the last layers: its list starts with
    None for the layers other ranks run (``PipelineMixin.pipeline``)."""
    model = zoo.make_model(zoo.config_for("qwen3_moe"))
    model.model.start_idx, model.model.end_idx = 1, 2
    model.model.layers = [None, model.model.layers[1]]
    assert body.body_path(model) == "model"
