"""The zoo writes real model directories that mlx-lm loads and runs."""

import json
import shutil
import subprocess
import sys
import zipfile

import mlx.core as mx
import mlx_lm
import pytest
from typer.testing import CliRunner

from graphpatch.cli import app
from graphpatch.testing import small_configs, zoo


@pytest.mark.parametrize("name", list(zoo.CONFIGS))
def test_every_architecture_loads_and_generates(zoo_dir, name):
    model, tokenizer = mlx_lm.load(str(zoo_dir(name)))
    assert type(model).__module__ == f"mlx_lm.models.{zoo.CONFIGS[name]['model_type']}"
    text = mlx_lm.generate(model, tokenizer, "Hello world", max_tokens=4)
    assert isinstance(text, str)


# Architectures only the coverage's small configs describe: the zoo writes
# them as directories too, with the same weights the coverage built.
BEYOND_THE_ZOO = ["gemma3_text", "lfm2", "olmo3", "granitemoehybrid"]
PASSES = "untied_head,fuse_glu,fuse_qkv,last_token"


runner = CliRunner()


@pytest.mark.parametrize("name", BEYOND_THE_ZOO)
def test_any_architecture_is_a_directory_graphpatch_applies_to(zoo_dir, name):
    path = zoo_dir(name)
    model, _ = mlx_lm.load(str(path))
    tokens = mx.array([[1, 7, 42, 5, 60, 3, 11, 2]])
    assert mx.array_equal(model(tokens), small_configs.build(name)(tokens))
    result = runner.invoke(
        app, ["apply", "--json", "--verify", "always", "--passes", PASSES, str(path)]
    )
    assert result.exit_code == 0, result.output
    sites = json.loads(result.stdout)["sites"]
    rewritten = [s for s in sites if s["status"] == "rewritten"]
    assert rewritten and all(s["max_error"] == 0 for s in rewritten)


@pytest.mark.parametrize(
    "quant, kind", [("affine4", "affine"), ("affine8", "affine"), ("mxfp4", "mxfp4")]
)
def test_quantized_with_mlx_lm(zoo_dir, quant, kind):
    path = zoo_dir("qwen3_moe", quant=quant, dtype="bfloat16")
    model, _ = mlx_lm.load(str(path))
    switch = model.model.layers[0].mlp.switch_mlp
    assert type(switch.gate_proj).__name__ == "QuantizedSwitchLinear"
    assert switch.gate_proj.mode == kind
    assert (
        json.loads((path / "config.json").read_text())["quantization"]["mode"] == kind
    )
    assert model(mx.array([[1, 2, 3]])).dtype == mx.bfloat16


def test_sharded_directories_have_an_index(zoo_dir):
    path = zoo_dir("llama_untied", shards=3)
    index = json.loads((path / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert files == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    sharded, _ = mlx_lm.load(str(path))
    single, _ = mlx_lm.load(str(zoo_dir("llama_untied")))
    tokens = mx.array([[4, 8, 15, 16, 23, 42]])
    assert mx.array_equal(sharded(tokens), single(tokens))


def test_same_seed_same_weights_and_a_real_tokenizer(zoo_dir, tmp_path):
    again = zoo.build("llama", tmp_path / "again")
    a, tokenizer = mlx_lm.load(str(zoo_dir("llama")))
    b, _ = mlx_lm.load(str(again))
    tokens = mx.array([[1, 2, 3]])
    assert mx.array_equal(a(tokens), b(tokens))
    ids = tokenizer.encode("The quick brown fox")
    assert 1 < len(ids) < 19 and tokenizer.decode(ids).endswith("The quick brown fox")
    assert tokenizer.eos_token_id == 1


def test_wheel_ships_the_passes_and_the_command(tmp_path):
    root = __import__("pathlib").Path(__file__).parents[1]
    # from a copy: a stale build/lib in a checkout would hide a missing package
    source = tmp_path / "source"
    skip = ("build", ".venv", ".git", "*.egg-info", "*_cache", "__pycache__", "demo")
    shutil.copytree(root, source, symlinks=True, ignore=shutil.ignore_patterns(*skip))
    wheel_command = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps"]
    subprocess.run(
        [*wheel_command, "-w", tmp_path, source],
        check=True,
        timeout=300,
    )
    (wheel,) = tmp_path.glob("mlx_graphpatch-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tree = sorted((root / "graphpatch").rglob("*.py"))  # every module, passes too
    shipped = {f"graphpatch/{p.relative_to(root / 'graphpatch')}" for p in tree}
    built = {n for n in names if n.endswith(".py")}
    assert len(shipped) > 40 and built == shipped  # what ships is the tree
    assert "graphpatch/passes/fuse_glu.py" in names and "graphpatch/cli.py" in names
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert (
        "graphpatch = graphpatch.cli:main"
        in zipfile.ZipFile(wheel).read(entry_points).decode()
    )


def test_the_tree_holds_no_symlinks():
    """What ships is what the tree shows: no file or folder stands for another
    (two symlinks once broke the wheel twice)."""
    root = __import__("pathlib").Path(__file__).parents[1]
    tracked = subprocess.run(
        ["git", "ls-files", "-s"], cwd=root, capture_output=True, text=True
    ).stdout.splitlines()
    if not tracked:
        pytest.skip("not a git checkout")
    assert [line for line in tracked if line.startswith("120000")] == []
