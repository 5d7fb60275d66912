"""What a user of a real checkpoint gains: decode tokens/s and prefill time
through mlx-lm's own ``stream_generate``, and the prefill of a runtime that
runs the whole prompt in one call and reads the last position (exo, custom
servers), unpatched against each pass and both, on the pretrained Gemma 3
270M (``graphpatch.testing.checkpoint``: 4/6-bit layers, 8-bit embedding, vocabulary
262,144).

mlx-lm's generate already evaluates the head on the last prompt token only
(its chunked prefill never evaluates the other logits), so last_token cannot
speed it up; a one-call prefill computes the head on every position unless
last_token is applied.

Every variant is loaded once; the rounds alternate them so that drift hits
all alike, and each figure is the median over the rounds. Greedy, so every
variant must produce the same tokens (checked).

    python benchmarks/real_checkpoint.py [--rounds 5] [--prompt-tokens 512]
        [--decode-tokens 64] [--model DIR]
"""

import argparse
import statistics
import time

import mlx.core as mx
import mlx_lm
from mlx_lm.models.cache import make_prompt_cache

import graphpatch
from graphpatch.passes import last_token
from graphpatch.testing import checkpoint

VARIANTS = [
    "unpatched",
    "fuse_glu",
    "fuse_qkv",
    "last_token",
    "fuse_glu,fuse_qkv,last_token",
]


def prompt(tokenizer, length: int) -> list[int]:
    words = "The quick brown fox jumps over the lazy dog while the cat sleeps. "
    ids = tokenizer.encode(words * (length // 8 + 1))
    return ids[:length]


def one_run(model, tokenizer, ids: list[int], decode: int) -> tuple:
    last = None
    tokens = []
    for response in mlx_lm.stream_generate(
        model, tokenizer, mx.array(ids), max_tokens=decode
    ):
        tokens.append(response.token)
        last = response
    prefill_seconds = len(ids) / last.prompt_tps
    return prefill_seconds, last.generation_tps, tokens


def one_call(model, ids: list[int]) -> float:
    start = time.perf_counter()
    with last_token.prefill():  # a runtime's one-call prefill, declared
        mx.eval(model(mx.array([ids]), cache=make_prompt_cache(model))[:, -1])
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--decode-tokens", type=int, default=16)
    parser.add_argument("--model", default=None)
    args = parser.parse_args()
    model_dir = args.model or checkpoint.model_dir()
    models = {}
    for name in VARIANTS:
        model, tokenizer = graphpatch.load(model_dir)
        if name != "unpatched":
            graphpatch.apply(model, name, model_dir=str(model_dir))
        models[name] = model
    ids = prompt(tokenizer, args.prompt_tokens)
    prefill = {name: [] for name in VARIANTS}
    decode = {name: [] for name in VARIANTS}
    whole = {name: [] for name in VARIANTS}
    texts = {}
    for name, model in models.items():
        texts[name] = one_run(model, tokenizer, ids, args.decode_tokens)[2]  # warm
    assert all(t == texts["unpatched"] for t in texts.values()), "tokens differ"
    for _ in range(args.rounds):
        for name, model in models.items():
            seconds, tps, _ = one_run(model, tokenizer, ids, args.decode_tokens)
            prefill[name].append(seconds)
            decode[name].append(tps)
            whole[name].append(one_call(model, ids))
    print(f"model {model_dir}, device {mx.default_device()}, mlx {mx.__version__}")
    print(
        f"prompt {len(ids)} tokens, decode {args.decode_tokens} tokens, "
        f"{args.rounds} interleaved rounds; same tokens from every variant"
    )
    figures = {
        "generate prefill s": (prefill, False),
        "decode tok/s": (decode, True),
        "one-call prefill s": (whole, False),
    }
    print(f"{'variant':<21}" + "".join(f"{title:>26}" for title in figures))
    for name in VARIANTS:
        cells = []
        for samples, higher_is_better in figures.values():
            value, base = (statistics.median(samples[n]) for n in (name, "unpatched"))
            gain = value / base if higher_is_better else base / value
            cells.append(f"{value:>14.2f} ({gain:.2f}x)")
        print(f"{name:<21}" + "".join(f"{c:>26}" for c in cells))


if __name__ == "__main__":
    main()
