"""The mlx internals the contract's one swap relies on (``rebuilt``, ``mark``,
``replace_at``), pinned so that an mlx upgrade that changes them fails here
first and plainly, not as a wrong rewrite somewhere in a pass."""

import os
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from graphpatch.contract import (
    mark,
    mark_at,
    module_at,
    rebuilt,
    replace_at,
    unmark,
    unmark_at,
)


class Doubled:
    """A marker with a setting, as the passes write them."""

    factor: int = 2

    def __call__(self, x: mx.array) -> mx.array:
        return super().__call__(x) * self.factor  # type: ignore[misc]


def _model() -> nn.Module:
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.QuantizedLinear(64, 32, bias=True, group_size=32, bits=4)
            self.layers = [nn.Linear(4, 4), nn.Linear(4, 4)]

    return Block()


def test_a_module_is_a_dict_of_its_children_and_arrays_and_vars_hold_settings():
    model = _model()
    assert isinstance(model, dict)
    assert dict.__contains__(model, "proj") and dict.__contains__(model, "layers")
    assert {"weight", "scales", "biases", "bias"} <= set(dict.keys(model.proj))
    assert {"group_size", "bits", "mode"} <= set(vars(model.proj))
    assert isinstance(model.proj._no_grad, set) and "_training" in vars(model.proj)


def test_rebuilt_holds_the_same_arrays_settings_and_state_without_init():
    model = _model()
    model.proj.freeze(keys=["bias"])  # a setting in _no_grad
    model.proj.train(False)
    copy = rebuilt(model.proj)
    assert type(copy) is nn.QuantizedLinear and copy is not model.proj
    ours = dict(tree_flatten(model.proj.parameters()))
    theirs = dict(tree_flatten(copy.parameters()))
    assert ours.keys() == theirs.keys()
    assert all(ours[k] is theirs[k] for k in ours)  # shared, not copied
    assert (copy.group_size, copy.bits, copy.mode) == (32, 4, "affine")
    frozen = set(model.proj._no_grad)
    assert copy.training is False and "bias" in frozen and copy._no_grad == frozen
    copy._no_grad.add("extra")  # its own set: the original is untouched
    assert model.proj._no_grad == frozen
    x = mx.random.normal((2, 64))
    assert mx.array_equal(copy(x), model.proj(x))


def test_mark_runs_the_marker_first_and_unmark_drops_its_settings():
    layer = nn.Linear(4, 4)
    marked = mark(layer, Doubled, factor=3)
    assert isinstance(marked, Doubled) and isinstance(marked, nn.Linear)
    assert type(marked).__mro__[1:3] == (Doubled, nn.Linear)
    x = mx.ones((1, 4))
    assert mx.array_equal(marked(x), layer(x) * 3)
    assert sorted(k for k, _ in tree_flatten(marked.parameters())) == ["bias", "weight"]
    original = unmark(marked)
    assert type(original) is nn.Linear and "factor" not in vars(original)
    assert mx.array_equal(original(x), layer(x))


def test_replace_at_adds_swaps_and_removes_in_modules_and_lists():
    model = _model()
    first = model.layers[0]
    new = nn.Linear(4, 4)
    assert replace_at(model, "layers.0", new) is first
    assert model.layers[0] is new and module_at(model, "layers.0") is new
    assert replace_at(model, "extra", nn.Identity()) is None  # added
    assert isinstance(model.extra, nn.Identity)
    assert isinstance(replace_at(model, "extra", None), nn.Identity)  # removed
    assert "extra" not in model
    names = [k for k, _ in tree_flatten(model.parameters())]
    assert "layers.0.weight" in names and not any(k.startswith("extra") for k in names)


def test_mark_at_and_unmark_at_swap_in_place_and_back():
    model = _model()
    before = model.layers[1]
    marked = mark_at(model, "layers.1", Doubled)
    assert model.layers[1] is marked and isinstance(marked, Doubled)
    restored = unmark_at(model, "layers.1")
    assert model.layers[1] is restored and type(restored) is nn.Linear
    assert restored.weight is before.weight


WRONG_HOOK = """
import mlx.nn as nn
from graphpatch.contract import Options, Pass, Proof, Site, Context

def find(model: nn.Module, options: Options, context: Context) -> list[Site]:
    return []

def undo(model: nn.Module) -> None:  # the path is missing
    pass

PASS = Pass(
    name="wrong",
    summary="a hook with the wrong signature",
    find=find,
    why_not=lambda model, site, options, context: None,
    rewrite=lambda model, site, options, context: None,
    undo=undo,
    applied=lambda model: [],
    proof=Proof(lambda model, site, options, context: lambda: []),
)
"""


def test_mypy_refuses_a_hook_with_the_wrong_signature(tmp_path):
    """The contract is one a type checker holds (make test runs mypy)."""
    import subprocess
    import sys

    (tmp_path / "wrong_pass.py").write_text(WRONG_HOOK)
    root = str(Path(__file__).parents[1])  # an editable install hides the package
    done = subprocess.run(
        [sys.executable, "-m", "mypy", "wrong_pass.py"]
        # the project's settings and cache (make test's own mypy run fills it)
        + [
            "--config-file",
            f"{root}/pyproject.toml",
            "--cache-dir",
            f"{root}/.mypy_cache",
        ],
        cwd=tmp_path,
        env={**os.environ, "MYPYPATH": root},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 1, done.stdout + done.stderr
    assert 'Argument "undo" to "Pass" has incompatible type' in done.stdout
