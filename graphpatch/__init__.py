"""graphpatch: verified rewrite passes for loaded MLX language models."""

from graphpatch.contract import (
    GraphpatchError,
    NotAModelError,
    PassSpecError,
    VerificationError,
)
from graphpatch.manager import apply, resolve, revert
from graphpatch.passes import PASSES
from graphpatch.report import Report

__version__ = "0.1.0"

__all__ = [
    "PASSES",
    "GraphpatchError",
    "NotAModelError",
    "PassSpecError",
    "Report",
    "VerificationError",
    "apply",
    "resolve",
    "revert",
]
