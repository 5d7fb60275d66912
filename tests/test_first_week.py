"""What a user meets in their first week (issue 26): a save checked against
its source's golden file, the JSON report's record, the lines the command
prints, and ``graphpatch.load`` in mlx-lm's shapes."""

import datetime
import json
import re
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import mlx.core as mx
import mlx_lm
import pytest
from helpers import GRAPHPATCH, TOKENS, free_port, run, write_adapter, write_golden
from mlx_lm.tuner.lora import LoRALinear

import graphpatch
from graphpatch import golden, trust
from graphpatch.checks import NOT_A_DIRECTORY
from graphpatch.cli import INTERRUPTED
from graphpatch.parts import FusedPart
from graphpatch.report import SCHEMA
from graphpatch.trust import TRUSTING


def test_a_plain_save_checks_against_its_sources_golden_file(zoo_dir, tmp_path):
    source = zoo_dir("llama")
    file = golden.record(source, tmp_path / "source.safetensors")
    save = tmp_path / "save"
    args = ["apply", "--passes", "fuse_glu", source, "--save", save]
    assert run(*args, "--max-shard-mb", "0.05").exit_code == 0
    assert "graphpatch" in json.loads((save / "config.json").read_text())
    assert len(list(save.glob("model-*.safetensors"))) > 1  # sharded otherwise
    result = run("golden", "check", save, file)
    assert result.exit_code == 0, result.output
    assert result.output.count(": ok") == 3


def test_a_golden_file_of_file_bytes_still_names_its_model(zoo_dir, tmp_path):
    """Files recorded before tensor hashes hold the weight files' bytes."""
    source = zoo_dir("llama")
    file = golden.record(source, tmp_path / "g.safetensors")
    arrays, metadata = golden.read(file)
    del metadata["weights_hash_of"], metadata["weights_stat"]
    metadata["weights_hash"] = golden.bytes_hash(Path(source))
    old = write_golden(tmp_path / "old.safetensors", arrays, metadata)
    assert golden.check(source, old).ok


def test_the_json_report_names_its_record_in_fields(zoo_dir, tmp_path):
    model = shutil.copytree(zoo_dir("llama"), tmp_path / "model")
    args = ["apply", "--passes", "fuse_glu", "--verify", "cached", model]
    fresh = json.loads(run(*args, "--json").stdout)
    used = fresh["record_used"]
    assert fresh["schema"] == SCHEMA == 2
    assert used == {"path": used["path"], "date": used["date"], "trusted": False}
    assert fresh["record"] == f"verified now, record {used['path']}"
    trusted = json.loads(run(*args, "--json").stdout)
    assert trusted["record_used"] == {**used, "trusted": True}
    assert datetime.date.fromisoformat(used["date"]) == datetime.date.today()
    said = f"verified on {used['date']}, record {used['path']}"
    assert trusted["record"] == said and said in run(*args).output
    never = json.loads(run(*args[:-3], "--verify", "never", model, "--json").stdout)
    assert never["record"] is None and never["record_used"] is None


# output lines that mislead


def test_flags_are_shown_taking_no_value():
    shown = run("apply", "--help").output
    assert "--json" in shown and "--no-verify" in shown and "<bool>" not in shown
    assert "<float>" in shown  # an option that takes a value still says so


def test_coverage_piped_is_the_table_whole(tmp_path):
    file = tmp_path / "coverage.md"
    result = run("coverage", "llama", "--write", file)
    assert result.exit_code == 0, result.output
    assert max(len(line) for line in result.stdout.splitlines()) > 80
    assert result.stdout == file.read_text()


def test_the_summary_names_what_its_time_counts(zoo_dir):
    said = " ".join(
        run("apply", "--passes", "fuse_glu", zoo_dir("llama")).output.split()
    )
    took = r"dtype float32; \d+\.\d\ds to load, \d+\.\d\ds to apply and verify$"
    assert re.search(took, said), said
    unverified = run("apply", "--passes", "fuse_glu", "--no-verify", zoo_dir("llama"))
    assert re.search(r"\ds to apply$", unverified.output.strip())


def test_a_file_given_as_the_model_is_said_to_be_one(tmp_path):
    file = tmp_path / "model.safetensors"
    file.write_bytes(b"")
    result = run("apply", "--passes", "fuse_glu", file)
    assert result.exit_code == 2
    assert f"{file}: {NOT_A_DIRECTORY}" in " ".join(result.output.split())


