"""Attacks on golden, serve, run and coverage: one `error:` line and the
documented exit code (2 bad input, 1 a failed check, the child's own under
run, 126 for a program that cannot start), never a traceback or a hang."""

import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import mlx.core as mx
import pytest
from helpers import (
    GRAPHPATCH,
    PROPERTY,
    PYTHON,
    command,
    digest,
    edit_config,
    linked_copy,
    one_error_line,
    one_line,
    run,
    write_golden,
)
from hypothesis import given
from hypothesis import strategies as st

from graphpatch import golden
from graphpatch.testing import ring

# golden


def test_golden_writes_exactly_the_file_named(zoo_dir, tmp_path):
    out = tmp_path / "golden-llama"  # no .safetensors suffix
    result = run("golden", "record", zoo_dir("llama"), out)
    assert result.output.strip() == f"wrote {out}"
    assert [p.name for p in tmp_path.iterdir()] == ["golden-llama"]
    assert run("golden", "check", zoo_dir("llama"), out).exit_code == 0


def test_golden_never_replaces_what_is_not_a_golden_file(zoo_dir, tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    before = digest(tmp_path)
    for out in (tmp_path, tmp_path / "notes.txt"):
        one_error_line(run("golden", "record", zoo_dir("llama"), out))
    assert digest(tmp_path) == before


@pytest.mark.parametrize(
    "content, words",
    [
        (b"", "no prompts"),
        (b"\n  \n", "no prompts"),
        (b"\xff\xfe\x00abc", "not UTF-8"),
        (b"a\x00b\n", "binary"),
    ],
)
def test_golden_prompts_files_are_checked(zoo_dir, tmp_path, content, words):
    prompts = tmp_path / "prompts.txt"
    prompts.write_bytes(content)
    out = tmp_path / "g.safetensors"
    result = run("golden", "record", zoo_dir("llama"), out, "--prompts", prompts)
    assert words in one_error_line(result) and not out.exists()


def test_a_prompt_longer_than_the_context_is_refused(zoo_dir, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("the quick brown fox " * 60_000)  # a 1.2 MB line
    done = command(
        "golden", "record", zoo_dir("llama"), tmp_path / "g", "--prompts", prompts
    )
    assert "more than the model's context (1024)" in one_line(done)


def test_golden_record_to_an_unwritable_place_is_one_line(zoo_dir):
    line = one_error_line(
        run("golden", "record", zoo_dir("llama"), "/sys/g.safetensors")
    )
    assert "cannot write /sys/g.safetensors" in line


@pytest.fixture(scope="module")
def recorded(zoo_dir, tmp_path_factory) -> tuple[Path, dict, dict]:
    file = tmp_path_factory.mktemp("golden") / "llama.safetensors"
    golden.record(zoo_dir("llama"), file)
    arrays, metadata = mx.load(str(file), return_metadata=True)
    return file, arrays, metadata


@pytest.mark.parametrize(
    "edit, words",
    [
        (lambda a, m: m.pop("tolerance"), "no tolerance in its metadata"),
        (lambda a, m: m.update(tolerance="x"), "is not two numbers"),
        (lambda a, m: m.update(tolerance="nan,1"), "not two finite numbers"),
        (
            lambda a, m: [a.pop(k) for k in list(a) if k.startswith("tokens.")],
            "no prompts",
        ),
        (lambda a, m: a.pop("logits.1"), "prompt 1 lacks"),
        (lambda a, m: a.pop("top.0"), "prompt 0 lacks"),
        (
            lambda a, m: a.update({"logits.0": a["logits.0"][None]}),
            "not a row of logits",
        ),
        (
            lambda a, m: a.update({"tokens.0": mx.array([1.5, 2.0])}),
            "not a row of token ids",
        ),
        (lambda a, m: a.update({"tokens.0": mx.zeros((0,), mx.int32)}), "not a row"),
        (
            lambda a, m: a.update({"top.0": mx.array([9999], mx.int32)}),
            "outside logits.0",
        ),
        (
            lambda a, m: a.update({"tokens.0": mx.array([1, 512], mx.int32)}),
            "token id 512",
        ),
        (
            lambda a, m: a.update(
                {"logits.0": a["logits.0"][:9], "top.0": mx.array([0], mx.int32)}
            ),
            "the model gives 512",
        ),
    ],
)
def test_a_corrupted_golden_file_is_one_line(zoo_dir, tmp_path, recorded, edit, words):
    _, arrays, metadata = recorded
    arrays, metadata = dict(arrays), dict(metadata)
    edit(arrays, metadata)
    file = write_golden(tmp_path / "bad.safetensors", arrays, metadata)
    assert words in one_error_line(run("golden", "check", zoo_dir("llama"), file))


ROWS = st.one_of(
    st.lists(st.integers(-3, 700), max_size=6).map(lambda x: mx.array(x, mx.int32)),
    st.lists(st.floats(-2, 2, width=32), max_size=600).map(lambda x: mx.array(x)),
    st.just(mx.zeros((2, 3))),
)


@PROPERTY
@given(
    entries=st.dictionaries(
        st.sampled_from(["tokens.0", "logits.0", "top.0", "tokens.1", "top.1"]), ROWS
    ),
    drop=st.sets(
        st.sampled_from(["tolerance", "config_hash", "weights_hash", "passes"])
    ),
)
def test_any_golden_file_checks_or_is_one_line(
    zoo_dir, tmp_path_factory, recorded, entries, drop
):
    _, arrays, metadata = recorded
    arrays = {**arrays, **entries}
    metadata = {k: v for k, v in metadata.items() if k not in drop}
    file = write_golden(
        tmp_path_factory.mktemp("g") / "g.safetensors", arrays, metadata
    )
    result = run("golden", "check", zoo_dir("llama"), file)
    assert result.exit_code in (0, 1, 2), result.output
    if result.exit_code == 2:
        one_error_line(result)


# serve


def listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


@pytest.mark.parametrize(
    "args, words",
    [
        (["--port", "70000"], "a port is a number from 1 to 65535"),
        (["--port", "0"], "a port is a number from 1 to 65535"),
        (["--host", "no-such-host.invalid"], "not an address to listen on"),
    ],
)
def test_serve_refuses_an_address_it_cannot_use(zoo_dir, args, words):
    assert words in one_line(command("serve", zoo_dir("llama"), *args, timeout=60))


def test_serve_refuses_a_port_in_use(zoo_dir):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = command("serve", zoo_dir("llama"), "--port", port, timeout=60)
    assert "Address already in use" in one_line(done)


def test_serve_taken_after_the_check_is_one_line_and_an_exit(zoo_dir):
    """Another server took the port while this one loaded: the bind fails
    after the early check, with mlx-lm's generation thread already running,
    and still ends at once in one line."""
    script = (
        "import socket\n"
        "from graphpatch import serving\n"
        "taken = socket.socket()\n"
        "taken.bind(('127.0.0.1', 0))\n"
        "taken.listen()\n"
        "port = taken.getsockname()[1]\n"
        f"serving.serve({str(zoo_dir('llama'))!r}, '127.0.0.1', port, 'fuse_glu', [])\n"
    )
    done = subprocess.run(
        [PYTHON, "-c", script], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 2 and "Traceback" not in done.stderr
    last = done.stderr.strip().splitlines()[-1]  # after the patched model's report
    assert last.startswith("error: cannot listen on") and "already in use" in last


def broken_model(zoo_dir, tmp_path, **changes) -> Path:
    model = linked_copy(zoo_dir("llama"), tmp_path / "model")
    edit_config(model, **changes)
    return model


@pytest.mark.parametrize(
    "changes, words",
    [
        ({"quantization": "yes"}, "quantization must map"),
        ({"hidden_size": 64}, "mlx-lm could not load it"),  # passes our checks
    ],
)
def test_serve_exits_without_listening_when_the_model_cannot_load(
    zoo_dir, tmp_path, changes, words
):
    port = ring.free_ports(1)[0]
    model = broken_model(zoo_dir, tmp_path, **changes)
    process = subprocess.Popen(
        [GRAPHPATCH, "serve", model, "--port", str(port)],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        while process.poll() is None:
            assert not listening(port), "listening with no model"
            time.sleep(0.05)
        stderr = process.stderr.read()
    finally:
        process.kill()
        process.wait()
    assert process.returncode == 2 and words in stderr
    assert "Traceback" not in stderr


# run


def test_run_passes_sigint_on_and_ends_with_the_childs_status(tmp_path):
    script = (
        "import signal, sys, time\n"
        "signal.signal(signal.SIGINT, lambda *a: sys.exit(7))\n"
        "print('ready', flush=True)\n"
        "time.sleep(60)\n"
    )
    process = subprocess.Popen(
        [GRAPHPATCH, "run", "--", PYTHON, "-c", script],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # no terminal: only graphpatch gets the signal
    )
    assert process.stdout.readline().strip() == "ready"
    process.send_signal(signal.SIGINT)
    assert process.wait(timeout=30) == 7


@pytest.mark.parametrize(
    "content, words",
    [
        (b"\x00\x01 not a program\n", "no #! line"),
        (b"#!/no/such/interpreter\nprint(1)\n", "#! interpreter was not found"),
    ],
)
def test_run_on_a_program_that_cannot_start_is_126(tmp_path, content, words):
    program = tmp_path / "program"
    program.write_bytes(content)
    program.chmod(0o755)
    assert words in one_line(
        command("run", "--passes", "fuse_glu", "--", program), code=126
    )


def test_run_checks_the_report_file_before_the_child_starts(tmp_path):
    marker = tmp_path / "ran"
    env = {**os.environ, "GRAPHPATCH_REPORT": "/sys/report.jsonl"}
    script = f"open({str(marker)!r}, 'w')"
    done = command("run", "--passes", "fuse_glu", "--", PYTHON, "-c", script, env=env)
    assert "GRAPHPATCH_REPORT=/sys/report.jsonl: cannot be written" in one_line(done)
    assert not marker.exists()


def test_run_says_what_happened_once_after_a_failed_load(zoo_dir, tmp_path):
    model = broken_model(zoo_dir, tmp_path, rms_norm_eps=float("nan"))
    script = f"import mlx_lm; mlx_lm.load({str(model)!r})"
    done = command("run", "--passes", "fuse_glu", "--", PYTHON, "-c", script)
    assert done.returncode == 2, done.stderr
    assert "NaN or +inf" in done.stderr and "loaded no model" not in done.stderr


def test_coverage_write_to_an_unwritable_path_fails_before_building():
    start = time.monotonic()
    done = command("coverage", "llama", "--write", "/sys/x/coverage.md")
    assert "cannot be written" in one_line(done) or "writable" in done.stderr
    assert time.monotonic() - start < 60
