"""Save a patched model, open it straight into its patched structure."""

import json
import os
import subprocess
import sys

import mlx.core as mx
import mlx_lm
import pytest
from helpers import GRAPHPATCH, TOKENS, run

import graphpatch
from graphpatch import SaveError
from graphpatch.passes import PASSES


def applied(model) -> dict:
    return {name: p.applied(model) for name, p in PASSES.items()}


CASES = [
    ("llama", {}, "fuse_glu,last_token"),  # float, tied
    ("qwen2", {"quant": "affine4"}, "last_token:keep=2"),  # quantized, tied
    ("llama_untied", {"quant": "affine4"}, "fuse_glu,last_token:keep=2"),
    ("llama", {"head": "negated", "quant": "affine4"}, "untied_head,fuse_glu"),
    ("qwen3_moe", {"quant": "mxfp4"}, "fuse_glu,last_token"),  # MoE
    ("mixtral", {}, "fuse_glu"),
    ("internlm2", {"quant": "affine4"}, "fuse_glu,last_token"),  # w1/w3 -> w13
]


@pytest.mark.parametrize("save_format", ["plain", "fused"])
@pytest.mark.parametrize("name, build, passes", CASES)
def test_round_trip_gives_the_patched_logits(
    zoo_dir, tmp_path, name, build, passes, save_format
):
    model_dir = zoo_dir(name, **build)
    model, _ = graphpatch.load(model_dir)
    graphpatch.apply(model, passes, model_dir=str(model_dir))
    out = graphpatch.save(model, model_dir, tmp_path / "saved", format=save_format)
    loaded, tokenizer, config = graphpatch.load(out, return_config=True)
    if save_format == "fused" or "untied_head" not in passes:
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


@pytest.mark.parametrize("name, build, passes", CASES)
def test_mlx_lm_opens_a_plain_save_as_a_normal_model(
    zoo_dir, tmp_path, name, build, passes
):
    model_dir = zoo_dir(name, **build)
    model, _ = graphpatch.load(model_dir)
    graphpatch.apply(model, passes, model_dir=str(model_dir))
    out = graphpatch.save(model, model_dir, tmp_path / "saved")
    plain, _ = mlx_lm.load(str(out))
    assert applied(plain) == {name: [] for name in PASSES}
    assert mx.array_equal(plain(TOKENS)[:, -1], model(TOKENS)[:, -1])
    # graphpatch.load: mlx-lm refuses a tied model's quantized lm_head.* itself
    with_source = graphpatch.load(model_dir)[0](TOKENS)[:, -1]
    assert mx.array_equal(plain(TOKENS)[:, -1], with_source) == (
        build.get("head") != "negated"  # the bound head, not the tied one
    )


def test_an_untied_head_is_saved_as_lm_head_and_untied_in_config(zoo_dir, tmp_path):
    model_dir = zoo_dir("llama", head="negated")
    model, _ = graphpatch.load(model_dir)
    graphpatch.apply(model, "untied_head", model_dir=str(model_dir))
    out = graphpatch.save(model, model_dir, tmp_path / "saved")
    config = json.loads((out / "config.json").read_text())
    assert config["tie_word_embeddings"] is False
    weights = mx.load(str(out / "model.safetensors"))
    head = model.model.embed_tokens.lm_head.weight
    assert mx.array_equal(weights["lm_head.weight"], head)
    assert not any("embed_tokens.lm_head" in k for k in weights)


def test_a_plain_save_holds_the_sources_arrays_bit_for_bit(zoo_dir, tmp_path):
    model_dir = zoo_dir("qwen3_moe", quant="affine4")
    model, _ = graphpatch.load(model_dir)
    graphpatch.apply(model, "fuse_glu,last_token")
    out = graphpatch.save(model, model_dir, tmp_path / "saved")
    source = mx.load(str(model_dir / "model.safetensors"))
    saved = mx.load(str(out / "model.safetensors"))
    assert saved.keys() == source.keys()
    assert all(mx.array_equal(saved[k], source[k]) for k in source)
    recorded = json.loads((out / "config.json").read_text())["graphpatch"]
    assert [e["name"] for e in recorded["passes"]] == ["fuse_glu", "last_token"]


def test_a_tied_head_is_saved_once_and_stays_tied(zoo_dir, tmp_path):
    model_dir = zoo_dir("qwen2", quant="affine4")
    model, _ = graphpatch.load(model_dir)
    graphpatch.apply(model, "last_token")
    out = graphpatch.save(model, model_dir, tmp_path / "saved", format="fused")
    saved = json.loads((out / "config.json").read_text())["graphpatch"]
    assert saved["aliases"] == {
        f"model.embed_tokens.lm_head.{k}": f"model.embed_tokens.{k}"
        for k in ("biases", "scales", "weight")
    }
    loaded, _ = graphpatch.load(out)
    embedding = loaded.model.embed_tokens
    assert embedding.lm_head.weight is embedding.weight
    size = sum(f.stat().st_size for f in model_dir.glob("*.safetensors"))
    assert abs((out / "model.safetensors").stat().st_size - size) < 4096


