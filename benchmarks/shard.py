"""shard: bytes and peak per rank, collectives per layer and decode step time
per rank of a 2-rank tensor-parallel MoE, for shard, shard:moe_only and
shard:experts against the unsharded model (every rank holding all of it).

Qwen3-MoE-like widths (hidden 1024, 16 heads over 4 kv heads, 32 experts of
512, top 4), affine 4-bit, float32 activations, a few layers. Starts 2 ranks
of an MLX ring group on localhost (graphpatch.testing.ring); each rank loads
each variant lazily, applies it unverified and evaluates one array at a time
(``materialize``), then decodes greedily. On one 2-core machine the two
ranks share the cores and wait for each other at every all_sum, so the step
times are noise about what a cluster would see; bytes, peaks and collectives
are what the pass changes. Then the seed's scale on paper: a 2-node 400B-class
MoE's bytes per rank and collective bytes per token.

With ``--vs-mlx-lm``: every architecture whose mlx-lm module has its own
``Model.shard()``, from its small config, sharded on 2 ranks by shard and by
mlx-lm: the largest difference of their logits and each one's bytes per rank.

    python benchmarks/shard.py [--layers N] [--steps N] [--vs-mlx-lm]
"""

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import mlx.core as mx

MOE = {
    "hidden_size": 1024,
    "num_attention_heads": 16,
    "num_key_value_heads": 4,
    "head_dim": 64,
    "intermediate_size": 2048,
    "moe_intermediate_size": 512,
    "num_experts": 32,
    "num_experts_per_tok": 4,
    "decoder_sparse_step": 1,
}
VARIANTS = {
    "unsharded": None,
    "shard": "shard",
    "moe_only": "shard:moe_only",
    "experts": "shard:experts",
}


def collectives(model) -> int:
    """The all_sums one forward runs: sharded-to-all layers, summed blocks."""
    from mlx.nn.layers.distributed import (
        QuantizedShardedToAllLinear,
        ShardedToAllLinear,
    )

    from graphpatch.passes.shard import SummedSharded

    kinds = (ShardedToAllLinear, QuantizedShardedToAllLinear, SummedSharded)
    return sum(isinstance(m, kinds) for _, m in model.named_modules())


def rank_main(model_dir: str, steps: int) -> None:
    import mlx_lm
    from mlx.utils import tree_flatten
    from mlx_lm.models.cache import make_prompt_cache

    import graphpatch
    from graphpatch.passes.shard import materialize

    group = mx.distributed.init(backend="ring", strict=True)
    prompt = mx.array([[3, 17, 42, 5, 60, 7, 11, 2] * 4])
    result: dict = {"rank": group.rank()}
    for name, spec in VARIANTS.items():
        mx.clear_cache()
        base = mx.get_active_memory()
        mx.reset_peak_memory()
        model, _ = mlx_lm.load(model_dir, lazy=True)
        if spec:
            graphpatch.apply(model, [spec], verify=False)
        materialize(model)
        peak = mx.get_peak_memory() - base
        held = sum(v.nbytes for _, v in tree_flatten(model.parameters()))
        cache = make_prompt_cache(model)
        token = mx.argmax(model(prompt, cache=cache)[:, -1], -1)
        walls, tokens = [], []
        for _ in range(steps):
            start = time.perf_counter()
            token = mx.argmax(model(token[:, None], cache=cache)[:, -1], -1)
            mx.eval(token)
            walls.append(time.perf_counter() - start)
            tokens.append(token.item())
        result[name] = {
            "bytes": held,
            "peak": peak,
            "collectives": collectives(model),
            "step_ms": 1e3 * statistics.median(walls),
            "tokens": tokens,
        }
        del model, cache
    print(json.dumps(result))


def on_paper() -> list[str]:
    # DeepSeek-V3-class (671B MoE, 61 layers, hidden 7168, 58 MoE layers),
    # 4-bit affine with group 64, bf16 activations; 2 nodes.
    total, attention, embeddings = 671e9, 11.4e9, 1.85e9
    per_weight = 0.5 + 4 / 64  # bytes: 4 bits, a bf16 scale and bias per 64
    hidden, layers, moe_layers = 7168, 61, 58
    whole = total * per_weight
    shard = (total - embeddings) * per_weight / 2 + embeddings * per_weight
    moe_only = shard + attention * per_weight / 2
    per_token = 2 * hidden  # bf16 bytes one all_sum moves per token
    return [
        "400B-class MoE over 2 nodes (4-bit), per rank, on paper:",
        f"  unsharded {whole / 1e9:.0f} GB, shard {shard / 1e9:.0f} GB, "
        f"moe_only {moe_only / 1e9:.0f} GB",
        f"  all_sums per token: shard {2 * layers} "
        f"({2 * layers * per_token / 1e6:.2f} MB), moe_only {moe_layers} "
        f"({moe_layers * per_token / 1e6:.2f} MB), {per_token / 1e3:.1f} KB each",
    ]


