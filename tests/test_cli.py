"""The graphpatch command on real model directories, and its bad inputs."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import run, runner

import graphpatch
from graphpatch.cli import app


def test_list_names_every_pass():
    result = run("list")
    assert result.exit_code == 0
    assert "fuse_glu" in result.output and "GRAPHPATCH_FUSE_GLU" in result.output


def test_apply_prints_the_report(zoo_dir):
    result = run("apply", "--passes", "fuse_glu", zoo_dir("qwen3_moe"))
    assert result.exit_code == 0, result.output
    assert "model.layers.{0..1}" in result.output
    assert "(moe) · 2 sites" in result.output
    assert "2 sites rewritten, 0 skipped" in result.output
    assert "model check after fuse_glu: max error 0" in result.output


def test_apply_json(zoo_dir):
    result = runner.invoke(
        app, ["apply", "--passes", "fuse_glu", "--json", str(zoo_dir("phi3"))]
    )
    report = json.loads(result.stdout)
    assert report["passes"] == ["fuse_glu"]
    assert {s["reason"] for s in report["sites"]} == {
        "already fused (gate_up_proj) in the model itself"
    }


def test_apply_without_verification(zoo_dir):
    result = run("apply", "--passes", "fuse_glu", "--no-verify", zoo_dir("llama"))
    assert result.exit_code == 0
    assert "rewritten" in result.output and "(unverified)" in result.output


def _copy(zoo_dir, tmp_path, name="llama") -> Path:
    return Path(shutil.copytree(zoo_dir(name), tmp_path / "model"))


def _broken(kind: str, zoo_dir, tmp_path) -> Path:
    if kind == "missing directory":
        return tmp_path / "nowhere"
    model = _copy(zoo_dir, tmp_path)
    if kind == "no config":
        (model / "config.json").unlink()
    elif kind == "invalid config":
        (model / "config.json").write_text("{not json")
    elif kind == "unknown model type":
        config = json.loads((model / "config.json").read_text())
        (model / "config.json").write_text(json.dumps({**config, "model_type": "zz"}))
    elif kind == "truncated safetensors":
        data = (model / "model.safetensors").read_bytes()
        (model / "model.safetensors").write_bytes(data[: len(data) // 2])
    elif kind == "unreadable safetensors":
        (model / "model.safetensors").write_bytes(b"\x00garbage")
    elif kind == "no safetensors":
        (model / "model.safetensors").unlink()
    return model


BAD_INPUT = {
    "missing directory": "no such directory",
    "no config": "no config.json",
    "invalid config": "config.json: not valid JSON",
    "unknown model type": "model_type 'zz' is not an architecture",
    "truncated safetensors": "truncated",
    "unreadable safetensors": "not a safetensors file",
    "no safetensors": "no model*.safetensors files",
}


@pytest.mark.parametrize("kind", BAD_INPUT)
def test_bad_input_is_one_clear_line(kind, zoo_dir, tmp_path):
    result = run("apply", "--passes", "fuse_glu", _broken(kind, zoo_dir, tmp_path))
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), result.output
    assert BAD_INPUT[kind] in lines[0]


def test_unknown_pass_is_one_clear_line(zoo_dir):
    result = run("apply", "--passes", "fuse_glu,fuse_all", zoo_dir("llama"))
    assert result.exit_code == 2
    known = ", ".join(graphpatch.PASSES)  # every registered pass, in order
    assert result.output.strip() == f"error: unknown pass 'fuse_all' (known: {known})"


def test_console_script_has_no_traceback(tmp_path):
    """The installed command, as a user runs it."""
    command = Path(sys.executable).parent / "graphpatch"
    done = subprocess.run(
        [command, "apply", "--passes", "fuse_glu", tmp_path / "nowhere"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    assert done.stdout == ""
    assert done.stderr.strip() == f"error: {tmp_path / 'nowhere'}: no such directory"


def test_python_m_knows_every_command():
    help_text = subprocess.run(
        [sys.executable, "-m", "graphpatch.cli", "--help"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    for command in ("list", "apply", "run", "serve", "coverage", "golden"):
        assert f" {command} " in help_text


def test_version_is_printed_both_ways():
    import graphpatch

    for args in (["--version"], ["version"]):
        result = run(*args)
        assert result.exit_code == 0
        assert result.output.strip() == f"graphpatch {graphpatch.__version__}"


def test_one_site_is_a_site(zoo_dir):
    result = run("apply", "--passes", "last_token", zoo_dir("qwen3_moe"))
    assert "1 site rewritten, 1 skipped" in result.output
