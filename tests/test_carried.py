"""A verified ``apply --save`` carries its verification: the save's first
start trusts it at once, keyed to the save's own files; an unverified apply
carries nothing, and an edited save verifies afresh."""

import json
import shutil
from pathlib import Path

import mlx.core as mx
import mlx_lm
import pytest
from helpers import TOKENS, run

from graphpatch import opening, trust

PASSES = "fuse_glu,fuse_qkv,last_token"


@pytest.fixture
def model_dir(zoo_dir, tmp_path) -> Path:
    return Path(shutil.copytree(zoo_dir("qwen3"), tmp_path / "model"))


def first_start(save: Path):
    """What run, serve and graphpatch.load do with a plain save: load it with
    mlx-lm and re-apply its recorded passes, trusting a matching record."""
    model = mlx_lm.load(str(save))[0]
    config = json.loads((save / "config.json").read_text())
    return model, trust.apply(model, opening.recorded(save, config), save, "cached")


def test_a_verified_save_is_trusted_on_its_first_start(model_dir, tmp_path):
    save = tmp_path / "saved"
    done = run("apply", "--passes", PASSES, model_dir, "--save", save)
    assert done.exit_code == 0, done.output
    assert "the save carries this verification" in done.output
    model, report = first_start(save)
    assert report.record_used.trusted and not report.verified
    assert report.record.startswith("verified on ")
    assert {s.pass_name for s in report.rewritten()} >= {"fuse_glu", "fuse_qkv"}
    reference = mlx_lm.load(str(model_dir))[0]
    assert mx.array_equal(model(TOKENS)[:, -1], reference(TOKENS)[:, -1])


def test_an_edited_save_verifies_afresh(model_dir, tmp_path):
    save = tmp_path / "saved"
    assert run("apply", "--passes", PASSES, model_dir, "--save", save).exit_code == 0
    weights = next(save.glob("*.safetensors"))
    copy = weights.with_name("copy")
    shutil.copy2(weights, copy)
    copy.replace(weights)  # the same bytes under a new inode
    _, report = first_start(save)
    assert report.verified and report.record.startswith("verified now")


def test_an_unverified_apply_carries_nothing(model_dir, tmp_path):
    save = tmp_path / "saved"
    done = run("apply", "--passes", PASSES, model_dir, "--save", save, "--no-verify")
    assert done.exit_code == 0, done.output
    assert "carries" not in done.output
    _, report = first_start(save)
    assert report.verified and report.record.startswith("verified now")
