"""last_token under every mlx-lm caller, each against the unpatched model:
the programs that score every position (evaluate, perplexity, the LoRA
loss), speculative decoding with any draft length, BatchGenerator and the
server; and the one-call prefill that the pass is for."""

import copy
import sys
import threading
import types

import mlx.core as mx
import mlx_lm
import pytest
from helpers import GRAPHPATCH, TOKENS, post, server
from mlx_lm.generate import BatchGenerator, speculative_generate_step
from mlx_lm.models.cache import make_prompt_cache
from mlx_lm.perplexity import eval_ppl
from mlx_lm.tuner.trainer import default_loss

import graphpatch
from graphpatch.passes import last_token

LONG = mx.concatenate([TOKENS] * 5, axis=1)  # 50 positions: past any short
ROWS = mx.concatenate([LONG, LONG[:, ::-1]])


def mlx_lm_evaluate():
    """mlx_lm.evaluate itself. It imports lm_eval (not installed here) only
    for its base class and registry, so those two names are given stand-ins;
    the scoring code that runs is mlx-lm's own."""
    if "lm_eval" not in sys.modules:
        api = types.ModuleType("lm_eval.api")
        api.model = types.SimpleNamespace(LM=object)
        api.registry = types.SimpleNamespace(register_model=lambda name: lambda c: c)
        sys.modules.update(
            {
                "lm_eval": types.ModuleType("lm_eval"),
                "lm_eval.api": api,
                "lm_eval.api.model": api.model,
                "lm_eval.api.registry": api.registry,
            }
        )
    from mlx_lm import evaluate

    return evaluate


def scores(model) -> list[mx.array]:
    """evaluate's loglikelihood (a prompt, then its completion scored on a
    copy of the prompt's cache) and loglikelihood_rolling (a batch scored on
    a fresh cache, every position)."""
    lm = types.SimpleNamespace(_model=model)
    score_fn = mlx_lm_evaluate().MLXLM._score_fn
    logprobs, cache = mlx_lm_evaluate().MLXLM._process_prompt(lm, LONG[0].tolist())
    completion = score_fn(lm, LONG[:, :40], cache=copy.deepcopy(cache))
    rolling = score_fn(lm, [row.tolist() for row in ROWS])
    return [logprobs, *completion[::2], *rolling[::2]]


def losses(model) -> list[mx.array]:
    """Perplexity (mlx_lm.perplexity.eval_ppl) and the LoRA loss."""
    ppl, error = eval_ppl(model, ROWS, batch_size=2)
    lengths = mx.array([[1, ROWS.shape[1] - 1]] * 2)
    return [mx.array([ppl, error]), *default_loss(model, ROWS, lengths)]


@pytest.mark.parametrize("outputs", [scores, losses])
def test_programs_that_score_every_position_get_the_unpatched_numbers(
    load_zoo, outputs
):
    model, _ = load_zoo("llama")
    expected = outputs(model)
    graphpatch.apply(model, ["last_token"])
    for got, want in zip(outputs(model), expected, strict=True):
        assert got.shape == want.shape
        assert mx.array_equal(got, want)


def speculative(model, draft, prompt: mx.array, num_draft: int, max_tokens: int):
    steps = speculative_generate_step(
        prompt, model, draft, num_draft_tokens=num_draft, max_tokens=max_tokens
    )
    return [(int(token), logprobs.tolist(), ok) for token, logprobs, ok in steps]


@pytest.mark.parametrize("spec", ["last_token", "last_token:prefill:short=64"])
def test_speculative_decoding_of_any_draft_length_is_unchanged(load_zoo, spec):
    """Prompts of one token (the first verification of num_draft + 1
    positions then meets an empty cache) and of many. The draft is the
    model itself, so that the first verification yields every token asked
    for. With the prefill option, ``short`` keeps that first verification
    whole up to num_draft = short - 1."""
    model, _ = load_zoo("qwen3")
    draft, _ = load_zoo("qwen3")
    drafts = (1, 2, 31, 32, 33, 63, 64) if spec == "last_token" else (1, 32, 63)
    cases = [(p, n, n + 1) for p in (TOKENS[0, :1], TOKENS[0]) for n in drafts]
    expected = [speculative(model, draft, *case) for case in cases]
    graphpatch.apply(model, [spec])
    graphpatch.apply(draft, [spec])
    assert [speculative(model, draft, *case) for case in cases] == expected


