"""elide_head: decode step time and memory per rank of a 2-rank pipeline,
with the head on every rank (unpatched), on rank 0 only with mlx-lm's
all-gather of h kept (elide_head:keep_gather), on rank 0 only without the
gather (elide_head, its default), and the same with rank 0's logits sent to
every rank instead of its token (elide_head:logits).

Qwen2.5-0.5B widths (hidden 896, vocab 151936), an untied head (as the larger
Qwen2.5 models have), affine 4-bit, float32 activations, a few layers. Starts
2 ranks of an MLX ring group on localhost (graphpatch.testing.ring) that alternate the
four variants in rounds (apply / revert between them) and report median wall
and CPU time per decode step, the head's own time, and active memory. On one
machine the two ranks share its cores and wait for each other every step, so
wall time moves little; CPU time and memory say what the rank no longer does.
Then the seed's scale on paper: the head bytes a 400B-class MoE reads per
token on each rank that does not sample.

    python benchmarks/elide_head.py [--layers N] [--steps N] [--rounds N]
"""

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import mlx.core as mx

QWEN25_05B = {
    "hidden_size": 896,
    "intermediate_size": 4864,
    "num_attention_heads": 14,
    "num_key_value_heads": 2,
    "vocab_size": 151936,
    "tie_word_embeddings": False,
    "rope_theta": 1e6,
    "max_position_embeddings": 32768,
}


def rank_main(model_dir: str, steps: int, rounds: int) -> None:
    import mlx_lm
    from mlx_lm.models.cache import make_prompt_cache

    import graphpatch
    from graphpatch.passes import elide_head

    group = mx.distributed.init(backend="ring", strict=True)
    model, _ = mlx_lm.load(model_dir)
    model.model.pipeline(group)
    mx.eval(model.parameters())
    prompt = mx.array([[3, 17, 42, 5, 60, 7, 11, 2] * 4])

    def decode(name: str) -> tuple[list[float], list[float], list[int]]:
        token_only = name in ("gathered", "elided")  # the others have logits
        sample = elide_head.sampler() if token_only else (lambda x: mx.argmax(x, -1))
        cache = make_prompt_cache(model)
        token = sample(model(prompt, cache=cache)[:, -1])
        mx.eval(token)
        walls, cpus, tokens = [], [], []
        for _ in range(steps):
            wall, cpu = time.perf_counter(), time.process_time()
            token = sample(model(token[:, None], cache=cache)[:, -1])
            mx.eval(token)
            walls.append(time.perf_counter() - wall)
            cpus.append(time.process_time() - cpu)
            tokens.append(token.item())
        return walls, cpus, tokens

    def active() -> int:
        mx.clear_cache()
        return mx.get_active_memory()

    samples = {name: ([], []) for name in VARIANTS}
    memory = {"unpatched": active()}
    tokens = {}
    for _ in range(rounds):
        for name, spec in VARIANTS.items():
            if spec:
                report = graphpatch.apply(model, [spec], model_dir=model_dir)
                gather = report.for_pass("elide_head")[-1]
                assert gather.status == ("skipped" if "keep" in spec else "rewritten")
                memory[name] = active()
            decode(name)  # warm: a reverted head reloads here
            walls, cpus, tokens[name] = decode(name)
            samples[name][0].extend(walls)
            samples[name][1].extend(cpus)
            graphpatch.revert(model)
    h = mx.random.normal((1, 1, 896))
    head_times = []
    for _ in range(20):
        start = time.perf_counter()
        mx.eval(model.lm_head(h))
        head_times.append(time.perf_counter() - start)
    token, logits = mx.array([7], mx.uint32), mx.zeros((1, 1, 151936))
    result = {
        "rank": group.rank(),
        "same_tokens": len({tuple(t) for t in tokens.values()}) == 1,
        "memory_mib": {k: v / 2**20 for k, v in memory.items()},
        "head_ms": 1e3 * statistics.median(head_times),
        # what the variants trade, each collective alone (ms)
        "collectives_ms": {
            "all_gather h": collective_ms(lambda: mx.distributed.all_gather(h)),
            "all_sum token": collective_ms(lambda: mx.distributed.all_sum(token)),
            "all_sum logits": collective_ms(lambda: mx.distributed.all_sum(logits)),
        },
    }
    for name, (walls, cpus) in samples.items():
        result[name] = {
            "wall_ms": 1e3 * statistics.median(walls),
            "cpu_ms": 1e3 * statistics.median(cpus),
        }
    print(json.dumps(result))


