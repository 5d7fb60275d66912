"""What verification costs, in forwards of the model on its own probe: the
time of apply(verify=True) divided by one forward of the probe (2 x 12
tokens, logits evaluated), per pass and all together, with apply(verify=False)
beside it. Each round loads the model afresh (load time not counted) and the
variants alternate, so drift hits them alike.

    python benchmarks/verify_cost.py [--rounds 3] [--model DIR]

By default the model is a SmolLM2-135M-shaped llama (30 layers, 576/1536,
vocab 49152, tied) with seeded weights in the layout real checkpoints have:
4-bit layers, an 8-bit embedding, float16 scales, float32 norms. ``--model``
measures a model directory of your own.
"""

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import mlx.core as mx

import graphpatch
from graphpatch.compare import PROBE_TOKENS
from graphpatch.testing import zoo

SMOLLM2_135M = {
    "hidden_size": 576,
    "intermediate_size": 1536,
    "num_hidden_layers": 30,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "vocab_size": 49152,
    "max_position_embeddings": 8192,
    "rope_theta": 100000.0,
}
CASES = ["untied_head", "fuse_glu", "last_token", "untied_head,fuse_glu,last_token"]


def forward_seconds(model_dir: Path, rounds: int) -> float:
    model = graphpatch.load(model_dir)[0]
    tokens = mx.array(PROBE_TOKENS)
    mx.eval(model(tokens))  # warm up
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        mx.eval(model(tokens))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def apply_seconds(model_dir: Path, passes: str, verify: bool) -> float:
    model = graphpatch.load(model_dir)[0]
    start = time.perf_counter()
    graphpatch.apply(model, passes, verify=verify, model_dir=str(model_dir))
    return time.perf_counter() - start


def measure(model_dir: Path, rounds: int) -> None:
    forward = forward_seconds(model_dir, rounds)
    print(f"{model_dir.name}: one forward of the probe {forward * 1000:.0f} ms")
    print("| passes | verified s | forwards | unverified s | forwards |")
    print("|---|---|---|---|---|")
    for passes in CASES:
        runs = {True: [], False: []}
        for _ in range(rounds):
            for verify in (True, False):
                runs[verify].append(apply_seconds(model_dir, passes, verify))
        on, off = (statistics.median(runs[v]) for v in (True, False))
        ratios = f"{on:.2f} | {on / forward:.1f} | {off:.2f} | {off / forward:.1f}"
        print(f"| {passes} | {ratios} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--model", type=Path, default=None)
    args = parser.parse_args()
    if args.model is not None:
        measure(args.model, args.rounds)
        return
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = zoo.build(
            "llama",
            Path(tmp) / "smollm2-135m-shaped",
            dtype="float16",
            quant="mixed",
            norms="float32",
            **SMOLLM2_135M,
        )
        measure(model_dir, args.rounds)


if __name__ == "__main__":
    main()
