"""Equivalence checks: the tolerance table, output comparison, model probes.

One table of tolerances per dtype lives here and nowhere else. An error is the
max absolute difference, judged against ``atol + rtol * max|reference|`` so
that logits of any scale are held to the same relative standard.
"""

import math
from dataclasses import dataclass, replace

import mlx.core as mx
import mlx.nn as nn

# dtype -> (atol, rtol). float32 is tight: the fusions reorder no reductions,
# so any real error is far above this. Half types round each output element
# once more than float32 and get the looser bound. A pass that does reorder
# sums (shard's all_sums) is checked by ``reordered``'s written rule.
TOLERANCE = {
    mx.float32: (1e-5, 1e-5),
    mx.float16: (2e-3, 2e-3),
    mx.bfloat16: (1.6e-2, 1e-2),
}

# Fixed token ids for the model-level probe: two rows of 12 ids under 64, so
# any vocabulary fits and both batch and sequence axes are exercised.
PROBE_TOKENS = [
    [3, 17, 42, 5, 60, 7, 11, 2, 33, 25, 8, 51],
    [9, 1, 28, 46, 13, 4, 57, 20, 6, 39, 15, 30],
]


@dataclass
class Comparison:
    max_error: float
    tolerance: float
    top1: float  # fraction of rows whose argmax agrees
    dtype: str = "float32"  # what the outputs were computed in (the tolerance's)
    scale: float = 0.0  # max |reference| over its finite values
    every_top1: bool = False  # ok also needs every row's argmax to agree

    @property
    def ok(self) -> bool:
        within = self.max_error <= self.tolerance
        return within and (not self.every_top1 or self.top1 == 1.0)


def tolerance_for(dtype: mx.Dtype, scale: float) -> float:
    atol, rtol = TOLERANCE.get(dtype, TOLERANCE[mx.float32])
    return atol + rtol * scale


def compare(reference: list[mx.array], actual: list[mx.array]) -> Comparison:
    """Max abs error and top-1 agreement of two lists of same-shaped outputs."""
    if len(reference) != len(actual):
        raise ValueError(f"{len(actual)} outputs where {len(reference)} expected")
    errors, scales, agree, rows = [], [], 0, 0
    dtype = mx.float32
    for ref, out in zip(reference, actual, strict=True):
        if ref.shape != out.shape:
            raise ValueError(f"shape {tuple(out.shape)}, expected {tuple(ref.shape)}")
        dtype = ref.dtype
        ref32, out32 = ref.astype(mx.float32), out.astype(mx.float32)
        # A token masked in both (-inf, phi3small's) is no error. Only finite
        # values scale the tolerance: an infinite one would pass anything.
        masked = mx.isinf(ref32) & (ref32 == out32)
        errors.append(mx.max(mx.where(masked, 0, mx.abs(ref32 - out32))).item())
        finite = mx.isfinite(ref32)
        scales.append(mx.max(mx.where(finite, mx.abs(ref32), 0)).item())
        if ref.ndim >= 2:
            same = mx.argmax(ref32, axis=-1) == mx.argmax(out32, axis=-1)
            agree += mx.sum(same).item()
            rows += same.size
    top1 = agree / rows if rows else 1.0
    max_error = max(errors, default=0.0)
    scale = max(scales, default=0.0)
    tolerance = tolerance_for(dtype, scale)
    return Comparison(max_error, tolerance, top1, dtype_name(dtype), scale)


def reordered(cmp: Comparison, held_in: list[str]) -> Comparison:
    """The model check of a pass whose sites reorder sums (tensor
    parallelism: each rank sums its part, an all_sum adds the parts), one
    sum a site, each result next held in a dtype of ``held_in``.

    The rule: each such site was proven within its own dtype's tolerance, but
    its outputs round otherwise than the original's, and the hidden state
    they are added to may hold them in a less precise dtype than the site's
    own (Gemma's float16 residual under float32 norms and logits), where one
    changed rounding is a step of that dtype. So the logits are held to the
    tolerance of the least precise of ``held_in`` at the logits' scale, times
    the square root of the number of sums (independent roundings add like a
    random walk), and every row's top-1 must agree. A wrong split moves the
    logits by their own scale and is caught by its site check first."""
    if not held_in:
        return cmp
    loosest = _loosest([cmp.dtype, *held_in])
    widened = math.sqrt(len(held_in)) * tolerance_for(loosest, cmp.scale)
    return replace(cmp, tolerance=max(cmp.tolerance, widened), every_top1=True)


def reordered_rule(held_in: list[str]) -> str:
    """``reordered``'s rule in words, for the report."""
    n, loosest = len(held_in), dtype_name(_loosest(held_in))
    return f"{n} reordered sums: sqrt({n}) x {loosest}'s tolerance, every top-1"


def _loosest(names: list[str]) -> mx.Dtype:
    # a user's pass may name no dtype (True): it then widens by nothing
    dtypes = [getattr(mx, n, None) if isinstance(n, str) else None for n in names]
    known = [d for d in dtypes if d in TOLERANCE] or [mx.float32]
    return max(known, key=lambda d: TOLERANCE[d][1])


def logits_dtype(model: nn.Module) -> mx.Dtype:
    """The dtype the model computes its logits in, read from a forward that
    is built but never evaluated (a lazy model stays lazy). It is the one
    the model-level check holds to, whatever most parameters are stored in:
    float32 norms over float16 scales make a float32 model."""
    return model(mx.array(PROBE_TOKENS)[:1, :2]).dtype


def dtype_name(dtype: mx.Dtype) -> str:
    return str(dtype).removeprefix("mlx.core.")


def probe_tokens(probe: mx.array | list | None) -> mx.array:
    tokens = mx.array(PROBE_TOKENS if probe is None else probe)
    if tokens.ndim == 1:
        tokens = tokens[None]
    if tokens.ndim != 2 or not mx.issubdtype(tokens.dtype, mx.integer):
        raise ValueError("probe must be token ids of shape (B, S) or (S,)")
    return tokens


def last_logits(model: nn.Module, tokens: mx.array, keep: int = 1) -> mx.array:
    """The logits of the last ``keep`` positions, evaluated, nothing else kept."""
    logits = model(tokens)[:, -keep:, :]
    mx.eval(logits)
    return logits