def vs_mlx_lm() -> None:
    import contextlib
    import importlib
    import io

    from graphpatch.testing import ring, zoo
    from graphpatch.testing.small_configs import architectures

    script = Path(__file__).parents[1] / "tests" / "ranks" / "shard_logits.py"
    print(
        f"{'architecture':>22} {'blocks':>6} {'skipped':>7} {'max |ours - mlx-lm|':>20}"
        f" {'ours/mlx-lm bytes':>17}"
    )
    with tempfile.TemporaryDirectory() as tmp:
        for name in architectures():
            try:
                with contextlib.redirect_stdout(io.StringIO()):
                    if not hasattr(
                        importlib.import_module(f"mlx_lm.models.{name}").Model, "shard"
                    ):
                        continue
                    model_dir = zoo.build(name, Path(tmp) / name)
            except BaseException as e:  # a module may exit on import
                print(f"{name:>22} not built: {type(e).__name__}")
                continue
            case = f"{model_dir},shard,mlx-lm"
            results = ring.launch([sys.executable, str(script), case], 2, timeout=300)
            if any(r.returncode for r in results):
                last = results[0].stderr.strip().splitlines()[-1:] or ["no output"]
                print(f"{name:>22} failed: {last[0][:100]}")
                continue
            r = json.loads(results[0].stdout.splitlines()[-1])
            theirs = r["mlx_lm"]
            print(
                f"{name:>22} {len(r['rewritten']):6d} {len(r['skipped']):7d} "
                f"{theirs['vs_ours']:20.3g} {r['bytes'][1] / theirs['bytes']:17.2f}"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--vs-mlx-lm", action="store_true")
    parser.add_argument("--rank", help=argparse.SUPPRESS)  # a rank's model dir
    args = parser.parse_args()
    if args.rank:
        return rank_main(args.rank, args.steps)
    if args.vs_mlx_lm:
        return vs_mlx_lm()

    from graphpatch.testing import ring, zoo

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp) / "qwen3_moe"
        config = {**MOE, "num_hidden_layers": args.layers}
        zoo.build("qwen3_moe", model_dir, quant="affine4", **config)
        command = [sys.executable, __file__, "--rank", str(model_dir)]
        results = ring.launch(command + ["--steps", str(args.steps)], 2, timeout=900)
    failed = [r for r in results if r.returncode != 0]
    if failed:
        sys.exit("\n".join(f"rank {r.rank}:\n{r.stderr}" for r in failed))
    print(f"2 ranks on one machine, {args.layers} layers, affine 4-bit, medians")
    print(f"{'rank':>4} {'variant':>10} {'MiB':>7} {'peak':>7} {'sums':>5} {'ms':>7}")
    for r in results:
        data = json.loads(r.stdout.strip().splitlines()[-1])
        tokens = {tuple(data[name]["tokens"]) for name in VARIANTS}
        assert len(tokens) == 1, f"rank {r.rank}: the variants' tokens differ"
        for name in VARIANTS:
            v = data[name]
            print(
                f"{r.rank:>4} {name:>10} {v['bytes'] / 2**20:7.2f} "
                f"{v['peak'] / 2**20:7.2f} {v['collectives'] / args.layers:5.1f} "
                f"{v['step_ms']:7.2f}"
            )
        whole = data["unsharded"]["bytes"]
        for name in ("shard", "moe_only", "experts"):
            print(f"     rank {r.rank}: {name} holds {data[name]['bytes'] / whole:.0%}")
    kb = MOE["hidden_size"] * 4 / 1024  # float32 activations
    print(f"(sums: all_sums per layer, {kb:.0f} KB per token each; ms: decode step,")
    print(" noise on a shared 2-core box: the ranks wait for each other at each sum)")
    for line in on_paper():
        print(line)


if __name__ == "__main__":
    main()
