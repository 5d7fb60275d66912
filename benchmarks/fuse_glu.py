"""Benchmark fuse_glu: unfused/fused time of one GLU block, measured in one run.

Each case builds one real mlx-lm MLP (llama ``MLP`` for dense, qwen3_moe's
``SwitchGLU`` for MoE), times the unfused module and then the same module
fused by graphpatch in interleaved rounds (medians), eager and under
``mx.compile``. A ratio above 1 means fused is faster. Runs unchanged on any
mlx backend; say which device a figure came from.

    python benchmarks/fuse_glu.py [--quick] [--kinds dense,moe] [--rounds N]
        [--dense '{"hidden": 2048, "intermediate": 8192}'] [--moe '{...}']
"""

import argparse
import json

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models import llama
from mlx_lm.models.switch_layers import SwitchGLU

import graphpatch
from graphpatch.timing import interleaved_times

MODES = {
    "float32": None,
    "affine4": {"group_size": 64, "bits": 4, "mode": "affine"},
    "mxfp4": {"group_size": 32, "bits": 4, "mode": "mxfp4"},
}


class Block(nn.Module):
    """One GLU site at the root, so graphpatch.apply can verify it."""

    def __init__(self, glu: nn.Module, experts: int, top_k: int):
        super().__init__()
        self.glu = glu
        self.experts, self.top_k = experts, top_k

    def __call__(self, x: mx.array) -> mx.array:
        if not self.experts:
            return self.glu(x)
        scores = x[..., : self.experts]  # a fixed routing, the same both ways
        indices = mx.argpartition(-scores, self.top_k - 1, axis=-1)[..., : self.top_k]
        return self.glu(x, indices).sum(axis=-2)


def make_block(kind: str, mode: str, dims: dict) -> Block:
    mx.random.seed(0)
    if kind == "dense":
        args = llama.ModelArgs(
            model_type="llama",
            hidden_size=dims["hidden"],
            num_hidden_layers=1,
            intermediate_size=dims["intermediate"],
            num_attention_heads=8,
            rms_norm_eps=1e-5,
            vocab_size=32,
        )
        block = Block(llama.MLP(args), 0, 0)
    else:
        glu = SwitchGLU(dims["hidden"], dims["intermediate"], dims["experts"])
        block = Block(glu, dims["experts"], dims["top_k"])
    if MODES[mode]:
        nn.quantize(block, **MODES[mode])
    mx.eval(block.parameters())
    return block


def fuse(block: Block) -> None:
    report = graphpatch.apply(block, ["fuse_glu"], verify=False)
    assert report.rewritten(), [s.reason for s in report.skipped()]
    mx.eval(block.parameters())


def measure(kind: str, mode: str, dims: dict, shape: tuple, rounds: int) -> dict:
    block = make_block(kind, mode, dims)
    x = mx.random.normal((*shape, dims["hidden"]), key=mx.random.key(1))
    reference = block(x)
    mx.eval(reference)
    unfused_children = {"gate_proj": block.glu.gate_proj, "up_proj": block.glu.up_proj}
    fuse(block)
    fused_children = {k: block.glu[k] for k in ("gate_proj", "up_proj")}
    assert mx.array_equal(block(x), reference)

    def run(children, compiled):
        forward = mx.compile(block) if compiled else block

        def once():
            block.glu.update_modules(children)
            mx.eval(forward(x))

        return once

    results = {}
    for compiled in (False, True):
        times = interleaved_times(
            {
                "unfused": run(unfused_children, compiled),
                "fused": run(fused_children, compiled),
            },
            rounds=rounds,
            target=0.02,
        )
        name = "compiled" if compiled else "eager"
        results[name] = (times["unfused"] / times["fused"], times["fused"])
    return results


def memory(kind: str, mode: str, dims: dict) -> str:
    """Active memory of the block before and after fusion, and the peak of
    the fusion itself, in MiB."""
    block = make_block(kind, mode, dims)
    mx.clear_cache()
    before = mx.get_active_memory()
    mx.reset_peak_memory()
    fuse(block)
    mx.clear_cache()
    after, peak = mx.get_active_memory(), mx.get_peak_memory()
    del block
    mib = 1024 * 1024
    return (
        f"memory {kind} {mode}: unfused {before / mib:.1f} MiB, fused "
        f"{after / mib:.1f} MiB, peak while fusing {peak / mib:.1f} MiB"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller widths, fewer")
    parser.add_argument("--kinds", default="dense,moe", help="dense, moe or both")
    parser.add_argument("--rounds", type=int, help="default: 3 quick, 7 full")
    parser.add_argument("--dense", type=json.loads, help="dense widths, as JSON")
    parser.add_argument("--moe", type=json.loads, help="MoE widths, as JSON")
    args = parser.parse_args()
    rounds = args.rounds or (3 if args.quick else 7)
    dense = {"hidden": 2048, "intermediate": 8192}
    moe = {"hidden": 2048, "intermediate": 768, "experts": 64, "top_k": 8}
    if args.quick:
        dense = {"hidden": 1024, "intermediate": 4096}
        moe = {**moe, "hidden": 1024, "intermediate": 384}
    dense, moe = {**dense, **(args.dense or {})}, {**moe, **(args.moe or {})}
    shapes = {"decode": (1, 1), "decode B=4": (4, 1), "decode B=8": (8, 1)}
    shapes["prefill S=256"] = (1, 256)
    print(f"device: {mx.default_device()}, mlx {mx.__version__}")
    print(f"dense {dense}, moe {moe}; ratio = unfused/fused, >1 is a fused win")
    print(f"{'case':44} {'eager':>8} {'compiled':>9} {'fused ms':>9}")
    kinds = {"dense": dense, "moe": moe}
    for kind, dims in ((k, kinds[k]) for k in args.kinds.split(",")):
        for mode in MODES:
            print(memory(kind, mode, dims), flush=True)
            for label, shape in shapes.items():
                r = measure(kind, mode, dims, shape, rounds)
                case = f"{kind} {mode} {label}"
                fused_ms = 1e3 * r["eager"][1]
                print(
                    f"{case:44} {r['eager'][0]:8.3f} {r['compiled'][0]:9.3f} "
                    f"{fused_ms:9.3f}",
                    flush=True,
                )


if __name__ == "__main__":
    main()
