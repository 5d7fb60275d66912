"""Attacks on golden verdicts, golden and coverage outputs, pass specs and run's
inputs: a clear verdict or one `error:` line, and nothing of the user's
replaced."""

import io
import json
import os
import subprocess
from pathlib import Path

import mlx.core as mx
import mlx_lm
import numpy as np
import pytest
from helpers import (
    GRAPHPATCH,
    PROPERTY,
    PYTHON,
    command,
    digest,
    linked_copy,
    one_error_line,
    one_line,
    run,
    write_golden,
)
from hypothesis import given
from hypothesis import strategies as st
from rich.console import Console
from safetensors.numpy import load_file, save_file

import graphpatch
from graphpatch import golden, golden_file
from graphpatch.contract import PassSpecError
from graphpatch.report import Report
from graphpatch.testing import coverage


@pytest.fixture(scope="module")
def llama_golden(zoo_dir, tmp_path_factory) -> tuple[dict, dict]:
    file = golden.record(zoo_dir("llama"), tmp_path_factory.mktemp("g") / "g")
    arrays, metadata = mx.load(str(file), format="safetensors", return_metadata=True)
    return arrays, metadata


def edited(tmp_path: Path, recorded: tuple[dict, dict], i: int, at: int, value):
    """The recorded file with ``logits.i[at] = value``."""
    arrays, metadata = dict(recorded[0]), dict(recorded[1])
    logits = arrays[f"logits.{i}"]
    arrays[f"logits.{i}"] = mx.where(mx.arange(logits.size) == at, value, logits)
    return write_golden(tmp_path / "edited.safetensors", arrays, metadata)


# golden verdicts


def test_tokens_masked_with_minus_inf_in_both_are_no_error(zoo_dir, tmp_path):
    model = zoo_dir("phi3small")  # its forward writes -inf at fixed ids
    file = golden.record(model, tmp_path / "phi3small.safetensors")
    arrays, _ = golden.read(file)
    assert mx.isinf(arrays["logits.0"]).any().item()
    result = run("golden", "check", model, file)
    assert result.exit_code == 0, result.output
    for line in result.output.splitlines():
        assert "max abs error 0 (tolerance " in line and line.endswith(": ok")
        assert "nan" not in line and "inf" not in line and "vocab id" not in line


def test_an_infinity_on_one_side_only_is_failed(zoo_dir, tmp_path, llama_golden):
    file = edited(tmp_path, llama_golden, 1, 7, float("-inf"))
    result = run("golden", "check", zoo_dir("llama"), file)
    assert result.exit_code == 1, result.output
    line = result.output.splitlines()[1]
    assert line.startswith("prompt 1 (12 tokens): 1 vocab ids infinite on one side")
    assert "(first 7: -inf in the file, " in line and line.endswith(": FAILED")


def test_an_infinity_never_scales_the_tolerance(llama_golden):
    arrays = dict(llama_golden[0])
    golden_row = arrays["logits.0"]
    masked = mx.arange(golden_row.size) == 3
    arrays["logits.0"] = mx.where(masked, float("inf"), golden_row)
    now = mx.where(masked, float("inf"), golden_row + 0.5)  # moved by 0.5
    line, ok = golden._compare(0, arrays, now, 1e-5, 1e-5)
    assert not ok and "max abs error 0.5 at vocab id" in line
    assert "tolerance inf" not in line and line.endswith(": FAILED")


def test_nan_in_a_golden_file_is_refused(zoo_dir, tmp_path, llama_golden):
    file = edited(tmp_path, llama_golden, 0, 3, float("nan"))
    line = one_error_line(run("golden", "check", zoo_dir("llama"), file))
    assert f"logits.0 {golden_file.NAN_IN_FILE}" in line and "tolerance nan" not in line


def test_a_changed_top1_is_failed_whatever_the_error(zoo_dir, tmp_path, llama_golden):
    arrays, metadata = dict(llama_golden[0]), llama_golden[1]
    second = arrays["top.0"][1:2]
    arrays["top.0"] = mx.concatenate([second, arrays["top.0"][1:]])
    file = write_golden(tmp_path / "top.safetensors", arrays, metadata)
    result = run("golden", "check", zoo_dir("llama"), file)
    assert result.exit_code == 1, result.output
    first = result.output.splitlines()[0]
    assert "max abs error 0 (tolerance" in first
    assert f"top-1 {second.item()} -> " in first and first.endswith(": FAILED")