@pytest.mark.parametrize(
    "save_format, name", [("plain", "gate_proj"), ("fused", "gate_up_proj")]
)
def test_sharded_save_writes_an_index(zoo_dir, tmp_path, save_format, name):
    model_dir = zoo_dir("qwen3_moe")
    model, _ = graphpatch.load(model_dir)
    graphpatch.apply(model, "fuse_glu")
    out = graphpatch.save(
        model, model_dir, tmp_path / "s", max_shard_bytes=200_000, format=save_format
    )
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 3
    assert any(f".{name}." in k for k in index["weight_map"])
    assert mx.array_equal(graphpatch.load(out)[0](TOKENS), model(TOKENS))


def test_mlx_lm_refuses_a_fused_save_in_one_line(zoo_dir, tmp_path):
    out = tmp_path / "saved"
    model_dir = str(zoo_dir("llama"))
    args = ["apply", "--passes", "fuse_glu", model_dir, "--save", str(out)]
    result = run(*args, "--save-format", "fused")
    assert result.exit_code == 0 and out.is_dir()
    with pytest.raises(ValueError, match="open it with graphpatch.load"):
        mlx_lm.load(str(out))
    generate = [sys.executable, "-m", "mlx_lm", "generate", "--model", str(out)]
    ran = subprocess.run(
        [GRAPHPATCH, "run", "--", *generate, "--prompt", "Hi"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert ran.returncode == 2
    assert ran.stderr.strip().splitlines()[-1].startswith("graphpatch: error: ")
    assert "--save-format fused" in ran.stderr and "Traceback" not in ran.stderr


def test_graphpatch_run_re_applies_the_passes_a_plain_save_recorded(zoo_dir, tmp_path):
    out = tmp_path / "saved"
    model_dir = str(zoo_dir("qwen3_moe"))
    args = ["apply", "--passes", "fuse_glu,last_token", model_dir, "--save", str(out)]
    assert run(*args).exit_code == 0
    generate = [sys.executable, "-m", "mlx_lm", "generate", "--max-tokens", "6"]
    generate += ["--temp", "0", "--prompt", "The quick brown"]
    plain = subprocess.run(
        [*generate, "--model", model_dir], capture_output=True, text=True, timeout=120
    )
    ran = subprocess.run(
        [GRAPHPATCH, "run", "--", *generate, "--model", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert ran.returncode == 0, ran.stderr
    assert "fuse_glu: 2 rewritten, 0 skipped" in ran.stderr
    assert ": verified on " in ran.stderr  # the verification the save carries
    text = lambda out: out.split("==========")[1]  # noqa: E731 (timings differ)
    assert text(ran.stdout) == text(plain.stdout)
    off = {**os.environ, "GRAPHPATCH_FUSE_GLU": "0"}  # the kill switch still works
    ran = subprocess.run(
        [GRAPHPATCH, "run", "--", *generate, "--model", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
        env=off,
    )
    assert ran.returncode == 0 and "switched fuse_glu off" in ran.stderr
    assert "fuse_glu: 2 rewritten" not in ran.stderr


def test_an_interrupted_save_leaves_nothing(zoo_dir, tmp_path):
    model_dir = zoo_dir("qwen3_moe")
    model, _ = graphpatch.load(model_dir)
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
    model, _ = graphpatch.load(model_dir)
    out = graphpatch.save(model, model_dir, tmp_path / "a", format="fused")
    with pytest.raises(SaveError, match="already a saved patched model"):
        graphpatch.save(graphpatch.load(out)[0], out, tmp_path / "b")


def test_loading_takes_no_more_memory_than_mlx_lm(zoo_dir, tmp_path):
    model_dir = zoo_dir("llama", hidden_size=256, intermediate_size=2048)
    model, _ = graphpatch.load(model_dir)
    graphpatch.apply(model, "fuse_glu,last_token")
    out = graphpatch.save(model, model_dir, tmp_path / "saved", format="fused")
    plain = graphpatch.save(model, model_dir, tmp_path / "plain")
    del model

    def active(load) -> int:
        mx.clear_cache()
        base = mx.get_active_memory()
        loaded = load()
        mx.eval(loaded[0].parameters())
        return mx.get_active_memory() - base

    # plain re-fuses on load: the same bytes held once it is done
    plain_bytes = active(lambda: graphpatch.load(plain))
    assert abs(plain_bytes - active(lambda: mlx_lm.load(str(model_dir)))) < 64 * 1024

    def peak(load) -> int:
        mx.clear_cache()
        mx.reset_peak_memory()
        base = mx.get_active_memory()
        loaded = load()
        mx.eval(loaded[0].parameters())
        return mx.get_peak_memory() - base

    original = peak(lambda: mlx_lm.load(str(model_dir)))
    assert peak(lambda: graphpatch.load(out)) <= original * 1.02 + 64 * 1024
