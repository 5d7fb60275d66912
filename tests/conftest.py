"""Shared fixtures: real zoo model directories, built once per test session.
Helpers that are not fixtures live in helpers.py."""

import os
import subprocess
from pathlib import Path

import mlx_lm
import pytest

from graphpatch.testing import checkpoint, zoo


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
def gemma() -> Path:
    """The real pretrained checkpoint's directory (Gemma 3 270M), converted
    once into the user's cache; skipped, saying why, where it cannot be had."""
    try:
        return checkpoint.model_dir()
    except checkpoint.CheckpointUnavailable as e:
        pytest.skip(f"no pretrained checkpoint: {e}")


@pytest.fixture(scope="session")
def load_zoo(zoo_dir):
    """``load_zoo(name, **build_kwargs) -> (model, tokenizer)`` via mlx_lm.load."""

    def load(name: str, **kwargs):
        return mlx_lm.load(str(zoo_dir(name, **kwargs)))

    return load


@pytest.fixture
def small_fs(tmp_path):
    """``small_fs(options) -> Path``: a tmpfs of its own (needs root)."""
    mounted = []

    def mount(options: str) -> Path:
        point = tmp_path / f"fs{len(mounted)}"
        point.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", point])
        if done.returncode != 0:
            pytest.skip("cannot mount a tmpfs here (needs root)")
        mounted.append(point)
        return point

    yield mount
    for point in mounted:
        subprocess.run(["umount", point], check=True)


@pytest.fixture
def fresh_user_passes(monkeypatch):
    """Users' passes are known for the rest of a process: not past a test."""
    from graphpatch import plan

    monkeypatch.setattr(plan, "_users", {})
    monkeypatch.setattr(plan, "_replaced", [])
