"""graphpatch: verified rewrite passes for loaded MLX language models."""

from graphpatch._version import __version__
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

__all__ = [
    "__version__",
    "PASSES",
    "GraphpatchError",
    "LoadError",
    "NotAModelError",
    "PassSpecError",
    "Report",
    "SaveError",
    "VerificationError",
    "apply",
    "load",
    "resolve",
    "revert",
    "save",
]