def collective_ms(op, times: int = 200) -> float:
    samples = []
    for _ in range(times):
        start = time.perf_counter()
        mx.eval(op())
        samples.append(time.perf_counter() - start)
    return 1e3 * statistics.median(samples)


# The names the table prints, and the pass spec each applies.
VARIANTS = {
    "unpatched": None,
    "gathered": "elide_head:keep_gather",
    "elided": "elide_head",
    "logits": "elide_head:logits",
}


def on_paper() -> list[str]:
    # DeepSeek-V3-class (671B MoE): vocab 129280, hidden 7168, 4-bit affine
    # with group 64 (a bf16 scale and bias per 64 weights).
    vocab, hidden = 129280, 7168
    head_bytes = vocab * hidden * (0.5 + 4 / 64)
    lines = [f"400B-class MoE head (4-bit): {head_bytes / 1e6:.0f} MB read per token"]
    for name, bandwidth in (("M3 Ultra, 819 GB/s", 819e9), ("M4 Max, 546 GB/s", 546e9)):
        lines.append(f"  at {name}: {1e3 * head_bytes / bandwidth:.2f} ms per token")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--rank", help=argparse.SUPPRESS)  # a rank's model dir
    args = parser.parse_args()
    if args.rank:
        return rank_main(args.rank, args.steps, args.rounds)

    from graphpatch.testing import ring, zoo

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp) / "qwen2"
        config = {**QWEN25_05B, "num_hidden_layers": args.layers}
        zoo.build("qwen2", model_dir, quant="affine4", **config)
        command = [sys.executable, __file__, "--rank", str(model_dir)]
        command += ["--steps", str(args.steps), "--rounds", str(args.rounds)]
        results = ring.launch(command, n=2, timeout=1800)
    failed = [r for r in results if r.returncode != 0]
    if failed:
        sys.exit(
            "\n".join(f"rank {r.rank} ({r.returncode}):\n{r.stderr}" for r in failed)
        )
    print(f"2 ranks on one machine, {args.layers} layers, decode steps, medians")
    print(f"{'rank':>4} {'variant':>10} {'wall ms':>8} {'cpu ms':>8} {'MiB':>7}")
    print("(tokens identical across the variants on every rank)")
    for r in results:
        data = json.loads(r.stdout.strip().splitlines()[-1])
        assert data["same_tokens"], f"rank {r.rank}: the variants' tokens differ"
        for name in VARIANTS:
            v = data[name]
            print(
                f"{r.rank:>4} {name:>10} {v['wall_ms']:8.2f} {v['cpu_ms']:8.2f} "
                f"{data['memory_mib'][name]:7.1f}"
            )
        u = data["unpatched"]
        for name in list(VARIANTS)[1:]:
            wall = u["wall_ms"] / data[name]["wall_ms"]
            cpu = u["cpu_ms"] / data[name]["cpu_ms"]
            print(
                f"     rank {r.rank}: unpatched/{name} wall {wall:.3f}, cpu {cpu:.3f}"
            )
        share = data["head_ms"] / u["wall_ms"]
        print(f"     head alone {data['head_ms']:.2f} ms ({share:.0%} of a step)")
        for name, ms in data["collectives_ms"].items():
            print(f"     {name} alone {1e3 * ms:.0f} us")
    for line in on_paper():
        print(line)


if __name__ == "__main__":
    main()
