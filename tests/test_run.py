"""graphpatch run: unmodified programs load patched models, with real processes."""

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from helpers import GRAPHPATCH, PYTHON, answers, free_port, graphpatch_serve, server
from safetensors.numpy import load_file, save_file

from graphpatch.testing import ring

GENERATE = [PYTHON, "-m", "mlx_lm", "generate", "--max-tokens", "8", "--temp", "0"]


def run(*command: str, env: dict | None = None, timeout: float = 120):
    return subprocess.run(
        command,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


@pytest.mark.parametrize("name", ["llama", "qwen3_moe"])
def test_mlx_lm_generate_prints_the_same_text_patched(zoo_dir, name):
    args = [*GENERATE, "--model", str(zoo_dir(name)), "--prompt", "The quick brown"]
    plain = run(*args)
    # --verify always: a record another test left for this zoo model would
    # otherwise be trusted, and a trusted apply reports no max error
    passes = ["--passes", "fuse_glu,last_token", "--verify", "always"]
    patched = run(GRAPHPATCH, "run", *passes, "--", *args)
    assert plain.returncode == patched.returncode == 0, patched.stderr
    text = lambda out: out.split("==========")[1]  # noqa: E731 (timings differ)
    assert text(patched.stdout) == text(plain.stdout)
    assert "fuse_glu: 2 rewritten, 0 skipped, max error 0" in patched.stderr
    assert "last_token: 1 rewritten" in patched.stderr
    assert "graphpatch" not in plain.stderr


def test_env_chooses_the_passes_and_the_report_file_gets_json(zoo_dir, tmp_path):
    report_file = tmp_path / "reports.jsonl"
    env = {"GRAPHPATCH_FUSE_GLU": "1", "GRAPHPATCH_REPORT": str(report_file)}
    args = [*GENERATE, "--model", str(zoo_dir("qwen3")), "--prompt", "Hi"]
    result = run(GRAPHPATCH, "run", "--", *args, env=env)
    assert result.returncode == 0, result.stderr
    (entry,) = [json.loads(line) for line in report_file.read_text().splitlines()]
    assert entry["passes"] == ["fuse_glu"]
    assert len(entry["sites"]) == 2 and entry["model"] == str(zoo_dir("qwen3"))


def test_bad_checkpoint_stops_the_program_before_it_generates(zoo_dir, tmp_path):
    import shutil

    model_dir = tmp_path / "bad"
    shutil.copytree(zoo_dir("llama", head="negated"), model_dir)
    arrays = load_file(model_dir / "model.safetensors")
    arrays["lm_head.weight"] = arrays["lm_head.weight"][:, :64].copy()
    save_file(arrays, model_dir / "model.safetensors")
    args = [*GENERATE, "--model", str(model_dir), "--prompt", "Hi"]
    result = run(GRAPHPATCH, "run", "--passes", "untied_head", "--", *args)
    assert result.returncode == 2  # bad input, as graphpatch apply exits
    assert "graphpatch: error: checkpoint lm_head.weight has shape" in result.stderr
    assert "loaded no model" not in result.stderr
    assert result.stdout == ""


@pytest.mark.parametrize(
    "command, env, code, line",
    [
        (["nosuchprogram"], {}, 127, "error: command not found: nosuchprogram"),
        ([PYTHON, "-c", "pass"], {"GRAPHPATCH_FUSE_GLU": "of"}, 2, "must be 1/0"),
        ([PYTHON, "-c", "pass"], {"GRAPHPATCH_HOME": "/x"}, 0, "HOME is not a"),
        ([PYTHON, "-c", "pass"], {"GRAPHPATCH_ELIDE_HEAD": "1"}, 2, "elide_head needs"),
        ([PYTHON, "-c", "pass"], {}, 0, "loaded no model through mlx-lm"),
        ([PYTHON, "-c", "raise SystemExit(3)"], {}, 3, "nothing was patched"),
    ],
)
def test_bad_input_is_one_line_and_exit_codes_pass_through(command, env, code, line):
    result = run(GRAPHPATCH, "run", "--passes", "last_token", "--", *command, env=env)
    assert result.returncode == code
    assert line in result.stderr
    assert "Traceback" not in result.stderr


def test_mlx_lm_server_answers_the_same_patched(zoo_dir):
    model_dir = zoo_dir("qwen3_moe")
    with server(model_dir) as (port, _):
        expected = answers(port)
    passes = "fuse_glu,last_token"
    with server(model_dir, GRAPHPATCH, "run", "--passes", passes, "--") as (port, p):
        assert answers(port) == expected
        p.terminate()
        assert "last_token: 1 rewritten" in p.communicate(timeout=30)[1]


def test_graphpatch_serve_is_the_patched_mlx_lm_server(zoo_dir, tmp_path):
    """Three starts: verified, trusting the first's record, not verified. The
    last two must still run the rewritten weights on the server's generation
    thread (arrays built on one thread cannot be evaluated on another)."""
    model_dir = Path(shutil.copytree(zoo_dir("llama"), tmp_path / "llama"))
    os.utime(model_dir / "model.safetensors", ns=(3, 3))  # a checkpoint of its own
    with server(model_dir) as (port, _):
        expected = answers(port)
    for start in ("verified now", "verified on"):
        answered, stderr = graphpatch_serve(model_dir, "fuse_glu,last_token")
        assert answered == expected
        assert "fuse_glu: 2 rewritten" in stderr and start in stderr
    never = ("--verify", "never")
    answered, stderr = graphpatch_serve(model_dir, "fuse_glu,last_token", *never)
    assert answered == expected and "(unverified)" in stderr


def test_serve_with_a_draft_model_answers_as_mlx_lm_does(zoo_dir):
    """Speculative decoding in mlx-lm's own server, flags passed through: the
    default last_token keeps every position of the verification calls."""
    model_dir, draft = zoo_dir("qwen3"), zoo_dir("qwen3", seed=1)
    flags = ("--draft-model", str(draft), "--num-draft-tokens", "3")
    with server(model_dir, flags=flags) as (port, _):
        expected = answers(port)
    answered, stderr = graphpatch_serve(model_dir, "last_token", *flags)
    assert answered == expected and "last_token: 1 rewritten" in stderr


def test_serve_refuses_a_bad_pass_list_before_the_port_opens(zoo_dir):
    port = free_port()
    args = [GRAPHPATCH, "serve", str(zoo_dir("llama")), "--passes", "fuse_al"]
    result = run(*args, "--port", str(port), timeout=60)
    assert result.returncode == 2 and "unknown pass 'fuse_al'" in result.stderr


@pytest.mark.parametrize("kind", ["tensor", "pipeline"])
def test_a_ring_launch_under_graphpatch_run_patches_every_rank(zoo_dir, kind):
    model_dir = str(zoo_dir("qwen2", shards=2))
    script = [PYTHON, str(Path(__file__).parent / "ranks" / "sharded_load.py")]
    command = [*script, model_dir, kind]
    plain = ring.launch(command, timeout=120)
    patched = ring.launch([GRAPHPATCH, "run", "--passes", "fuse_glu", "--", *command])
    for before, after in zip(plain, patched, strict=True):
        assert after.returncode == 0, after.stderr
        assert f"graphpatch[rank {after.rank}]: {model_dir}: fuse_glu: " in after.stderr
        ours, theirs = (json.loads(r.stdout.strip()) for r in (after, before))
        assert ours["argmax"] == theirs["argmax"]
        assert theirs["fused"] == [] and ours["fused"]


def test_elide_head_with_logits_runs_under_graphpatch_run(zoo_dir):
    model_dir = str(zoo_dir("qwen2", shards=2, tie_word_embeddings=False))
    script = [PYTHON, str(Path(__file__).parent / "ranks" / "sharded_load.py")]
    command = [*script, model_dir, "pipeline"]
    plain = ring.launch(command, timeout=120)
    passes = "last_token,elide_head:logits"
    patched = ring.launch([GRAPHPATCH, "run", "--passes", passes, "--", *command])
    for before, after in zip(plain, patched, strict=True):
        assert after.returncode == 0, after.stderr
        line = f"graphpatch[rank {after.rank}]: {model_dir}: elide_head: "
        assert line in after.stderr
        ours, theirs = (json.loads(r.stdout.strip()) for r in (after, before))
        assert ours["argmax"] == theirs["argmax"]
