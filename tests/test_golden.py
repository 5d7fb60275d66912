"""Golden logits: the checked-in files of the zoo, and record/check themselves."""

import json
from pathlib import Path

import pytest
from helpers import run

from graphpatch import golden
from graphpatch.testing import zoo

GOLDEN = sorted((Path(__file__).parent.parent / "golden").glob("*.safetensors"))


def test_every_zoo_model_has_its_golden_files():
    names = {zoo.zoo_file_name(*entry) for entry in zoo.ZOO}
    assert {f.name for f in GOLDEN} == names
    assert all(f.stat().st_size < 16 * 1024 for f in GOLDEN)


@pytest.mark.parametrize("file", GOLDEN, ids=lambda f: f.stem)
def test_golden_logits_have_not_moved(zoo_dir, file):
    """Re-record deliberately with ``make golden`` (a reviewed change)."""
    _, metadata = golden.read(file)
    spec = json.loads(metadata["zoo"])
    golden.assert_matches(zoo_dir(spec["name"], **spec["build"]), file)


def test_moved_logits_exit_1_with_a_readable_diff(zoo_dir, tmp_path):
    model_dir = zoo_dir("llama", head="negated")
    file = tmp_path / "tied.safetensors"
    assert run("golden", "record", str(model_dir), str(file)).exit_code == 0
    same = run("golden", "check", str(model_dir), str(file))
    assert same.exit_code == 0 and same.output.count(": ok") == 3
    moved = run("golden", "check", str(model_dir), str(file), "--passes", "untied_head")
    assert moved.exit_code == 1
    lines = moved.output.splitlines()
    assert lines[0].startswith("prompt 0 (12 tokens): max abs error")
    assert lines[0].endswith(": FAILED") and "top-1 " in lines[0]
    assert lines[-1] == "metadata changed: passes: (none) -> untied_head"


def test_a_file_of_another_model_is_refused(zoo_dir, tmp_path):
    file = golden.record(zoo_dir("llama"), tmp_path / "llama.safetensors")
    result = run("golden", "check", str(zoo_dir("qwen2")), str(file))
    assert result.exit_code == 2
    assert "was recorded from another model: its config hash differs" in result.output


def test_prompts_from_a_file_are_tokenized_and_stored(zoo_dir, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("The quick brown fox\n\nHello world!\n")
    file = tmp_path / "g.safetensors"
    args = ["golden", "record", str(zoo_dir("qwen3")), str(file)]
    assert run(*args, "--prompts", str(prompts)).exit_code == 0
    arrays, metadata = golden.read(file)
    assert len([k for k in arrays if k.startswith("tokens.")]) == 2
    assert metadata["mlx"] and metadata["device"] and metadata["dtype"] == "float32"
    assert golden.check(zoo_dir("qwen3"), file).ok


def test_bad_files_are_one_line(zoo_dir, tmp_path):
    junk = tmp_path / "junk.safetensors"
    junk.write_text("not a file")
    result = run("golden", "check", str(zoo_dir("llama")), str(junk))
    assert result.exit_code == 2 and "not a golden file" in result.output
    missing = run(
        "golden", "record", str(zoo_dir("llama")), str(junk), "--prompts", "x"
    )
    assert missing.exit_code == 2 and "x: no such prompts file" in missing.output


def test_check_reads_the_weights_only_when_their_files_changed(
    zoo_dir, tmp_path, monkeypatch
):
    import os
    import shutil

    model_dir = Path(shutil.copytree(zoo_dir("llama"), tmp_path / "model"))
    file = golden.record(model_dir, tmp_path / "g.safetensors")
    hashed = []
    real = golden.weights_hash
    monkeypatch.setattr(golden, "weights_hash", lambda d: hashed.append(d) or real(d))
    assert golden.check(model_dir, file).ok and hashed == []
    weights = model_dir / "model.safetensors"
    os.utime(weights, ns=(0, weights.stat().st_mtime_ns + 10**9))  # touched
    assert golden.check(model_dir, file).ok and len(hashed) == 1
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1  # same size, new mtime: read, and refused
    weights.write_bytes(bytes(data))
    with pytest.raises(golden.GoldenError, match="weights hash differs"):
        golden.check(model_dir, file)
