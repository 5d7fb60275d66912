"""graphpatch: verified rewrite passes for loaded MLX language models."""

import importlib
from typing import TYPE_CHECKING

from graphpatch._version import __version__

if TYPE_CHECKING:
    from graphpatch.checks import LoadError
    from graphpatch.contract import (
        GraphpatchError,
        NotAModelError,
        PassSpecError,
        VerificationError,
    )
    from graphpatch.manager import apply, resolve, revert
    from graphpatch.opening import load
    from graphpatch.passes import PASSES
    from graphpatch.report import Report
    from graphpatch.saving import SaveError, save

# Imported when first used (they import mlx and mlx-lm): the command, whose
# script imports this package first, can then catch a Ctrl-C during them.
_WHERE = {
    "LoadError": "checks",
    "GraphpatchError": "contract",
    "NotAModelError": "contract",
    "PassSpecError": "contract",
    "VerificationError": "contract",
    "apply": "manager",
    "resolve": "manager",
    "revert": "manager",
    "load": "opening",
    "PASSES": "passes",
    "Report": "report",
    "SaveError": "saving",
    "save": "saving",
}

__all__ = ["__version__", *_WHERE]


def __getattr__(name: str):
    if name in _WHERE:
        return getattr(importlib.import_module(f"graphpatch.{_WHERE[name]}"), name)
    try:  # a submodule: graphpatch.passes.last_token.prefill() after import graphpatch
        return importlib.import_module(f"graphpatch.{name}")
    except ModuleNotFoundError:
        raise AttributeError(f"module 'graphpatch' has no attribute {name!r}") from None