def test_golden_values_from_the_file_are_printed_as_text(
    zoo_dir, tmp_path, llama_golden
):
    metadata = {**llama_golden[1], "platform": "\x1b[2J[red]cleared"}
    file = write_golden(tmp_path / "m.safetensors", dict(llama_golden[0]), metadata)
    done = command("golden", "check", zoo_dir("llama"), file)
    assert done.returncode == 0, done.stderr
    assert (
        "\x1b" not in done.stdout and "platform: \\x1b[2J[red]cleared ->" in done.stdout
    )


def test_golden_record_refuses_a_model_that_gives_nan(zoo_dir, tmp_path):
    model = linked_copy(zoo_dir("llama"), tmp_path / "model")
    weights = model / "model.safetensors"
    arrays = load_file(weights)
    arrays["model.norm.weight"] = np.full_like(arrays["model.norm.weight"], np.nan)
    weights.unlink()  # a link to the zoo's file: write a file of its own
    save_file(arrays, weights, metadata={"format": "mlx"})
    out = tmp_path / "g.safetensors"
    line = one_error_line(run("golden", "record", model, out))
    assert golden.NAN_FROM_MODEL in line and not out.exists()


# where golden record may write


def test_golden_record_never_writes_into_a_model_directory(zoo_dir, tmp_path):
    model = linked_copy(zoo_dir("llama"), tmp_path / "model")
    (tmp_path / "link").symlink_to(model)
    before = digest(model)
    for out in ("model_golden.safetensors", "golden.safetensors", "g"):
        for parent in (model, tmp_path / "link"):
            line = one_error_line(run("golden", "record", model, parent / out))
            assert golden.IN_A_MODEL_DIR in line
    assert digest(model) == before
    mlx_lm.load(str(model))  # still opens


# coverage --write


def test_coverage_write_refuses_a_file_it_did_not_write(tmp_path):
    mine = tmp_path / "notes.md"
    mine.write_text("# my notes\n")
    line = one_error_line(run("coverage", "llama", "--write", mine))
    assert "coverage wrote: give --force to replace it" in line
    os.mkfifo(tmp_path / "fifo")
    assert "not a regular file" in one_error_line(
        run("coverage", "--write", tmp_path / "fifo")
    )
    assert mine.read_text() == "# my notes\n"


def test_coverage_write_with_force_replaces_it_whole(tmp_path):
    mine = tmp_path / "notes.md"
    mine.write_text("# my notes\n")
    inode = mine.stat().st_ino
    done = command("coverage", "llama", "--write", mine, "--force", timeout=300)
    assert done.returncode == 0, done.stderr
    assert (
        mine.read_text().startswith(coverage.MARKER) and "| llama |" in mine.read_text()
    )
    assert mine.stat().st_ino != inode  # renamed over it, never rewritten in place
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.md"]
    assert coverage.written_here(mine)  # the next --write replaces it


def test_make_coverage_may_replace_the_checked_in_table():
    docs = Path(__file__).parent.parent / "docs" / "COVERAGE.md"
    assert coverage.written_here(docs)


# pass specs


@pytest.mark.parametrize(
    "passes, words",
    [
        (42, "got int"),
        (b"fuse_glu", "got bytes"),
        ({"fuse_glu": 1}, "got dict"),
        ([None], "None is not a pass spec"),
        ([["fuse_glu"]], "['fuse_glu'] is not a pass spec"),
        (["fuse_glu", 3.5], "3.5 is not a pass spec"),
    ],
)
def test_odd_pass_lists_are_one_clear_error(load_zoo, passes, words):
    model, _ = load_zoo("llama")
    with pytest.raises(PassSpecError) as raised:
        graphpatch.apply(model, passes=passes)
    assert str(raised.value).startswith(graphpatch.plan.NOT_SPECS)
    assert words in str(raised.value) and "\n" not in str(raised.value)


