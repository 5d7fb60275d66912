"""Attacks on what apply reads: model directories, configs, safetensors
headers, pass specs, probes and checkpoints. Each bad input is one `error:`
line and exit 2 (never a traceback, a hang or a crash), and the source
directory's bytes never change."""

import json
import os
import shutil
import struct
import subprocess
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from helpers import (
    DELETE,
    GRAPHPATCH,
    PROPERTY,
    digest,
    edit_config,
    linked_copy,
    one_error_line,
    run,
)
from hypothesis import given
from hypothesis import strategies as st
from mlx_lm.models.cache import make_prompt_cache
from safetensors.numpy import load_file, save_file

import graphpatch
from graphpatch.limits import TokenError
from graphpatch.passes import last_token
from graphpatch.passes.untied_head import checkpoint


def header_file(file: Path, header, data: bytes = b"\0" * 16) -> None:
    text = json.dumps(header).encode()
    file.unlink(missing_ok=True)
    file.write_bytes(struct.pack("<Q", len(text)) + text + data)


@pytest.fixture
def model(zoo_dir, tmp_path) -> Path:
    return Path(shutil.copytree(zoo_dir("llama"), tmp_path / "model"))


BAD_DIRECTORIES = {
    "no hidden_size": (
        lambda m: edit_config(m, hidden_size=DELETE),
        "hidden_size is missing",
    ),
    "layers as a word": (
        lambda m: edit_config(m, num_hidden_layers="two"),
        "num_hidden_layers must be an integer",
    ),
    "10^12 layers": (
        lambda m: edit_config(m, num_hidden_layers=10**12),
        "larger than any real model's",
    ),
    "a million layers": (
        lambda m: edit_config(m, num_hidden_layers=10**6),
        "the weights hold 2 layers",
    ),
    "a module that exits on import": (  # olmo's, without ai2-olmo installed
        lambda m: edit_config(m, model_type="olmo"),
        "mlx-lm's 'olmo' module exits on import and says: To run olmo install",
    ),
    "quantization yes": (
        lambda m: edit_config(m, quantization="yes"),
        "quantization must map bits and group_size",
    ),
    "header a list": (
        lambda m: header_file(m / "model.safetensors", [1, 2]),
        "not a safetensors file",
    ),
    "string data_offsets": (
        lambda m: header_file(
            m / "model.safetensors",
            {"a": {"dtype": "F32", "shape": [1], "data_offsets": "0,4"}},
        ),
        "not a safetensors file",
    ),
    "null header entry": (
        lambda m: header_file(m / "model.safetensors", {"a": None}),
        "not a safetensors file",
    ),
    "weight_map of numbers": (
        lambda m: (m / "model.safetensors.index.json").write_text(
            json.dumps({"weight_map": {"model.norm.weight": 1}})
        ),
        "weight_map is not a mapping of file names",
    ),
    "self symlink": (
        lambda m: (
            (m / "model.safetensors").unlink(),
            (m / "model.safetensors").symlink_to("model.safetensors"),
        ),
        "Too many levels of symbolic links",
    ),
    "weights a directory": (
        lambda m: (
            (m / "model.safetensors").unlink(),
            (m / "model.safetensors").mkdir(),
        ),
        "is a directory",
    ),
}


@pytest.mark.parametrize("kind", BAD_DIRECTORIES)
def test_a_bad_directory_is_one_line(model, kind):
    mutate, words = BAD_DIRECTORIES[kind]
    mutate(model)
    before = digest(model)
    assert words in one_error_line(run("apply", "--passes", "fuse_glu", model))
    assert digest(model) == before


@pytest.mark.parametrize("name", ["model.safetensors", "tokenizer.json", "config.json"])
def test_a_fifo_is_refused_not_read(model, name):
    (model / name).unlink()
    os.mkfifo(model / name)
    done = subprocess.run(
        [GRAPHPATCH, "apply", "--passes", "fuse_glu", model],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    assert (
        done.stderr.strip()
        == f"error: {model / name}: not a regular file (a FIFO, socket or device)"
    )


VALUES = st.one_of(
    st.just(DELETE),
    st.none(),
    st.booleans(),
    st.integers(-(2**40), 2**40),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=4),
    st.lists(st.integers(-3, 3), max_size=3),
    st.dictionaries(st.text(max_size=3), st.integers(0, 8), max_size=2),
)
KEYS = st.sampled_from(
    [
        "hidden_size",
        "num_hidden_layers",
        "intermediate_size",
        "num_attention_heads",
        "num_key_value_heads",
        "rms_norm_eps",
        "vocab_size",
        "max_position_embeddings",
        "tie_word_embeddings",
        "rope_theta",
        "head_dim",
        "quantization",
        "model_type",
    ]
)


