"""Attacks on verification records and graphpatch run: a record vouches only
for what it saw (bytes, code, adapter), a broken record or cache is one
warning and a fresh verification, a cached mismatch undoes only its own
apply, run's report file and command are checked without hanging, and a
patched model generates from any thread."""

import json
import os
import re
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import mlx.core as mx
import mlx_lm
import pytest
from helpers import GRAPHPATCH, PROPERTY, PYTHON, TOKENS, graphpatch_serve
from hypothesis import given
from hypothesis import strategies as st
from mlx.utils import tree_flatten
from mlx_lm.tuner.utils import linear_to_lora_layers

import graphpatch
from graphpatch import run_hook, trust
from graphpatch.passes import PASSES

STARTUP = str(Path(graphpatch.__file__).parent / "_startup")


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    """Records of this test only: a broken one must not reach another test."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "own-cache"))


@pytest.fixture
def model_dir(zoo_dir, tmp_path) -> Path:
    return Path(shutil.copytree(zoo_dir("qwen3"), tmp_path / "model"))


def patched(model_dir: Path, passes: str, mode: str = "cached"):
    model, _ = mlx_lm.load(str(model_dir))
    return model, trust.apply(model, passes, model_dir, mode)


def run_under(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [GRAPHPATCH, "run", *args], capture_output=True, text=True, timeout=120
    )


def load_script(model_dir: Path) -> str:
    return f"import mlx_lm; mlx_lm.load({str(model_dir)!r}); print('done')"


def record_of(report) -> Path:
    return Path(report.record.split("record ")[1])


def rewrite_in_place(file: Path, offset: int, data: bytes) -> None:
    """Change bytes of ``file`` and put its size and mtime back (touch -r)."""
    before = file.stat()
    with open(file, "r+b") as f:
        f.seek(offset)
        f.write(data)
    os.utime(file, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = file.stat()
    assert (after.st_size, after.st_mtime_ns) == (before.st_size, before.st_mtime_ns)


def tensor_offset(file: Path, name: str) -> tuple[int, int]:
    """(start, end) in ``file`` of a safetensors tensor's bytes."""
    raw = file.read_bytes()
    length = int.from_bytes(raw[:8], "little")
    begin, end = json.loads(raw[8 : 8 + length])[name]["data_offsets"]
    return 8 + length + begin, 8 + length + end


# 1. the key: bytes, code, adapters


