"""Adapters and training on fused models: a LoRA-adapted projection is fused
by its base with its adapter kept, and mlx-lm's LoRA training on a patched
model gives the adapter the unpatched model gives."""

import json
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import mlx_lm
import pytest
from helpers import TOKENS, assert_same_bits, snapshot, write_adapter
from mlx_lm.tuner.lora import LoRALinear

import graphpatch
from graphpatch.parts import FusedPart

LORA = {"rank": 4, "scale": 10.0, "dropout": 0.0}
WORDS = "the quick brown fox jumps over a lazy dog while the cat sat on a mat"


@pytest.mark.parametrize("build", [{}, {"quant": "affine4"}])
def test_an_adapted_model_is_fused_with_its_adapters_kept(zoo_dir, tmp_path, build):
    model_dir = zoo_dir("llama", **build)
    adapter = write_adapter(model_dir, tmp_path / "adapter")
    model, tokenizer = mlx_lm.load(str(model_dir), adapter_path=str(adapter))
    before = snapshot(model)
    reference = model(TOKENS)
    text = mlx_lm.generate(model, tokenizer, "the quick", max_tokens=12)
    report = graphpatch.apply(model, ["fuse_glu", "fuse_qkv"])
    assert len(report.rewritten()) == 4, [s.reason for s in report.skipped()]
    gate = model.model.layers[0].mlp.gate_proj
    assert isinstance(gate, LoRALinear) and isinstance(gate.linear, FusedPart)
    assert mx.array_equal(model(TOKENS), reference)
    assert mlx_lm.generate(model, tokenizer, "the quick", max_tokens=12) == text
    graphpatch.revert(model)
    assert_same_bits(before, snapshot(model))


def _train(model_dir: Path, data: Path, out: Path, *passes: str) -> tuple:
    """mlx-lm's own lora command, 3 iterations, under graphpatch run when
    ``passes`` are named; the adapter it wrote and its trainable line."""
    lora = [sys.executable, "-m", "mlx_lm", "lora", "--model", str(model_dir)]
    lora += ["--train", "--data", str(data), "--iters", "3", "--batch-size", "2"]
    lora += ["--num-layers", "2", "--adapter-path", str(out), "--seed", "0"]
    lora += ["--steps-per-eval", "100", "--val-batches", "1"]
    graphpatch_run = [str(Path(sys.executable).parent / "graphpatch"), "run"]
    command = [*graphpatch_run, "--passes", ",".join(passes), "--", *lora]
    run = subprocess.run(
        command if passes else lora, capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0, run.stderr[-2000:]
    if passes:
        assert "fuse_glu: 2 rewritten" in run.stderr, run.stderr[-2000:]
    (trainable,) = [
        line for line in run.stdout.splitlines() if "Trainable parameters" in line
    ]
    return mx.load(str(out / "adapters.safetensors")), trainable


def test_lora_training_on_a_patched_model_gives_the_unpatched_adapter(
    zoo_dir, tmp_path
):
    data = tmp_path / "data"
    data.mkdir()
    words = WORDS.split()
    for name, rows in (("train", 8), ("valid", 2)):
        lines = [{"text": " ".join(words[i:] + words[:i])} for i in range(rows)]
        (data / f"{name}.jsonl").write_text(
            "".join(json.dumps(r) + "\n" for r in lines)
        )
    model_dir = zoo_dir("llama")
    plain, plain_line = _train(model_dir, data, tmp_path / "plain")
    patched, line = _train(
        model_dir, data, tmp_path / "patched", "fuse_glu", "fuse_qkv"
    )
    assert line == plain_line  # "Trainable parameters: 9.075% (0.033M/0.361M)"
    assert sorted(patched) == sorted(plain)
    assert any("mlp.gate_proj.lora_a" in name for name in plain)
    for name, array in plain.items():
        assert mx.allclose(patched[name], array, atol=1e-6, rtol=1e-5).item(), name
