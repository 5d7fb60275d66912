"""Verification records: a start of the same checkpoint with the same passes
and software trusts a record of an earlier verified apply; any change of the
key, or of the sites found, verifies again."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import pytest
from helpers import GRAPHPATCH, TOKENS

import graphpatch
from graphpatch import trust


@pytest.fixture
def model_dir(zoo_dir, tmp_path) -> Path:
    return Path(shutil.copytree(zoo_dir("qwen3"), tmp_path / "model"))


def patched(model_dir: Path, passes: str, mode: str):
    model, _ = graphpatch.load(model_dir)
    return model, trust.apply(model, passes, model_dir, mode)


def test_a_matching_record_skips_verification(model_dir):
    _, first = patched(model_dir, "fuse_glu,last_token", "cached")
    assert first.verified and first.record.startswith("verified now, record ")
    model, again = patched(model_dir, "fuse_glu,last_token", "cached")
    assert not again.verified and again.record.startswith("verified on ")
    assert [s.path for s in again.rewritten()] == [s.path for s in first.rewritten()]
    reference, _ = graphpatch.load(model_dir)
    assert mx.array_equal(model(TOKENS)[:, -1], reference(TOKENS)[:, -1])


@pytest.mark.parametrize(
    "change",
    [
        lambda m: os.utime(m / "model.safetensors", ns=(1, 1)),  # weights' mtime
        lambda m: (m / "config.json").write_text(
            json.dumps({**json.loads((m / "config.json").read_text()), "x": 1})
        ),
    ],
    ids=["weights", "config"],
)
def test_a_changed_checkpoint_verifies_again(model_dir, change):
    patched(model_dir, "fuse_glu", "cached")
    change(model_dir)
    _, report = patched(model_dir, "fuse_glu", "cached")
    assert report.verified and report.record.startswith("verified now")


def test_other_passes_or_options_verify_again(model_dir):
    patched(model_dir, "last_token", "cached")
    _, report = patched(model_dir, "last_token:keep=2", "cached")
    assert report.verified


def test_a_record_of_other_sites_is_not_trusted(model_dir):
    _, first = patched(model_dir, "fuse_glu", "cached")
    file = Path(first.record.split("record ")[1])
    record = json.loads(file.read_text())
    record["sites"]["fuse_glu"] = record["sites"]["fuse_glu"][:1]
    file.write_text(json.dumps(record))
    _, report = patched(model_dir, "fuse_glu", "cached")
    assert report.verified and len(report.rewritten()) == 2


def test_always_verifies_and_never_verifies_nothing(model_dir):
    patched(model_dir, "fuse_glu", "cached")
    assert patched(model_dir, "fuse_glu", "always")[1].verified
    never = patched(model_dir, "fuse_glu", "never")[1]
    assert not never.verified and never.record is None


def test_graphpatch_run_uses_the_record_on_its_second_start(model_dir):
    os.utime(model_dir / "model.safetensors", ns=(2, 2))  # a checkpoint of its own
    script = f"import mlx_lm; mlx_lm.load({str(model_dir)!r})"
    command = [GRAPHPATCH, "run", "--passes", "fuse_glu", "--", sys.executable]
    lines = []
    for _ in range(2):
        done = subprocess.run(
            [*command, "-c", script], capture_output=True, text=True, timeout=120
        )
        assert done.returncode == 0, done.stderr
        lines.append(done.stderr)
    assert "verified now, record" in lines[0] and "verified on" in lines[1]