@PROPERTY
@given(changes=st.dictionaries(KEYS, VALUES, min_size=1, max_size=3))
def test_any_config_value_is_a_model_or_one_line(zoo_dir, tmp_path_factory, changes):
    source = zoo_dir("llama")
    before = digest(source)
    model = linked_copy(source, tmp_path_factory.mktemp("config") / "model")
    edit_config(model, **changes)
    result = run("apply", "--passes", "fuse_glu,last_token", model)
    assert result.exit_code in (0, 2), result.output
    if result.exit_code == 2:
        one_error_line(result)
    assert digest(source) == before


TENSOR = st.fixed_dictionaries(
    {
        "dtype": st.sampled_from(["F32", "BF16", "U32", "Q9", 3]),
        "shape": st.lists(st.integers(-2, 2**40), max_size=3),
        "data_offsets": st.one_of(
            st.lists(st.integers(-4, 2**40), min_size=2, max_size=2),
            st.text(max_size=3),
        ),
    }
)
HEADERS = st.one_of(
    st.dictionaries(
        st.sampled_from(["model.norm.weight", "a", "__metadata__"]),
        st.one_of(st.none(), TENSOR),
    ),
    st.lists(st.integers(), max_size=2),
    st.text(max_size=5),
    st.integers(),
)


@PROPERTY
@given(header=HEADERS, data=st.binary(max_size=32))
def test_any_safetensors_header_is_one_line(zoo_dir, tmp_path_factory, header, data):
    model = linked_copy(zoo_dir("llama"), tmp_path_factory.mktemp("header") / "model")
    header_file(model / "model.safetensors", header, data)
    one_error_line(run("apply", "--passes", "fuse_glu", model))


@PROPERTY
@given(spec=st.text(alphabet="fuse_glast_tokn:=,kep0129-xy ", max_size=24))
def test_any_pass_spec_runs_or_is_one_line(zoo_dir, spec):
    result = run("apply", "--no-verify", "--passes", spec, zoo_dir("llama"))
    assert result.exit_code in (0, 2), result.output
    if result.exit_code == 2:
        one_error_line(result)


@pytest.mark.parametrize(
    "spec, words",
    [
        ("last_token:keep=100000", "keep must be between 1 and 1024"),
        ("last_token:keep=0", "keep must be between 1 and 1024"),
        ("last_token:keep=1024", "reach past the model's context (1024)"),
    ],
)
def test_keep_is_checked_against_the_model(zoo_dir, spec, words):
    assert words in one_error_line(run("apply", "--passes", spec, zoo_dir("llama")))


@pytest.mark.parametrize(
    "probe, words",
    [
        ([[1, 2, 512]], "token id 512 is outside the vocabulary (0..511)"),
        ([[-1, 2]], "token id -1 is outside"),
        ([[1] * 1025], "1025 tokens, more than the model's context (1024)"),
    ],
)
def test_probe_ids_and_lengths_are_checked_before_mlx_sees_them(load_zoo, probe, words):
    model, _ = load_zoo("llama")
    with pytest.raises(TokenError, match=words.replace("(", r"\(").replace(")", r"\)")):
        graphpatch.apply(model, "fuse_glu", probe=probe)
    assert graphpatch.PASSES["fuse_glu"].applied(model) == []


def negated_with(zoo_dir, tmp_path, **build) -> Path:
    return Path(
        shutil.copytree(zoo_dir("llama", head="negated", **build), tmp_path / "m")
    )


