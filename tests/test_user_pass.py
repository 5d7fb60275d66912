"""A user's own pass (CONTRIBUTING's example, run from this very text) goes
through apply, revert, save and load like graphpatch's, and cannot take a
registered pass's name."""

import importlib.util
import json
import re
from pathlib import Path

import mlx.core as mx
import pytest
from helpers import TOKENS, assert_same_bits, snapshot

import graphpatch
from graphpatch import PassSpecError
from graphpatch.passes import PASSES

CONTRIBUTING = Path(__file__).parents[1] / "CONTRIBUTING.md"


pytestmark = pytest.mark.usefixtures("fresh_user_passes")


@pytest.fixture(scope="module")
def user_pass(tmp_path_factory):
    """The example's module, written to a folder of the user's own."""
    text = CONTRIBUTING.read_text()
    section = text[text.index("### A pass of your own") :]
    (code,) = re.findall(r"```python\n(.*?)```", section, re.S)[:1]
    path = tmp_path_factory.mktemp("user_repo") / "rms_norm_f32.py"
    path.write_text(code)
    spec = importlib.util.spec_from_file_location("rms_norm_f32", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_example_is_short():
    text = CONTRIBUTING.read_text()
    section = text[text.index("### A pass of your own") :]
    code = re.findall(r"```python\n(.*?)```", section, re.S)[0]
    body = code[code.index('"""\n\n') :]  # past the house docstring
    assert len(body.strip().splitlines()) <= 50


def test_a_users_pass_applies_reverts_and_says_already_applied(user_pass, load_zoo):
    model, _ = load_zoo("llama")
    before, logits = snapshot(model), model(TOKENS)
    report = graphpatch.apply(model, [user_pass.PASS, "fuse_glu"])
    norms = report.rewritten("rms_norm_f32")
    assert len(norms) >= 3 and all(s.verified for s in norms)
    assert len(report.rewritten("fuse_glu")) == 2
    assert mx.array_equal(model(TOKENS), logits)  # float32: the same bits
    again = graphpatch.apply(model, [user_pass.PASS])
    assert {s.reason for s in again.sites} == {user_pass.ALREADY_APPLIED}
    restored = graphpatch.revert(model, [user_pass.PASS])
    assert all(r.startswith("rms_norm_f32:") for r in restored)
    assert len(restored) == len(norms) and len(PASSES["fuse_glu"].applied(model)) == 2
    graphpatch.revert(model)
    assert_same_bits(before, snapshot(model))


def test_a_users_pass_is_named_by_its_name_once_known(user_pass, load_zoo):
    model, _ = load_zoo("llama")
    graphpatch.apply(model, [user_pass.PASS])
    graphpatch.revert(model)
    report = graphpatch.apply(model, "rms_norm_f32,fuse_qkv")
    assert report.passes == ["fuse_qkv", "rms_norm_f32"]  # users' after graphpatch's
    graphpatch.revert(model, "rms_norm_f32")
    assert user_pass.PASS.applied(model) == []


def test_a_save_records_a_users_pass_and_load_reapplies_it(
    user_pass, zoo_dir, tmp_path
):
    source = zoo_dir("llama")
    model = graphpatch.load(source)[0]
    graphpatch.apply(model, [user_pass.PASS])
    out = graphpatch.save(model, source, tmp_path / "saved")
    section = json.loads((out / "config.json").read_text())["graphpatch"]
    assert [p["name"] for p in section["passes"]] == ["rms_norm_f32"]
    reopened = graphpatch.load(out, passes=[user_pass.PASS])[0]
    assert user_pass.PASS.applied(reopened) == user_pass.PASS.applied(model)
    assert mx.array_equal(reopened(TOKENS), model(TOKENS))


def test_a_users_pass_cannot_take_a_registered_name(user_pass):
    from dataclasses import replace

    with pytest.raises(PassSpecError, match="already the name of another pass"):
        graphpatch.apply(_model(), [replace(user_pass.PASS, name="fuse_glu")])
    with pytest.raises(PassSpecError, match="lowercase letters"):
        graphpatch.apply(_model(), [replace(user_pass.PASS, name="Bad Name")])


def _model():
    import mlx.nn as nn

    return nn.Linear(2, 2)
