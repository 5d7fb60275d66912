"""Shared fixtures: real zoo model directories, built once per test session."""

import os
from pathlib import Path

import mlx.core as mx
import mlx_lm
import numpy as np
import pytest
from mlx.utils import tree_flatten
from mlx_lm.utils import quantize_model

import graphpatch
from graphpatch.testing import zoo


@pytest.fixture(scope="session", autouse=True)
def records_in_a_temporary_cache(tmp_path_factory):
    """Verification records go to a cache of the test session's own (the
    pretrained checkpoint, resolved at import, stays in the user's cache)."""
    os.environ["XDG_CACHE_HOME"] = str(tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="session")
def zoo_dir(tmp_path_factory):
    """``zoo_dir(name, **build_kwargs) -> Path``, each directory built once."""
    root = tmp_path_factory.mktemp("zoo")
    built: dict[str, Path] = {}

    def get(name: str, **kwargs) -> Path:
        key = name + "".join(f"-{k}={v}" for k, v in sorted(kwargs.items()))
        if key not in built:
            built[key] = zoo.build(name, root / key, **kwargs)
        return built[key]

    return get


@pytest.fixture(scope="session")
def load_zoo(zoo_dir):
    """``load_zoo(name, **build_kwargs) -> (model, tokenizer)`` via mlx_lm.load."""

    def load(name: str, **kwargs):
        return mlx_lm.load(str(zoo_dir(name, **kwargs)))

    return load


def snapshot(model) -> dict[str, np.ndarray]:
    """Every parameter as a numpy copy, keyed by path: a bit-for-bit record."""
    out = {}
    for k, v in tree_flatten(model.parameters()):
        v = v.view(mx.uint16) if v.dtype == mx.bfloat16 else v
        out[k] = np.array(v)
    return out


def assert_same_bits(before: dict, after: dict) -> None:
    assert before.keys() == after.keys()
    for k in before:
        assert before[k].dtype == after[k].dtype, k
        assert np.array_equal(before[k], after[k]), k


TOKENS = mx.array([[5, 9, 33, 2, 17, 41, 8, 3, 12, 60]])


def calls_of(layer, run) -> int:
    """How many times ``run()`` calls ``layer`` (its class's ``__call__``
    counted for this instance only)."""
    calls = []
    original = type(layer).__call__
    type(layer).__call__ = lambda self, *a, **k: (
        calls.append(self) or original(self, *a, **k)
    )
    try:
        run()
    finally:
        type(layer).__call__ = original
    return sum(c is layer for c in calls)


def assert_exact_and_redone(model, config, mode, dtype: str, tokens, name: str):
    """Cast to ``dtype`` and quantized as ``mode`` (kind, bits, group, or
    None), the model is rewritten by ``name`` at both layers, bit-exactly on
    ``tokens``; revert and a second apply give the same bits."""
    model.set_dtype(getattr(mx, dtype))
    if mode is not None:
        kind, bits, group = mode
        model, _ = quantize_model(model, config, group, bits, mode=kind)
    reference = model(tokens)
    report = graphpatch.apply(model, [name], probe=tokens)
    assert len(report.rewritten()) == 2, [s.reason for s in report.skipped()]
    out = model(tokens)
    assert out.dtype == reference.dtype and mx.array_equal(out, reference)
    before = snapshot(model)
    graphpatch.revert(model)
    graphpatch.apply(model, [name], verify=False)
    assert_same_bits(before, snapshot(model))
