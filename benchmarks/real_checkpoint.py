"""What a user of a real checkpoint gains, per token: decode steps of every
variant interleaved token by token, and the prefill, unpatched against each
pass and their combinations, on a pretrained model
(``graphpatch.testing.checkpoint``): Gemma 3 270M (4/6-bit layers, 8-bit
embedding, vocabulary 262,144) or SmolLM2-135M-Instruct (the GGUF's own
Q4_1 as affine 4-bit, group 32; 8-bit embedding; vocabulary 49,152).

Decode: every variant is loaded once and prefilled with the same prompt into
its own cache; then, for each decode step, every variant's one-token step
runs in an order that rotates by one each step, each step timed with its
``mx.eval``. A token's ratio is the unpatched step's time over the
variant's (above 1: the variant is faster); a variant's figure is the median
over all timed tokens, its spread the 10th-90th percentile of the per-round
medians (a round is ``--decode-tokens`` consecutive tokens). Greedy, so
every variant must decode the same tokens (checked).

Prefill, in rounds that rotate the variants the same way (medians): mlx-lm's
own ``stream_generate`` (its chunked prefill never evaluates the prompt's
logits, so last_token cannot speed it up), and a one-call prefill as exo and
custom servers run it (the head over every position unless last_token).

mx.compile of the decode step is not measured: mlx-lm's KVCache keeps its
offset as a Python int, which a compiled step would freeze.

    python benchmarks/real_checkpoint.py [--model gemma|smollm2|DIR]
        [--rounds 8] [--decode-tokens 32] [--prompt-tokens 64]
        [--prefill-rounds 2]
"""

import argparse
import os
import platform
import statistics
import time
from importlib.metadata import version
from pathlib import Path

import mlx.core as mx
import mlx_lm
from mlx_lm.models.cache import make_prompt_cache

import graphpatch
from graphpatch.passes import last_token
from graphpatch.testing import checkpoint

VARIANTS = {
    "unpatched": [],
    "fuse_glu": ["fuse_glu"],
    "fuse_qkv": ["fuse_qkv"],
    "fuse_glu+fuse_qkv": ["fuse_glu", "fuse_qkv"],
    "last_token": ["last_token"],
    "all three": ["fuse_glu", "fuse_qkv", "last_token"],
}
WARMUP = 2  # decode steps per variant before the timed ones