def test_weights_rewritten_with_size_and_mtime_kept_are_not_trusted(model_dir):
    weights = model_dir / "model.safetensors"
    patched(model_dir, "fuse_glu")
    start, end = tensor_offset(weights, "model.norm.weight")
    rewrite_in_place(weights, start, b"\xc0\x7f" * ((end - start) // 2))  # NaN
    with pytest.raises(graphpatch.GraphpatchError, match="NaN"):
        patched(model_dir, "fuse_glu")


@PROPERTY
@given(at=st.floats(0, 1), byte=st.integers(0, 255))
def test_any_byte_changed_in_place_changes_the_key(model_dir, at, byte):
    weights = model_dir / "model.safetensors"
    before = trust.key(model_dir, "fuse_glu")
    offset = int(at * (weights.stat().st_size - 1))
    rewrite_in_place(weights, offset, bytes([byte]))
    assert trust.key(model_dir, "fuse_glu") != before


def edited_copy(source: Path, into: Path) -> Path:
    """A copy of a source file or package with one file's text changed."""
    if source.name == "__init__.py":
        copy = Path(shutil.copytree(source.parent, into / source.parent.name))
        edited = sorted(copy.glob("*.py"))[-1]
        copy = copy / "__init__.py"
    else:
        into.mkdir(exist_ok=True)
        edited = copy = Path(shutil.copy(source, into / source.name))
    edited.write_text(edited.read_text() + "\n# edited\n")
    return copy


@pytest.mark.parametrize(
    "module, passes",
    [
        (graphpatch, "fuse_glu"),  # the core
        (sys.modules["graphpatch.passes.fuse_glu"], "fuse_glu"),  # a pass file
        (sys.modules["graphpatch.passes.last_token"], "last_token"),  # a package
    ],
    ids=["core", "pass", "package"],
)
def test_a_pass_or_core_edited_in_place_verifies_again(
    model_dir, tmp_path, monkeypatch, module, passes
):
    patched(model_dir, passes)
    assert patched(model_dir, passes)[1].record.startswith("verified on")
    copy = edited_copy(Path(module.__file__), tmp_path / "dev")
    monkeypatch.setattr(module, "__file__", str(copy))
    _, report = patched(model_dir, passes)
    assert report.verified and report.record.startswith("verified now")


def write_adapter(model_dir: Path, out: Path) -> Path:
    """A LoRA adapter on o_proj (the passes' sites are unchanged by it)."""
    model, _ = mlx_lm.load(str(model_dir))
    lora = {"rank": 4, "scale": 20.0, "dropout": 0.0, "keys": ["self_attn.o_proj"]}
    model.freeze()
    linear_to_lora_layers(model, 2, lora)
    arrays = {}
    for name, value in tree_flatten(model.trainable_parameters()):
        if name.endswith("lora_b"):
            value = mx.random.normal(value.shape, key=mx.random.key(len(arrays)))
        arrays[name] = value
    out.mkdir()
    mx.save_safetensors(str(out / "adapters.safetensors"), arrays)
    config = {"fine_tune_type": "lora", "num_layers": 2, "lora_parameters": lora}
    (out / "adapter_config.json").write_text(json.dumps(config))
    return out


@pytest.mark.parametrize("known", [True, False], ids=["adapter_path", "layers"])
def test_an_adapter_and_its_base_keep_records_side_by_side(model_dir, tmp_path, known):
    adapter = write_adapter(model_dir, tmp_path / "adapter")
    base = patched(model_dir, "fuse_glu,fuse_qkv")[1]
    model, _ = mlx_lm.load(str(model_dir), adapter_path=str(adapter))
    assert not mx.array_equal(model(TOKENS), mlx_lm.load(str(model_dir))[0](TOKENS))
    passes, known_path = "fuse_glu,fuse_qkv", {"adapter_path": adapter} if known else {}
    first = trust.apply(model, passes, model_dir, "cached", **known_path)
    assert first.record.startswith("verified now") and first.verified
    assert record_of(first) != record_of(base)
    trusted = patched(model_dir, passes)[1]
    assert trusted.record.startswith("verified on ")
    assert record_of(trusted) == record_of(base)
    model, _ = mlx_lm.load(str(model_dir), adapter_path=str(adapter))
    again = trust.apply(model, passes, model_dir, "cached", **known_path)
    assert again.record.startswith("verified on") and not again.verified


def test_a_full_fine_tune_under_run_gets_a_record_of_its_own(model_dir, tmp_path):
    """A full fine-tune leaves no layer to find: run keys it by the adapter
    files the program passed to mlx-lm's load."""
    adapter = tmp_path / "full"
    adapter.mkdir()
    norm = mlx_lm.load(str(model_dir))[0].model.norm.weight
    mx.save_safetensors(
        str(adapter / "adapters.safetensors"), {"model.norm.weight": norm * 3}
    )
    config = {"fine_tune_type": "full", "num_layers": 2, "lora_parameters": {}}
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    lines = []
    for path in (None, adapter):
        load = f"mlx_lm.load({str(model_dir)!r}, adapter_path={path and str(path)!r})"
        script = f"import mlx_lm; {load}; print('done')"
        done = run_under("--passes", "fuse_glu", "--", PYTHON, "-c", script)
        assert done.returncode == 0 and done.stdout == "done\n", done.stderr
        lines.append(done.stderr)
    assert "verified now" in lines[0] and "verified now" in lines[1]


# 2. records and caches that cannot be used


RECORD = {"date": "2026-01-01", "checkpoint": "x", "sites": {"fuse_glu": []}}


@pytest.mark.parametrize(
    "content",
    [
        b"",
        json.dumps(RECORD).encode()[:20],
        b"\xff\xfe{}",
        b"[]",
        json.dumps({**RECORD, "date": None}).encode(),
        json.dumps({k: v for k, v in RECORD.items() if k != "date"}).encode(),
        json.dumps({**RECORD, "date": 5}).encode(),
        json.dumps({**RECORD, "sites": ["model.layers.0.mlp"]}).encode(),
        json.dumps({**RECORD, "sites": {"fuse_glu": "model.layers.0.mlp"}}).encode(),
        json.dumps({**RECORD, "sites": {"fuse_glu": [0, 1]}}).encode(),
    ],
    ids=[
        "empty",
        "truncated",
        "not-utf8",
        "list",
        "null-date",
        "no-date",
        "int-date",
        "list-sites",
        "str-sites",
        "int-paths",
    ],
)
def test_a_broken_record_is_one_warning_and_a_fresh_verification(model_dir, content):
    file = record_of(patched(model_dir, "fuse_glu")[1])
    file.write_bytes(content)
    _, report = patched(model_dir, "fuse_glu")
    assert report.verified and report.record == f"verified now, record {file}"
    assert len(report.warnings) == 1
    assert report.warnings[0].startswith(f"{trust.IGNORED} {file} (")
    assert patched(model_dir, "fuse_glu")[1].record.startswith("verified on")


def test_a_records_date_is_printed_safely(model_dir):
    first = patched(model_dir, "fuse_glu")[1]
    record = json.loads(record_of(first).read_text())
    record["date"] = "\x1b[2J\rerror: fake\n" + "x" * 500
    record_of(first).write_text(json.dumps(record))
    shown = patched(model_dir, "fuse_glu")[1].record
    assert shown.startswith("verified on \\x1b[2J\\rerror: fake\\n")
    assert shown.isprintable() and "x" * 300 not in shown


def a_file_in_place(tmp_path: Path) -> Path:
    (tmp_path / "cache").write_text("not a directory")
    return tmp_path / "cache"


@pytest.mark.parametrize(
    "cache, why",
    [
        (a_file_in_place, "Not a directory"),
        (lambda tmp_path: tmp_path / ("x" * 300), "File name too long"),
        (lambda tmp_path: Path("/proc/graphpatch-cache"), "No such file"),
    ],
    ids=["file", "long-name", "not-writable"],
)
@pytest.mark.parametrize("mode", ["cached", "always"])
def test_an_unusable_cache_is_one_warning(
    model_dir, tmp_path, monkeypatch, cache, why, mode
):
    monkeypatch.setenv("XDG_CACHE_HOME", str(cache(tmp_path)))
    _, report = patched(model_dir, "fuse_glu", mode)
    assert report.verified and report.record is None
    (warning,) = report.warnings
    assert warning.startswith((trust.CACHE_OFF, trust.NOT_WRITTEN))
    assert why in warning


def test_a_relative_xdg_cache_home_is_ignored(model_dir, tmp_path, monkeypatch):
    (tmp_path / "home").mkdir()
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("XDG_CACHE_HOME", "relative")
    file = record_of(patched(model_dir, "fuse_glu")[1])
    assert file.parent == tmp_path / "home" / ".cache" / "graphpatch" / "verified"
    assert list((tmp_path / "cwd").iterdir()) == []


def test_a_record_that_cannot_be_replaced_is_not_claimed(model_dir):
    file = record_of(patched(model_dir, "fuse_glu")[1])
    file.unlink()
    file.mkdir()  # os.replace of the temporary file onto it fails
    _, report = patched(model_dir, "fuse_glu", "always")
    assert report.record is None
    assert report.warnings[0].startswith(f"{trust.NOT_WRITTEN} {file}")
    assert sorted(p.name for p in file.parent.iterdir() if p.name.startswith(".")) == []


def test_a_broken_record_never_stops_a_program_under_run(model_dir):
    file = record_of(patched(model_dir, "fuse_glu")[1])
    file.write_text("[")
    done = run_under("--passes", "fuse_glu", "--", PYTHON, "-c", load_script(model_dir))
    assert done.returncode == 0 and done.stdout == "done\n", done.stderr
    assert f"warning: {trust.IGNORED} {file}" in done.stderr


def test_serve_starts_past_a_broken_record(model_dir):
    file = record_of(patched(model_dir, "fuse_glu")[1])
    file.write_bytes(b"\xff")
    answered, stderr = graphpatch_serve(model_dir, "fuse_glu")
    assert answered and "mlx-lm could not load" not in stderr
    assert f"warning: {trust.IGNORED} {file}" in stderr


# 3. a cached mismatch undoes only its own apply


def test_a_cached_mismatch_keeps_the_passes_load_applied(model_dir, tmp_path):
    model, _ = graphpatch.load(model_dir)
    graphpatch.apply(model, ["fuse_qkv"])
    save = graphpatch.save(model, model_dir, tmp_path / "save")
    file = record_of(trust.apply(graphpatch.load(save)[0], "fuse_glu", save))
    record = json.loads(file.read_text())
    record["sites"]["fuse_glu"] = record["sites"]["fuse_glu"][:1]
    file.write_text(json.dumps(record))
    model, _ = graphpatch.load(save)
    report = trust.apply(model, "fuse_glu", save, "cached")
    assert report.verified and len(report.rewritten()) == 2
    assert len(PASSES["fuse_qkv"].applied(model)) == 2
    out = graphpatch.save(model, save, tmp_path / "out")
    section = json.loads((out / "config.json").read_text())["graphpatch"]
    assert [entry["name"] for entry in section["passes"]] == ["fuse_glu", "fuse_qkv"]


# 4. graphpatch run: the report file, links, commands


def test_a_report_fifo_nobody_reads_never_blocks_the_hook(model_dir, tmp_path):
    fifo = tmp_path / "reports"
    os.mkfifo(fifo)
    env = {**os.environ, "PYTHONPATH": STARTUP, "GRAPHPATCH_REPORT": str(fifo)}
    env["GRAPHPATCH_PASSES"] = "fuse_glu"
    done = subprocess.run(
        [PYTHON, "-c", load_script(model_dir)],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert done.returncode == 0 and done.stdout == "done\n", done.stderr
    assert f"{run_hook.REPORT_NOT_WRITTEN} {fifo} ({run_hook.NO_READER})" in done.stderr
    assert "fuse_glu: 2 rewritten" in done.stderr


def test_a_dangling_safetensors_link_does_not_stop_the_program(model_dir):
    (model_dir / "consolidated.safetensors").symlink_to(model_dir / "gone")
    done = run_under("--passes", "fuse_glu", "--", PYTHON, "-c", load_script(model_dir))
    assert done.returncode == 0 and done.stdout == "done\n", done.stderr
    assert "fuse_glu: 2 rewritten" in done.stderr


def a_script(tmp_path: Path) -> Path:
    script = tmp_path / "job.sh"
    script.write_text("#!/bin/sh\necho hi\n")
    script.chmod(0o644)
    return script


def test_a_script_that_is_not_executable_cannot_run(tmp_path):
    script = a_script(tmp_path)
    with pytest.raises(run_hook.CannotRun, match=re.escape(run_hook.NOT_EXECUTABLE)):
        run_hook.run([str(script)], dict(os.environ), STARTUP)


# 5. a patched model generates from any thread


def on_a_thread(model, tokenizer) -> str:
    out: list = []

    def generate() -> None:
        try:
            out.append(mlx_lm.generate(model, tokenizer, "The quick", max_tokens=6))
        except Exception as e:
            out.append(e)

    thread = threading.Thread(target=generate)
    thread.start()
    thread.join(timeout=60)
    if isinstance(out[0], Exception):
        raise out[0]
    return out[0]


def unfused_text(model_dir: Path) -> str:
    model, tokenizer = mlx_lm.load(str(model_dir))
    return mlx_lm.generate(model, tokenizer, "The quick", max_tokens=6)


PASS_LISTS = ["fuse_glu", "fuse_qkv"]


@pytest.mark.parametrize("passes", PASS_LISTS)
def test_an_unverified_apply_generates_on_another_thread(zoo_dir, passes):
    model, tokenizer = mlx_lm.load(str(zoo_dir("qwen3")))
    graphpatch.apply(model, [passes], verify=False)
    assert on_a_thread(model, tokenizer) == unfused_text(zoo_dir("qwen3"))


@pytest.mark.parametrize("passes", PASS_LISTS)
def test_a_verified_apply_generates_on_another_thread(zoo_dir, passes):
    model, tokenizer = mlx_lm.load(str(zoo_dir("qwen3")))
    graphpatch.apply(model, [passes], verify=True)
    assert on_a_thread(model, tokenizer) == unfused_text(zoo_dir("qwen3"))


@pytest.mark.parametrize("passes", PASS_LISTS)
def test_a_trusted_apply_generates_on_another_thread(model_dir, passes):
    patched(model_dir, passes)
    model, tokenizer = mlx_lm.load(str(model_dir))
    report = trust.apply(model, passes, model_dir, "cached")
    assert report.record.startswith("verified on")
    assert on_a_thread(model, tokenizer) == unfused_text(model_dir)