def interrupted_serve(model_dir: Path, when: str) -> subprocess.CompletedProcess:
    """``graphpatch serve`` sent SIGINT while it imports (mlx, mlx-lm and
    transformers mapped, the rest of the imports to come) or once it listens."""
    port = free_port()
    command = [GRAPHPATCH, "serve", str(model_dir), "--port", str(port)]
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    maps = Path(f"/proc/{process.pid}/maps")
    deadline = time.monotonic() + 120
    while process.poll() is None and time.monotonic() < deadline:
        # tokenizers' library: mapped deep in graphpatch's own imports, after
        # interpreter start (whose .pth files no program can guard)
        if when == "importing" and "tokenizers.abi3" in maps.read_text():
            break
        with socket.socket() as s:
            if when == "listening" and s.connect_ex(("127.0.0.1", port)) == 0:
                break
        time.sleep(0.01)
    process.send_signal(signal.SIGINT)
    stderr = process.communicate(timeout=60)[1]
    return subprocess.CompletedProcess(command, process.returncode, "", stderr)


@pytest.mark.parametrize("when", ["importing", "listening"])
def test_ctrl_c_is_one_line_and_exit_130(zoo_dir, when):
    done = interrupted_serve(zoo_dir("llama"), when)
    assert done.returncode == 130, done.stderr
    assert done.stderr.strip().splitlines()[-1:] == [INTERRUPTED], done.stderr
    assert "Traceback" not in done.stderr


def test_progress_says_a_record_is_trusted_not_site_by_site(zoo_dir, tmp_path):
    model_dir = shutil.copytree(zoo_dir("llama"), tmp_path / "model")
    said: list[str] = []
    for _ in range(2):
        said.clear()
        model = mlx_lm.load(str(model_dir))[0]
        report = trust.apply(model, "fuse_glu", model_dir, "cached", said.append)
    assert report.record_used is not None and report.record_used.trusted
    assert said == [TRUSTING.format(file=report.record_used.path)]


# graphpatch.load in mlx_lm.load's shapes


def test_load_returns_what_mlx_lm_load_returns(zoo_dir):
    model_dir = str(zoo_dir("llama"))
    loaded = graphpatch.load(model_dir)
    assert len(loaded) == 2 and len(mlx_lm.load(model_dir)) == 2
    model, tokenizer, config = graphpatch.load(model_dir, return_config=True)
    assert config == mlx_lm.load(model_dir, return_config=True)[2]
    assert tokenizer.encode("the quick") == loaded[1].encode("the quick")
    lazy = graphpatch.load(model_dir, None, None, None, True)[0]  # mlx-lm's order
    assert mx.array_equal(lazy(TOKENS), model(TOKENS))


def test_load_takes_mlx_lm_loads_configs(zoo_dir):
    model_dir = str(zoo_dir("llama"))
    options = {
        "model_config": {"rope_theta": 7.0},
        "tokenizer_config": {"model_max_length": 7},
    }
    model, tokenizer = graphpatch.load(model_dir, **options)
    reference, expected = mlx_lm.load(model_dir, **options)
    assert model.args.rope_theta == reference.args.rope_theta == 7.0
    assert mx.array_equal(model(TOKENS), reference(TOKENS))
    assert tokenizer.model_max_length == expected.model_max_length == 7


def test_load_takes_an_adapter_and_a_save_keeps_its_passes(zoo_dir, tmp_path):
    source = zoo_dir("llama")
    adapter = str(write_adapter(source, tmp_path / "adapter"))
    save = tmp_path / "save"
    assert run("apply", "--passes", "fuse_glu", source, "--save", save).exit_code == 0
    reference = mlx_lm.load(str(source), adapter_path=adapter)[0]
    model = graphpatch.load(save, adapter_path=adapter)[0]
    gate = model.model.layers[0].mlp.gate_proj
    assert isinstance(gate, LoRALinear) and isinstance(gate.linear, FusedPart)
    assert mx.array_equal(model(TOKENS), reference(TOKENS))
    with pytest.raises(graphpatch.LoadError, match="cannot load the adapters"):
        graphpatch.load(source, adapter_path=str(tmp_path / "nowhere"))
