"""Interleaved timing: the one way graphpatch compares two variants.

Rounds alternate A and B so that drift (thermal, other load) hits both alike;
the ratio is of medians. Used by the tune option and by ``benchmarks/``.
"""

import statistics
import time
from collections.abc import Callable


def _calibrate(fn: Callable[[], None], target: float) -> int:
    start = time.perf_counter()
    fn()
    once = max(time.perf_counter() - start, 1e-7)
    return max(1, int(target / once))


def _timed(fn: Callable[[], None], repeat: int) -> float:
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - start) / repeat


def interleaved_times(
    variants: dict[str, Callable[[], None]], rounds: int = 7, target: float = 0.005
) -> dict[str, float]:
    """Median seconds per call of each variant, measured in alternating rounds.

    Args:
        variants: name -> a function that runs and evaluates one call.
        rounds: how many alternating rounds to take the median over.
        target: seconds one round of one variant should last (sets repeats).
    """
    for fn in variants.values():
        fn()  # warm up: compile, allocate
    repeats = {name: _calibrate(fn, target) for name, fn in variants.items()}
    samples: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(rounds):
        for name, fn in variants.items():
            samples[name].append(_timed(fn, repeats[name]))
    return {name: statistics.median(s) for name, s in samples.items()}


def interleaved_ratio(a: Callable[[], None], b: Callable[[], None], **kw) -> float:
    """time(a) / time(b): above 1 means b is faster."""
    times = interleaved_times({"a": a, "b": b}, **kw)
    return times["a"] / times["b"]