def prompt(tokenizer, length: int) -> list[int]:
    words = "The quick brown fox jumps over the lazy dog while the cat sleeps. "
    return tokenizer.encode(words * (length // 8 + 1))[:length]


def rotated(names: list[str], step: int) -> list[str]:
    start = step % len(names)
    return names[start:] + names[:start]


def one_call(model, ids: list[int]) -> tuple[float, list, mx.array]:
    """Seconds of a one-call prefill, its cache and its greedy next token."""
    cache = make_prompt_cache(model)
    start = time.perf_counter()
    with last_token.prefill():  # a runtime's one-call prefill, declared
        token = model(mx.array([ids]), cache=cache)[:, -1].argmax(-1, keepdims=True)
        mx.eval(token)
    return time.perf_counter() - start, cache, token


def generate_prefill(model, tokenizer, ids: list[int]) -> float:
    *_, last = mlx_lm.stream_generate(model, tokenizer, mx.array(ids), max_tokens=1)
    return len(ids) / last.prompt_tps


def step(model, cache, token: mx.array) -> tuple[float, mx.array]:
    start = time.perf_counter()
    token = model(token, cache=cache)[:, -1].argmax(-1, keepdims=True)
    mx.eval(token)
    return time.perf_counter() - start, token


def decode(models: dict, ids: list[int], rounds: int, per_round: int) -> dict:
    """Per variant, the seconds of each timed token's step, in order."""
    state = {name: one_call(model, ids)[1:] for name, model in models.items()}
    seconds: dict[str, list[float]] = {name: [] for name in models}
    tokens: dict[str, list[int]] = {name: [] for name in models}
    for i in range(WARMUP + rounds * per_round):
        for name in rotated(list(models), i):
            cache, token = state[name]
            took, token = step(models[name], cache, token)
            state[name] = cache, token
            tokens[name].append(token.item())
            if i >= WARMUP:
                seconds[name].append(took)
    assert all(t == tokens["unpatched"] for t in tokens.values()), "tokens differ"
    return seconds


def decode_figures(seconds: dict, per_round: int) -> dict[str, tuple]:
    """Per variant: median ms per token, median speedup, (p10, p90) of the
    per-round median speedups."""
    figures = {}
    for name, times in seconds.items():
        ratios = [b / t for b, t in zip(seconds["unpatched"], times, strict=True)]
        rounds = [
            statistics.median(ratios[i : i + per_round])
            for i in range(0, len(ratios), per_round)
        ]
        # one round (device.sh --quick) has no spread to give
        tenths = (
            statistics.quantiles(rounds, n=10, method="inclusive")
            if len(rounds) > 1
            else rounds
        )
        ms = statistics.median(times) * 1000
        figures[name] = (ms, statistics.median(ratios), (tenths[0], tenths[-1]))
    return figures


def prefill(models: dict, tokenizer, ids: list[int], rounds: int) -> dict:
    """Per variant, the seconds of (generate's prefill, a one-call prefill)."""
    seconds: dict[str, tuple[list, list]] = {name: ([], []) for name in models}
    for i in range(rounds):
        for name in rotated(list(models), i):
            seconds[name][0].append(generate_prefill(models[name], tokenizer, ids))
            seconds[name][1].append(one_call(models[name], ids)[0])
    return seconds


def machine() -> str:
    names = []
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            names = [line.split(":")[1].strip() for line in f if "model name" in line]
    return f"{names[0] if names else platform.machine()}, {os.cpu_count()} cores"


def load_average() -> str:
    """Other work on the machine shows here: the figures' context."""
    return "/".join(f"{n:.1f}" for n in os.getloadavg())


def load(model_dir: Path) -> tuple[dict, object]:
    models = {}
    for name, passes in VARIANTS.items():
        model, tokenizer = graphpatch.load(model_dir)
        if passes:
            graphpatch.apply(model, passes, model_dir=str(model_dir))
        models[name] = model
    return models, tokenizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="gemma", help="gemma, smollm2 or a DIR")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--decode-tokens", type=int, default=32, help="per round")
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--prefill-rounds", type=int, default=2)
    args = parser.parse_args()
    if args.model in checkpoint.CHECKPOINTS:
        model_dir = checkpoint.model_dir(name=args.model)
    else:
        model_dir = Path(args.model)
    models, tokenizer = load(model_dir)
    ids = prompt(tokenizer, args.prompt_tokens)
    started = f"{time.strftime('%Y-%m-%d %H:%M')}, load average {load_average()}"
    seconds = decode(models, ids, args.rounds, args.decode_tokens)
    decoded = decode_figures(seconds, args.decode_tokens)
    prefilled = prefill(models, tokenizer, ids, args.prefill_rounds)

    print(
        f"{model_dir.name}: device {mx.default_device()}, mlx {mx.__version__}, "
        f"mlx-lm {version('mlx-lm')}"
    )
    print(f"{machine()}; start {started}; end load average {load_average()}")
    print(
        f"decode after a {len(ids)}-token prompt: {args.rounds} rounds of "
        f"{args.decode_tokens} tokens, every token's step timed for every "
        "variant in rotating order; speedup = unpatched step / variant step "
        "(median over tokens; p10-p90 of the per-round medians); "
        "same tokens from every variant"
    )
    print(f"{'variant':<19}{'ms/token':>10}{'speedup':>9}   p10-p90")
    for name, (ms, ratio, (low, high)) in decoded.items():
        print(f"{name:<19}{ms:>10.1f}{ratio:>9.3f}   {low:.3f}-{high:.3f}")
    if args.prefill_rounds:
        print(
            f"prefill of {len(ids)} tokens, {args.prefill_rounds} rounds "
            "(medians; speedup against unpatched)"
        )
        print(f"{'variant':<19}{'generate s':>12}{'x':>7}{'one call s':>12}{'x':>7}")
        base = [statistics.median(s) for s in prefilled["unpatched"]]
        for name, samples in prefilled.items():
            medians = [statistics.median(s) for s in samples]
            cells = "".join(
                f"{m:>12.2f}{b / m:>7.2f}" for m, b in zip(medians, base, strict=True)
            )
            print(f"{name:<19}{cells}")


if __name__ == "__main__":
    main()