def test_a_head_from_another_models_checkpoint_is_not_bound(zoo_dir, load_zoo):
    model, _ = load_zoo("llama", head="negated")
    other = zoo_dir("llama", head="negated", seed=5)
    reference = model(mx.array([[5, 9, 33]]))
    report = graphpatch.apply(model, "untied_head", model_dir=str(other))
    (site,) = report.skipped()
    assert site.reason == checkpoint.NOT_THIS_MODEL.format(
        dir=other, name="model.embed_tokens.weight"
    )
    assert mx.array_equal(model(mx.array([[5, 9, 33]])), reference)


@pytest.mark.parametrize(
    "poison, words",
    [
        (lambda w: w.astype(np.int32), "is int32, a head needs float32"),
        (
            lambda w: np.where(np.arange(w.size).reshape(w.shape) == 7, np.nan, w),
            "NaN or inf",
        ),
    ],
    ids=["int32", "nan"],
)
def test_a_non_float_or_non_finite_head_is_refused(zoo_dir, tmp_path, poison, words):
    model_dir = negated_with(zoo_dir, tmp_path)
    arrays = load_file(model_dir / "model.safetensors")
    arrays["lm_head.weight"] = poison(arrays["lm_head.weight"])
    save_file(arrays, model_dir / "model.safetensors", metadata={"format": "mlx"})
    before = digest(model_dir)
    line = one_error_line(run("apply", "--passes", "untied_head", model_dir))
    assert words in line
    assert digest(model_dir) == before


def test_a_missing_model_dir_is_an_error_not_a_tied_head(load_zoo, tmp_path):
    model, _ = load_zoo("llama")
    with pytest.raises(graphpatch.LoadError, match="not a model directory"):
        graphpatch.apply(model, "untied_head", model_dir=str(tmp_path / "nowhere"))


def test_save_records_the_options_the_model_carries(zoo_dir, tmp_path):
    model_dir = zoo_dir("llama")
    model, _ = graphpatch.load(model_dir)
    graphpatch.apply(model, "last_token:keep=4:short=5")
    out = graphpatch.save(model, model_dir, tmp_path / "saved")
    loaded, _ = graphpatch.load(out)

    def prefill(tokens: list[int]) -> int:
        with last_token.prefill():  # a declared prefill into an empty cache
            return loaded(mx.array([tokens]), cache=make_prompt_cache(loaded)).shape[1]

    assert prefill([1, 2, 3, 4, 5, 6, 7]) == 4
    assert prefill([1, 2, 3, 4, 5]) == 5


def saved_config_edits():
    def keep(value):
        def edit(section):
            next(e for e in section["passes"] if e["name"] == "last_token")[
                "options"
            ] = {"keep": value}

        return edit

    return {
        "keep abc": (keep("abc"), "option last_token:keep wants an integer, got 'abc'"),
        "keep 0": (keep(0), "keep must be between 1 and 1024"),
        "keep true": (keep(True), "wants an integer, got True"),
        "section a list": (
            lambda s: s.clear() or [1],
            "graphpatch section: not a mapping",
        ),
        "fused, no model_type": (
            lambda s: s.pop("model_type"),
            "no model_type string",
        ),
        "format unknown": (lambda s: s.update(format="zip"), "unknown format 'zip'"),
        "passes a string": (
            lambda s: s.update(passes="fuse_glu"),
            "passes is not a list of pass entries",
        ),
        "unknown pass": (
            lambda s: s["passes"][0].update(name="fuse_all"),
            "unknown pass 'fuse_all'",
        ),
    }


@pytest.mark.parametrize("kind", saved_config_edits())
def test_a_hand_edited_saved_config_is_one_line(zoo_dir, tmp_path, kind):
    model_dir = zoo_dir("llama")
    model, _ = graphpatch.load(model_dir)
    graphpatch.apply(model, "last_token:keep=4")
    save_format = "fused" if kind.startswith("fused") else "plain"
    out = graphpatch.save(model, model_dir, tmp_path / "saved", format=save_format)
    config = json.loads((out / "config.json").read_text())
    edit, words = saved_config_edits()[kind]
    replaced = edit(config["graphpatch"])
    if isinstance(replaced, list):
        config["graphpatch"] = replaced
    (out / "config.json").write_text(json.dumps(config))
    before = digest(out)
    assert words in one_error_line(run("apply", "--passes", "fuse_glu", out))
    assert digest(out) == before
