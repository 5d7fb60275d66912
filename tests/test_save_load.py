"""Save a patched model, open it straight into its patched structure."""

import json
import os
import sys

import mlx.core as mx
import mlx_lm
import pytest
from conftest import TOKENS
from test_cli import run

import graphpatch
from graphpatch import SaveError
from graphpatch.passes import PASSES

GRAPHPATCH = os.path.join(os.path.dirname(sys.executable), "graphpatch")


def applied(model) -> dict:
    return {name: p.applied(model) for name, p in PASSES.items()}


@pytest.mark.parametrize(
    "name, build, passes",
    [
        ("llama", {}, "fuse_glu,last_token"),  # float, tied
        ("qwen2", {"quant": "affine4"}, "last_token:keep=2"),  # quantized, tied
        ("llama_untied", {"quant": "affine4"}, "fuse_glu,last_token:keep=2"),
        ("llama", {"head": "negated", "quant": "affine4"}, "untied_head,fuse_glu"),
        ("qwen3_moe", {"quant": "mxfp4"}, "fuse_glu,last_token"),  # MoE
        ("mixtral", {}, "fuse_glu"),
    ],
)
def test_round_trip_gives_the_patched_logits(zoo_dir, tmp_path, name, build, passes):
    model_dir = zoo_dir(name, **build)
    model, _, _ = graphpatch.load(model_dir)
    graphpatch.apply(model, passes, model_dir=str(model_dir))
    out = graphpatch.save(model, model_dir, tmp_path / "saved")
    loaded, tokenizer, config = graphpatch.load(out)
    assert applied(loaded) == applied(model)
    assert mx.array_equal(loaded(TOKENS), model(TOKENS))
    assert (
        config["model_type"]
        == json.loads((model_dir / "config.json").read_text())["model_type"]
    )
    source_tokenizer = graphpatch.load(model_dir)[1]
    assert tokenizer.encode("The quick") == source_tokenizer.encode("The quick")
    again = graphpatch.apply(loaded, passes, model_dir=str(out))
    assert again.rewritten() == []  # opened patched: nothing to redo


def test_a_tied_head_is_saved_once_and_stays_tied(zoo_dir, tmp_path):
    model_dir = zoo_dir("qwen2", quant="affine4")
    model, _, _ = graphpatch.load(model_dir)
    graphpatch.apply(model, "last_token")
    out = graphpatch.save(model, model_dir, tmp_path / "saved")
    saved = json.loads((out / "config.json").read_text())["graphpatch"]
    assert saved["aliases"] == {
        f"model.embed_tokens.lm_head.{k}": f"model.embed_tokens.{k}"
        for k in ("biases", "scales", "weight")
    }
    loaded, _, _ = graphpatch.load(out)
    embedding = loaded.model.embed_tokens
    assert embedding.lm_head.weight is embedding.weight
    size = sum(f.stat().st_size for f in model_dir.glob("*.safetensors"))
    assert abs((out / "model.safetensors").stat().st_size - size) < 4096


def test_sharded_save_writes_an_index(zoo_dir, tmp_path):
    model_dir = zoo_dir("qwen3_moe")
    model, _, _ = graphpatch.load(model_dir)
    graphpatch.apply(model, "fuse_glu")
    out = graphpatch.save(model, model_dir, tmp_path / "s", max_shard_bytes=200_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 3
    assert any("gate_up_proj" in k for k in index["weight_map"])
    assert mx.array_equal(graphpatch.load(out)[0](TOKENS), model(TOKENS))


def test_mlx_lm_load_says_to_use_graphpatch_load(zoo_dir, tmp_path):
    out = tmp_path / "saved"
    result = run(
        "apply", "--passes", "fuse_glu", str(zoo_dir("llama")), "--save", str(out)
    )
    assert result.exit_code == 0 and out.is_dir()
    with pytest.raises(ValueError, match="open it with graphpatch.load"):
        mlx_lm.load(str(out))


def test_an_interrupted_save_leaves_nothing(zoo_dir, tmp_path):
    model_dir = zoo_dir("qwen3_moe")
    model, _, _ = graphpatch.load(model_dir)
    lines = []

    def interrupt(line):
        lines.append(line)
        if len(lines) == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        graphpatch.save(model, model_dir, tmp_path / "out", False, 100_000, interrupt)
    assert list(tmp_path.iterdir()) == []


def test_saving_an_elided_or_saved_model_is_refused(zoo_dir, tmp_path):
    model_dir = zoo_dir("llama")
    model, _, _ = graphpatch.load(model_dir)
    out = graphpatch.save(model, model_dir, tmp_path / "a")
    with pytest.raises(SaveError, match="already a saved patched model"):
        graphpatch.save(graphpatch.load(out)[0], out, tmp_path / "b")


def test_loading_takes_no_more_memory_than_mlx_lm(zoo_dir, tmp_path):
    model_dir = zoo_dir("llama", hidden_size=256, intermediate_size=2048)
    model, _, _ = graphpatch.load(model_dir)
    graphpatch.apply(model, "fuse_glu,last_token")
    out = graphpatch.save(model, model_dir, tmp_path / "saved")
    del model

    def peak(load) -> int:
        mx.clear_cache()
        mx.reset_peak_memory()
        base = mx.get_active_memory()
        loaded = load()
        mx.eval(loaded[0].parameters())
        return mx.get_peak_memory() - base

    original = peak(lambda: mlx_lm.load(str(model_dir)))
    assert peak(lambda: graphpatch.load(out)) <= original * 1.02 + 64 * 1024
