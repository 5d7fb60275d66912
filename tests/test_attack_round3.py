"""The third hostile round's findings, each one `error:` line with the right
exit code or the behaviour a user expects (issue: trust, second round, item
9; the round's cases and verdicts are listed in the session notes)."""

import json
import os
import shutil
import subprocess
import sys
import threading
import urllib.error
from pathlib import Path

import mlx_lm
import pytest
from helpers import GRAPHPATCH, command, free_port, one_line, post, wait_until_up

import graphpatch
from graphpatch import outdir


def _copy(zoo_dir, tmp_path: Path) -> Path:
    source = tmp_path / "model"
    shutil.copytree(zoo_dir("llama"), source)
    return source


def test_an_out_name_over_the_systems_limit_is_refused_before_loading(
    zoo_dir, tmp_path
):
    done = command(
        "apply",
        "--passes",
        "fuse_glu",
        zoo_dir("llama"),
        "--save",
        tmp_path / ("n" * 256),
    )
    assert "File name too long" in one_line(done)
    assert "rewritten" not in done.stdout  # nothing was loaded or reported


def test_an_absolute_out_past_path_max_is_refused_before_loading(
    zoo_dir, tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    for i in range(17):  # 240 characters each: the absolute name passes PATH_MAX
        os.mkdir(f"{i:02d}{'d' * 238}")
        os.chdir(f"{i:02d}{'d' * 238}")
    done = command(
        "apply", "--passes", "fuse_glu", zoo_dir("llama"), "--save", "e" * 200
    )
    assert "File name too long" in one_line(done)
    assert "rewritten" not in done.stdout


def test_a_linked_folder_in_the_source_is_not_copied_and_is_named(zoo_dir, tmp_path):
    source = _copy(zoo_dir, tmp_path)
    elsewhere = tmp_path / "big"
    elsewhere.mkdir()
    (elsewhere / "data.bin").write_bytes(b"not the model's")
    (source / "zones").symlink_to(elsewhere)
    (source / "loop").symlink_to(".")
    (source / "adapters").mkdir()
    (source / "adapters" / "a.txt").write_text("kept")
    out = tmp_path / "out"
    done = command("apply", "--passes", "fuse_glu", source, "--save", out)
    assert done.returncode == 0, done.stderr
    assert not (out / "zones").exists() and not (out / "loop").exists()
    assert (out / "adapters" / "a.txt").read_text() == "kept"
    assert "not copying loop/" in done.stderr and "not copying zones/" in done.stderr


def test_a_config_nested_too_deep_is_one_line(zoo_dir, tmp_path):
    source = _copy(zoo_dir, tmp_path)
    (source / "config.json").write_text("[" * 100000 + "]" * 100000)
    assert "nested too deep" in one_line(
        command("apply", "--passes", "fuse_glu", source)
    )
    golden = tmp_path / "g.safetensors"
    assert command("golden", "record", zoo_dir("llama"), golden).returncode == 0
    assert "nested too deep" in one_line(command("golden", "check", source, golden))


def test_mlx_lms_bare_assertion_is_named_by_where_it_fails(zoo_dir, tmp_path):
    source = _copy(zoo_dir, tmp_path)
    config = json.loads((source / "config.json").read_text())
    (source / "config.json").write_text(json.dumps({**config, "vocab_size": -1}))
    line = one_line(command("apply", "--passes", "fuse_glu", source))
    assert "could not load it" in line and ".py:" in line, line


def _fused_save(zoo_dir, out: Path) -> None:
    saved = command(
        "apply",
        "--passes",
        "fuse_glu",
        zoo_dir("llama"),
        "--save",
        out,
        "--save-format",
        "fused",
    )
    assert saved.returncode == 0, saved.stderr


def test_serve_of_a_fused_save_is_one_line(zoo_dir, tmp_path):
    out = tmp_path / "fused"
    _fused_save(zoo_dir, out)
    assert "fused" in one_line(command("serve", out, "--port", "18997"))


PROGRAM = """
import os, sys
{close}
import mlx_lm
model, _ = mlx_lm.load(sys.argv[1])
kind = type(model.model.layers[0].mlp.gate_proj).__name__
open(sys.argv[2], "w").write(kind)
"""


@pytest.mark.parametrize("close", ["os.close(1); os.close(2)", "", "pipe"])
def test_a_program_whose_stderr_is_gone_still_loads_patched(zoo_dir, tmp_path, close):
    # A daemon closes its descriptors; a log reader may have gone (2>&1 | head).
    script, result = tmp_path / "program.py", tmp_path / "kind.txt"
    script.write_text(PROGRAM.format(close="" if close == "pipe" else close))
    child = subprocess.Popen(
        [
            GRAPHPATCH,
            "run",
            "--passes",
            "fuse_glu",
            "--verify",
            "always",
            "--",
            sys.executable,
            script,
            zoo_dir("llama"),
            result,
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE if close == "pipe" else subprocess.DEVNULL,
    )
    if close == "pipe":
        child.stderr.close()  # the reader is gone before graphpatch says a word
    assert child.wait(timeout=120) == 0
    assert result.read_text() == "FusedPart"


def test_a_flag_mlx_lms_server_refuses_is_one_line(zoo_dir):
    done = command(
        "serve", zoo_dir("llama"), "--port", "18996", "--num-draft-tokens", "abc"
    )
    assert "invalid int value: 'abc'" in one_line(done)


def test_a_dangling_link_nobody_reads_does_not_stop_apply(zoo_dir, tmp_path):
    source = _copy(zoo_dir, tmp_path)
    (source / "dangling.json").symlink_to(tmp_path / "gone.json")
    done = command("apply", "--passes", "fuse_glu", source)
    assert done.returncode == 0, done.stderr
    (source / "extra.safetensors").symlink_to(tmp_path / "gone.safetensors")
    assert "extra.safetensors" in one_line(
        command("apply", "--passes", "fuse_glu", source)
    )


def test_threads_at_once_on_an_unverified_fused_model(load_zoo):
    # The joined arrays of an unverified apply stay a graph until first used;
    # three threads using it at once once crashed MLX (a segfault).
    model, tokenizer = load_zoo("qwen3_moe")
    expected = mlx_lm.generate(model, tokenizer, "hello there", max_tokens=6)
    graphpatch.apply(model, ["fuse_glu", "fuse_qkv"], verify=False)
    answers = []

    def generate():
        answers.append(mlx_lm.generate(model, tokenizer, "hello there", max_tokens=6))

    threads = [threading.Thread(target=generate) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert answers == [expected] * 3
    graphpatch.revert(model)
    assert mlx_lm.generate(model, tokenizer, "hello there", max_tokens=6) == expected


@pytest.mark.parametrize("planted", ["fifo", "/dev/zero"])
def test_a_record_that_is_no_file_is_one_warning(zoo_dir, tmp_path, planted):
    model_dir = zoo_dir("llama")
    cache = tmp_path / "cache"
    env = {**os.environ, "XDG_CACHE_HOME": str(cache)}
    first = command(
        "apply", "--passes", "fuse_glu", model_dir, "--verify", "cached", env=env
    )
    assert first.returncode == 0, first.stderr
    (record,) = (cache / "graphpatch" / "verified").glob("*.json")
    record.unlink()
    if planted == "fifo":
        os.mkfifo(record)
    else:
        record.symlink_to(planted)
    done = command(
        "apply",
        "--passes",
        "fuse_glu",
        model_dir,
        "--verify",
        "cached",
        env=env,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert "not a regular file" in done.stdout + done.stderr
    assert "verified now" in done.stdout + done.stderr


def test_a_request_naming_a_model_that_cannot_be_patched_spares_the_server(
    zoo_dir, tmp_path
):
    fused = tmp_path / "fused"
    _fused_save(zoo_dir, fused)
    port = free_port()
    process = subprocess.Popen(
        [
            GRAPHPATCH,
            "serve",
            zoo_dir("llama"),
            "--passes",
            "fuse_glu",
            "--port",
            str(port),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_until_up(port, process)
        body = {"prompt": "The quick", "max_tokens": 4, "temperature": 0}
        with pytest.raises(urllib.error.HTTPError):
            post(port, "/v1/completions", {**body, "model": str(fused)})
        assert post(port, "/v1/completions", body)["choices"][0]["text"]
        assert process.poll() is None
    finally:
        process.terminate()
        stderr = process.communicate(timeout=30)[1]
    assert "saved with --save-format fused" in stderr


def test_output_that_cannot_be_written_is_one_line():
    with open("/dev/full", "w") as full:
        done = subprocess.run(
            [GRAPHPATCH, "list", "--json"],
            stdout=full,
            stderr=subprocess.PIPE,
            text=True,
            timeout=60,
        )
    assert done.returncode == 2
    assert (
        done.stderr.strip() == "error: cannot write the output: No space left on device"
    )


def test_serve_refuses_a_second_model_among_mlx_lms_flags(zoo_dir):
    done = command(
        "serve", zoo_dir("llama"), "--port", "18995", "--model", zoo_dir("qwen3_moe")
    )
    assert "--model is graphpatch serve's own argument" in one_line(done)


def test_a_save_restored_from_a_killed_replace_is_said_when_refused(zoo_dir, tmp_path):
    out = tmp_path / "out"
    assert (
        command(
            "apply", "--passes", "fuse_glu", zoo_dir("llama"), "--save", out
        ).returncode
        == 0
    )
    # What a kill between the two renames of a replace leaves: OUT set aside.
    out.rename(tmp_path / f".graphpatch-old-999999-{outdir.tag(out)}")
    line = one_line(
        command("apply", "--passes", "fuse_glu", zoo_dir("llama"), "--save", out)
    )
    assert line.startswith(f"error: restored {out}") and "--force" in line
    assert (out / "config.json").is_file()
