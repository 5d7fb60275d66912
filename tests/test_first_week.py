"""What a user meets in their first week (issue 26): a save checked against
its source's golden file, the JSON report's record, the lines the command
prints, and ``graphpatch.load`` in mlx-lm's shapes."""

import datetime
import json
import shutil
from pathlib import Path

import mlx.core as mx
from helpers import run

from graphpatch import golden
from graphpatch.report import SCHEMA


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
    mx.save_safetensors(str(tmp_path / "old.safetensors"), arrays, metadata)
    assert golden.check(source, tmp_path / "old.safetensors").ok


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
