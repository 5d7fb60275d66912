"""Training that would save a fused layer's arrays under its fused name (what
no unpatched model loads) is refused at its start, in one line: mlx-lm's full
fine-tune and DWQ unfreeze the joined layer, DoRA cannot wrap a fused part.
LoRA trains the unpatched adapter (tests/test_adapters.py)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import GRAPHPATCH, write_adapter

import graphpatch
from graphpatch.parts import TRAINING_REFUSED, TrainingRefused
from graphpatch.run_hook import DORA

WORDS = "the quick brown fox jumps over a lazy dog while the cat sat on a mat"


def test_unfreezing_a_joined_layer_is_refused_and_freezing_is_not(load_zoo):
    model, _ = load_zoo("llama")
    graphpatch.apply(model, ["fuse_glu"], verify=False)
    model.freeze()  # as every trainer starts
    mlp = model.layers[0].mlp
    for unfreeze in (
        lambda: model.layers[0].unfreeze(),
        lambda: mlp.gate_up_proj.unfreeze(keys=["weight"]),
    ):
        with pytest.raises(TrainingRefused, match="training gate_up_proj"):
            unfreeze()
    model.layers[0].self_attn.unfreeze()  # no joined layer there: as ever
    assert model.layers[0].self_attn.trainable_parameters()
    graphpatch.revert(model)
    model.layers[0].unfreeze()  # the unpatched model trains as ever


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    data = tmp_path_factory.mktemp("data")
    words = WORDS.split()
    for name, rows in (("train", 8), ("valid", 2)):
        lines = [{"text": " ".join(words[i:] + words[:i])} for i in range(rows)]
        (data / f"{name}.jsonl").write_text(
            "".join(json.dumps(r) + "\n" for r in lines)
        )
    return data


@pytest.mark.parametrize(
    "kind, said",
    [
        ("full", TRAINING_REFUSED.format(fused="gate_up_proj")),
        ("dora", DORA.split(" (")[0]),  # then mlx-lm's own words
    ],
)
def test_mlx_lm_full_and_dora_training_of_a_fused_model_end_in_one_line(
    zoo_dir, data, tmp_path, kind, said
):
    out = tmp_path / "adapters"
    lora = [sys.executable, "-m", "mlx_lm", "lora", "--model", str(zoo_dir("llama"))]
    lora += ["--train", "--data", str(data), "--iters", "2", "--batch-size", "2"]
    lora += ["--num-layers", "2", "--adapter-path", str(out)]
    lora += ["--fine-tune-type", kind]
    command = [GRAPHPATCH, "run", "--passes", "fuse_glu", "--", *lora]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr[-2000:]
    errors = [line for line in done.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and said in errors[0], done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    assert not (out / "adapters.safetensors").exists()


def test_mlx_lm_fuse_of_an_adapter_into_a_fused_model_ends_in_one_line(
    zoo_dir, tmp_path
):
    """mlx-lm's fuse folds each adapter into its layer's weight; a fused part
    holds none, so under graphpatch run it ends in one line, not a traceback."""
    model_dir = zoo_dir("llama")
    adapter = write_adapter(model_dir, tmp_path / "adapter")
    fuse = [sys.executable, "-m", "mlx_lm", "fuse", "--model", str(model_dir)]
    fuse += ["--adapter-path", str(adapter), "--save-path", str(tmp_path / "out")]
    command = [GRAPHPATCH, "run", "--passes", "fuse_glu,fuse_qkv", "--", *fuse]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr[-2000:]
    errors = [line for line in done.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and "fuse the adapter into the unpatched" in errors[0]
    assert "Traceback" not in done.stderr