@PROPERTY
@given(
    passes=st.one_of(
        st.integers(),
        st.binary(max_size=8),
        st.dictionaries(st.text(max_size=4), st.integers(), max_size=2),
        st.lists(st.one_of(st.none(), st.integers(), st.lists(st.text())), min_size=1),
    )
)
def test_any_pass_list_of_other_types_is_a_pass_spec_error(passes):
    with pytest.raises(PassSpecError):
        graphpatch.resolve(passes, {})


@pytest.mark.parametrize(
    "spec", [" fuse_glu:tune = 1", "fuse_glu : tune", " fuse_glu: tune= on "]
)
def test_spaces_around_the_parts_of_a_spec_are_ignored(spec):
    plan, _ = graphpatch.resolve(spec, {})
    assert [(p.name, options) for p, options in plan] == [("fuse_glu", {"tune": True})]


@pytest.mark.parametrize(
    "value, shown",
    [("fuse_glu\nlast_token", "fuse_glu\\nlast_token"), ("fuse\x1b[2Jglu", "\\x1b")],
)
def test_a_control_character_in_graphpatch_passes_names_the_variable(
    tmp_path, value, shown
):
    env = {**os.environ, "GRAPHPATCH_PASSES": value}
    done = command("run", "--", PYTHON, "-c", "print(1)", env=env, timeout=60)
    line = one_line(done)
    assert "GRAPHPATCH_PASSES holds a control character" in line and shown in line
    assert "\x1b" not in done.stderr


def test_an_unknown_variable_is_named_as_text():
    env = {**os.environ, "GRAPHPATCH_X\x1b[2J[red]Y": "1"}
    done = command("run", "--passes", "fuse_glu", "--", "true", env=env, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "warning: GRAPHPATCH_X\\x1b[2J[red]Y is not a graphpatch" in done.stderr


def test_markup_in_a_pass_name_is_shown_as_written(zoo_dir):
    done = command("apply", "--passes", "[red]fuse", zoo_dir("llama"), timeout=60)
    assert "unknown pass '[red]fuse'" in one_line(done)


def test_passes_given_twice_both_count(zoo_dir):
    args = ["apply", "--no-verify", "--json", "--passes", "fuse_glu"]
    result = run(*args, "--passes", "last_token", zoo_dir("llama"))
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert {"fuse_glu", "last_token"} <= set(report["passes"])


# run's inputs


def test_run_on_a_script_that_is_not_executable_is_126(tmp_path):
    script = tmp_path / "score.py"
    script.write_text("print(1)\n")  # no chmod +x
    line = one_error_line(run("run", "--passes", "fuse_glu", "--", script), 126)
    assert f"cannot run {script}: not executable" in line
    missing = run("run", "--passes", "fuse_glu", "--", tmp_path / "none")
    assert "command not found" in one_error_line(missing, 127)


def test_run_refuses_a_report_that_is_not_a_regular_file(tmp_path):
    os.mkfifo(tmp_path / "fifo")  # opened for writing, it would block for ever
    env = {**os.environ, "GRAPHPATCH_REPORT": str(tmp_path / "fifo")}
    script = ["--", PYTHON, "-c", "print(1)"]
    done = command("run", "--passes", "fuse_glu", *script, env=env, timeout=60)
    assert "not a regular file" in one_line(done)


def test_a_relative_report_is_written_where_it_was_checked(zoo_dir, tmp_path):
    (tmp_path / "sub").mkdir()
    load = f"import os, mlx_lm; os.chdir('sub'); mlx_lm.load({str(zoo_dir('llama'))!r})"
    env = {**os.environ, "GRAPHPATCH_REPORT": "report.jsonl"}
    done = subprocess.run(
        [GRAPHPATCH, "run", "--passes", "fuse_glu", "--"] + [PYTHON, "-c", load],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "report.jsonl").read_text().strip()
    assert not (tmp_path / "sub" / "report.jsonl").exists()


# the report's lines from files


def test_a_report_prints_a_records_text_as_text():
    report = Report(["fuse_glu"], "float32", True)
    report.record = "verified on \x1b[2J2026-01-01, record x"
    report.warnings.append("[red]error:[/red] fake\rline")
    shown = io.StringIO()
    report.print(Console(file=shown, width=120))
    text = shown.getvalue()
    assert "\x1b" not in text and "\r" not in text
    assert "verified on \\x1b[2J2026-01-01" in text and "[red]error:[/red] fake" in text
