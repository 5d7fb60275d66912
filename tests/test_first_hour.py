"""What a new user sees: the installed ``graphpatch`` command in an 80-column
terminal or a pipe, JSON for scripts, and errors for empty or bad requests."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import GRAPHPATCH

from graphpatch import PASSES
from graphpatch.report import SCHEMA

KEYS = {"schema", "graphpatch", "model", "rank", "passes", "sites", "checks"}


def graphpatch(*args: str, env: dict | None = None):
    env = {**os.environ, "COLUMNS": "80", **(env or {})}
    return subprocess.run(
        [GRAPHPATCH, *args], capture_output=True, text=True, timeout=300, env=env
    )


def test_the_report_keeps_every_column_at_80_and_groups_sites(zoo_dir):
    model_dir = str(zoo_dir("llama", num_hidden_layers=6))
    result = graphpatch("apply", "--passes", "fuse_glu,last_token", model_dir)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    # every line fits, but the record's path, which is never broken
    assert max(len(line) for line in lines if "record /" not in line) <= 80
    assert "max error" in result.stdout and "top-1" in result.stdout
    grouped = [line for line in lines if "model.layers.{0..5}.mlp" in line]
    assert len(grouped) == 1 and "100%" in grouped[0]
    assert "6 sites" in result.stdout and "model.layers.3.mlp" not in result.stdout
    verbose = graphpatch("apply", "--verbose", "--passes", "fuse_glu", model_dir)
    for layer in range(6):
        assert f"model.layers.{layer}.mlp" in verbose.stdout


def test_list_shows_every_env_name_whole_and_as_json():
    listed = graphpatch("list")
    assert max(len(line) for line in listed.stdout.splitlines()) <= 80
    for p in PASSES.values():
        assert p.env in listed.stdout
    data = json.loads(graphpatch("list", "--json").stdout)
    assert data["schema"] == SCHEMA and [p["name"] for p in data["passes"]] == list(
        PASSES
    )
    assert data["passes"][0]["env"] == "GRAPHPATCH_UNTIED_HEAD"


def test_json_has_one_shape_for_apply_and_the_run_report_file(zoo_dir, tmp_path):
    model_dir = str(zoo_dir("qwen3"))
    applied = json.loads(
        graphpatch("apply", "--json", "--passes", "fuse_glu", model_dir).stdout
    )
    report_file = tmp_path / "report.jsonl"
    generate = [sys.executable, "-m", "mlx_lm", "generate", "--max-tokens", "2"]
    env = {"GRAPHPATCH_REPORT": str(report_file)}
    ran = graphpatch(
        "run",
        "--passes",
        "fuse_glu",
        "--",
        *generate,
        "--model",
        model_dir,
        "--prompt",
        "Hi",
        env=env,
    )
    assert ran.returncode == 0, ran.stderr
    logged = json.loads(report_file.read_text().splitlines()[0])
    assert KEYS <= applied.keys() and applied.keys() == logged.keys()
    assert applied["model"] == logged["model"] == model_dir
    assert applied["graphpatch"] == logged["graphpatch"] and applied["schema"] == SCHEMA


@pytest.mark.parametrize(
    "args, code, says",
    [
        (["apply", "--json"], 2, "no passes chosen"),
        (["apply", "--json", "--passes", "fuse_gl"], 2, "unknown pass 'fuse_gl'"),
        (
            ["apply", "--json", "--passes", "fuse_glu", "/nonexistent/m"],
            2,
            "/nonexistent/m",
        ),
    ],
)
def test_errors_are_json_with_json_and_one_line_without(zoo_dir, args, code, says):
    if args[-1] == "--json" or args[-1] == "fuse_gl":
        args = [*args, str(zoo_dir("llama"))]
    result = graphpatch(*args)
    assert result.returncode == code
    error = json.loads(result.stdout)
    assert says in error["error"] and error["exit_code"] == code
    assert error["schema"] == SCHEMA
    plain = graphpatch(*[a for a in args if a != "--json"])
    assert plain.returncode == code and plain.stdout == ""
    assert plain.stderr.count("\n") == 1 and plain.stderr.startswith("error: ")


def test_apply_without_passes_says_how_to_name_them(zoo_dir):
    result = graphpatch("apply", str(zoo_dir("llama")))
    assert result.returncode == 2 and "--passes" in result.stderr
    off = graphpatch(
        "apply",
        "--passes",
        "fuse_glu",
        str(zoo_dir("llama")),
        env={"GRAPHPATCH_FUSE_GLU": "0"},
    )
    assert (
        off.returncode == 2
        and "GRAPHPATCH_FUSE_GLU=0 switched fuse_glu off" in off.stderr
    )


def test_run_usage_shows_the_command_and_progress_counts_sites(zoo_dir):
    assert "-- CMD [ARGS]..." in graphpatch("run", "--help").stdout
    generate = [sys.executable, "-m", "mlx_lm", "generate", "--max-tokens", "2"]
    model_dir = str(zoo_dir("llama"))
    ran = graphpatch(
        "run",
        "--passes",
        "fuse_glu",
        "--verify",
        "always",
        "--",
        *generate,
        "--model",
        model_dir,
        "--prompt",
        "Hi",
    )
    assert ran.returncode == 0, ran.stderr
    assert f"{model_dir}: fuse_glu: site 1 of 2 (model.layers.0.mlp)" in ran.stderr
    assert f"{model_dir}: fuse_glu: checking the model" in ran.stderr


def test_version_is_the_packages():
    from importlib.metadata import version

    assert (
        graphpatch("--version").stdout.strip()
        == f"graphpatch {version('mlx-graphpatch')}"
    )


def hf_cache(root: Path, repo: str, model_dir: Path) -> None:
    """``repo`` placed in a Hugging Face cache as the hub lays one out: files
    are links into blobs/, a snapshot per commit, refs/main naming it."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    cached = root / f"models--{repo.replace('/', '--')}"
    snapshot = cached / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (cached / "blobs").mkdir()
    for file in model_dir.iterdir():
        blob = cached / "blobs" / f"blob-{file.name}"
        blob.write_bytes(file.read_bytes())
        (snapshot / file.name).symlink_to(os.path.relpath(blob, snapshot))
    (cached / "refs").mkdir()
    (cached / "refs" / "main").write_text(commit)


def test_a_repo_id_is_found_in_the_hugging_face_cache(zoo_dir, tmp_path):
    hf_cache(tmp_path / "hub", "org/tiny-llama", zoo_dir("llama"))
    env = {"HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    result = graphpatch(
        "apply", "--json", "--passes", "fuse_glu", "org/tiny-llama", env=env
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert len(report["sites"]) == 2 and "models--org--tiny-llama" in report["model"]
    missing = graphpatch("apply", "--passes", "fuse_glu", "org/not-cached", env=env)
    assert missing.returncode == 2 and missing.stderr.count("\n") == 1
    assert "org/not-cached: no such directory, and not in the Hugging Face cache" in (
        missing.stderr
    )
