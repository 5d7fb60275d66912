"""graphpatch: verified rewrite passes for loaded MLX language models."""

from graphpatch.contract import (
    GraphpatchError,
    NotAModelError,
    PassSpecError,
    VerificationError,
)
from graphpatch.loading import LoadError, load
from graphpatch.manager import apply, resolve, revert
from graphpatch.passes import PASSES
from graphpatch.report import Report
from graphpatch.saving import SaveError, save

__version__ = "0.1.0"

__all__ = [
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
