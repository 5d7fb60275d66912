"""Benchmark fuse_qkv: unfused/fused time of one attention block's q/k/v
projections in its own ``__call__``, measured in one run.

Each case builds one real mlx-lm attention module (llama ``Attention``, GQA),
times it unfused and then fused by graphpatch in interleaved rounds (medians)
on decode (B=1, L=1, B=8, L=1) and prefill (B=1, L=256) shapes, eager and
under ``mx.compile``. A ratio above 1 means fused is faster. Runs unchanged
on any mlx backend; say which device a figure came from.

    python benchmarks/fuse_qkv.py [--hidden 2048] [--heads 32,8] [--rounds N]
"""

import argparse

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models import llama

import graphpatch
from graphpatch.timing import interleaved_times

MODES = {
    "float32": None,
    "affine4": {"group_size": 64, "bits": 4, "mode": "affine"},
    "mxfp4": {"group_size": 32, "bits": 4, "mode": "mxfp4"},
}
SHAPES = {"decode B=1": (1, 1), "decode B=8": (8, 1), "prefill S=256": (1, 256)}


class Block(nn.Module):
    """One attention site; the benchmark checks the fused outputs itself."""

    def __init__(self, args: llama.ModelArgs):
        super().__init__()
        self.attention = llama.Attention(args)

    def __call__(self, x: mx.array) -> mx.array:
        return self.attention(x, mask="causal" if x.shape[1] > 1 else None)


def make_block(mode: str, hidden: int, heads: int, kv_heads: int) -> Block:
    mx.random.seed(0)
    args = llama.ModelArgs(
        model_type="llama",
        hidden_size=hidden,
        num_hidden_layers=1,
        intermediate_size=hidden,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        rms_norm_eps=1e-5,
        vocab_size=32,
    )
    block = Block(args)
    if MODES[mode]:
        nn.quantize(block, **MODES[mode])
    mx.eval(block.parameters())
    return block


def ratios(mode: str, args) -> dict[str, tuple[float, float]]:
    unfused = make_block(mode, args.hidden, *args.heads)
    fused = make_block(mode, args.hidden, *args.heads)
    report = graphpatch.apply(fused, ["fuse_qkv"], verify=False)
    assert len(report.rewritten()) == 1, report.skipped()
    out = {}
    for name, (B, L) in SHAPES.items():
        x = mx.random.normal((B, L, args.hidden), key=mx.random.key(1))
        assert mx.array_equal(unfused(x), fused(x))  # bit for bit
        variants = {}
        for label, block in (("unfused", unfused), ("fused", fused)):
            compiled = mx.compile(block)
            variants[label] = lambda b=block, x=x: mx.eval(b(x))
            variants[f"{label} compiled"] = lambda c=compiled, x=x: mx.eval(c(x))
        t = interleaved_times(variants, rounds=args.rounds)
        eager = t["unfused"] / t["fused"]
        out[name] = (eager, t["unfused compiled"] / t["fused compiled"])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--heads", default="32,8", help="query heads,kv heads")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    args.heads = [int(n) for n in args.heads.split(",")]
    print(
        f"device {mx.default_device()}, mlx {mx.__version__}; hidden {args.hidden}, "
        f"heads {args.heads[0]}/{args.heads[1]}; unfused/fused, eager / compiled"
    )
    print(f"{'case':<10}" + "".join(f"{name:>20}" for name in SHAPES))
    for mode in MODES:
        cells = [f"{e:.3f} / {c:.3f}" for e, c in ratios(mode, args).values()]
        print(f"{mode:<10}" + "".join(f"{c:>20}" for c in cells))


if __name__ == "__main__":
    main()