def batch_generated(model, prompts: list[list[int]]) -> list:
    generator = BatchGenerator(model, max_tokens=6, prefill_step_size=16)
    generator.insert(prompts)
    out = []
    while responses := generator.next_generated():
        out += [(r.uid, r.token, r.logprobs.tolist()) for r in responses]
    generator.close()
    return out


def test_batch_generator_is_unchanged(load_zoo):
    model, _ = load_zoo("llama")
    prompts = [LONG[0].tolist(), LONG[0, :37].tolist(), [7]]  # padded, chunked
    expected = batch_generated(model, prompts)
    graphpatch.apply(model, ["last_token"])
    assert batch_generated(model, prompts) == expected


def completion(port: int) -> str:
    body = {"prompt": "The quick", "max_tokens": 42, "temperature": 0}
    return post(port, "/v1/completions", body)["choices"][0]["text"]


def test_the_server_with_a_draft_model_of_40_tokens_answers_as_mlx_lm(zoo_dir):
    """Verification calls of 41 positions continue the server's cache (the
    draft is the model itself: every draft token is accepted)."""
    model_dir = zoo_dir("qwen3")
    flags = ("--draft-model", str(model_dir), "--num-draft-tokens", "40")
    with server(model_dir, flags=flags) as (port, _):
        expected = completion(port)
    prefix = (GRAPHPATCH, "run", "--passes", "last_token", "--")
    with server(model_dir, *prefix, flags=flags) as (port, process):
        assert completion(port) == expected
        process.terminate()
        assert "last_token: 1 rewritten" in process.communicate(timeout=30)[1]


@pytest.mark.parametrize(
    "spec, declared",
    [("last_token:keep=2", True), ("last_token:keep=2:prefill", False)],
)
def test_a_one_call_prefill_into_an_empty_cache_keeps_two_positions(
    load_zoo, spec, declared
):
    """What an exo-style runtime does: one call, then decode on its cache."""
    model, _ = load_zoo("gemma2")  # softcapping after the head
    cache = make_prompt_cache(model)
    full, step = model(LONG, cache=cache), model(LONG[:, :1], cache=cache)
    graphpatch.apply(model, [spec])
    cache = make_prompt_cache(model)
    if declared:
        with last_token.prefill():
            prefilled = model(LONG, cache=cache)
    else:
        prefilled = model(LONG, cache=cache)
    assert mx.array_equal(prefilled, full[:, -2:])
    assert mx.array_equal(model(LONG[:, :1], cache=cache), step)
    assert model(LONG).shape == full.shape  # no cache: every position


def test_a_declaration_holds_on_its_own_thread_only(load_zoo):
    model, _ = load_zoo("llama")
    graphpatch.apply(model, ["last_token"])
    shapes = []

    def prefill_elsewhere():
        shapes.append(model(LONG, cache=make_prompt_cache(model)).shape)

    with last_token.prefill():
        worker = threading.Thread(target=prefill_elsewhere)
        worker.start()
        worker.join()
        shapes.append(model(LONG, cache=make_prompt_cache(model)).shape)
    assert shapes == [(1, 50, 512), (1, 1, 512)]


def test_mlx_lm_generate_is_unchanged_with_the_prefill_option(load_zoo):
    model, tokenizer = load_zoo("qwen3_moe")
    prompt = "Hello world! Numbers like 1234 and " * 4
    text = mlx_lm.generate(model, tokenizer, prompt, max_tokens=8)
    report = graphpatch.apply(model, ["last_token:prefill"])
    assert report.warnings[-1] == last_token.UNDECLARED.format(n=32)
    assert mlx_lm.generate(model, tokenizer, prompt, max_tokens=8) == text
