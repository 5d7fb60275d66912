"""last_token: what a prefill costs with the head on all S positions, on the
last one only, and with no head at all (the limit).

Qwen2.5-0.5B widths (hidden 896, vocab 151936, tied head), affine 4-bit,
float32 activations, a few layers (the head's share shrinks as layers grow:
``--layers 24`` is the real depth). For each S: median seconds per forward
into an empty cache, declared a prefill (``last_token.prefill()``), whose
logits are evaluated, in interleaved rounds, the ratios, and the peak
memory above the weights. Then mlx-lm's own prefill (``generate_step`` to its
first token), which never evaluates the head on prompt chunks: there the pass
should change nothing, and the numbers say so.

    python benchmarks/last_token.py [--lengths 128,512,2048] [--layers N]
        [--config '{"hidden_size": 64, ...}']  (other widths than Qwen2.5-0.5B's)
"""

import argparse
import json

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.generate import generate_step
from mlx_lm.models.cache import make_prompt_cache

import graphpatch
from graphpatch.passes import last_token
from graphpatch.testing import zoo
from graphpatch.timing import interleaved_times

QWEN25_05B = {
    "model_type": "qwen2",
    "hidden_size": 896,
    "intermediate_size": 4864,
    "num_attention_heads": 14,
    "num_key_value_heads": 2,
    "vocab_size": 151936,
    "tie_word_embeddings": True,
    "rope_theta": 1e6,
    "max_position_embeddings": 32768,
}


def make_model(layers: int, widths: dict) -> nn.Module:
    config = zoo.config_for("qwen2", **widths, num_hidden_layers=layers)
    model = zoo.make_model(config)
    nn.quantize(model, group_size=64, bits=4)
    mx.eval(model.parameters())
    return model


def peak_above(weights: int, forward) -> float:
    mx.clear_cache()
    mx.reset_peak_memory()
    forward()
    return (mx.get_peak_memory() - weights) / 2**20


def one_call(model: nn.Module, tokens: mx.array) -> mx.array:
    """A one-call prefill into an empty cache, declared as last_token asks
    (an exo-style runtime's forward: it reads the last position only)."""
    with last_token.prefill():
        return model(tokens, cache=make_prompt_cache(model))


def forwards(full: nn.Module, last: nn.Module, tokens: mx.array) -> dict:
    return {
        "all": lambda: mx.eval(one_call(full, tokens)),
        "last": lambda: mx.eval(one_call(last, tokens)),
        "body": lambda: mx.eval(full.model(tokens, cache=make_prompt_cache(full))),
    }


def prefills(full: nn.Module, last: nn.Module, prompt: mx.array) -> dict:
    return {
        "all": lambda: next(generate_step(prompt, full, max_tokens=1)),
        "last": lambda: next(generate_step(prompt, last, max_tokens=1)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="128,512,2048", help="prompt lengths S")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--config", type=json.loads, help="widths over Qwen2.5's")
    args = parser.parse_args()
    widths = {**QWEN25_05B, **(args.config or {})}
    vocab = widths["vocab_size"]
    full = make_model(args.layers, widths)
    last = make_model(args.layers, widths)
    last.update(full.parameters())  # the same arrays: no second copy
    report = graphpatch.apply(last, ["last_token"])
    assert report.rewritten("last_token"), report.skipped()
    mx.clear_cache()
    weights = mx.get_active_memory()
    print(f"device: {mx.default_device()}, mlx {mx.__version__}, layers {args.layers}")
    print(
        f"{'S':>5} {'all ms':>8} {'last ms':>8} {'body ms':>8} {'all/last':>9} "
        f"{'last/body':>10} {'peak all':>9} {'peak last':>10} (MiB above weights)"
    )
    lengths = [int(n) for n in args.lengths.split(",")]
    for S in lengths:
        tokens = mx.random.randint(0, vocab, (1, S), key=mx.random.key(S))
        variants = forwards(full, last, tokens)
        t = interleaved_times(variants, rounds=args.rounds, target=0.2)
        peaks = [peak_above(weights, variants[k]) for k in ("all", "last")]
        print(
            f"{S:5d} {1e3 * t['all']:8.1f} {1e3 * t['last']:8.1f} "
            f"{1e3 * t['body']:8.1f} {t['all'] / t['last']:9.2f} "
            f"{t['last'] / t['body']:10.3f} {peaks[0]:9.0f} {peaks[1]:10.0f}",
            flush=True,
        )
    print(
        "mlx-lm generate_step prefill to the first token (head on chunks unevaluated):"
    )
    for S in lengths:
        prompt = mx.random.randint(0, vocab, (S,), key=mx.random.key(S))
        t = interleaved_times(
            prefills(full, last, prompt),
            rounds=args.rounds,
            target=0.2,
        )
        print(f"{S:5d} all/last {t['all'] / t['last']:.3f}", flush=True)


if __name__ == "__main__":
    main()
