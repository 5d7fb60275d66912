"""One rank of the shard tests: load, shard, compare with the unsharded model.

argv: CASE..., each ``MODEL_DIR,SPEC[,flag...]``; flags: ``mlx-lm`` also
shards a copy with mlx-lm's own ``model.shard(group)``; ``lazy`` loads lazily
and applies unverified, then evaluates one array at a time, measuring the
peak against mlx-lm's sharded_load (shard, then one eval of everything);
``revert`` reverts after and compares bit for bit; ``fuse`` applies fuse_glu,
fuse_qkv and last_token after shard and compares with the sharded-unfused
logits; ``save`` tries to save the sharded model; ``twice`` applies the
spec again; ``pipeline`` pipelines
the model over the group first (mlx-lm's ``model.model.pipeline``);
``unverified`` applies unverified to a model loaded whole; ``thread`` runs
the model first on another thread (a server's), its slices unevaluated;
``generate`` compares greedy texts with the unsharded model's. Prints
one JSON line per case. ``A|B`` as MODEL_DIR: rank 0 loads A, rank 1 B.
"""

import json
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import mlx.core as mx
import mlx_lm
from mlx.utils import tree_flatten

import graphpatch
from graphpatch.compare import compare, reordered
from graphpatch.passes.shard import materialize

PROMPTS = ["The capital of France is", "def fibonacci(n):"]
TOKENS = mx.array(
    [[5, 9, 33, 2, 17, 41, 8, 3, 12, 60], [7, 1, 4, 4, 30, 2, 9, 10, 11, 3]]
)


def nbytes(model) -> int:
    return sum(v.nbytes for _, v in tree_flatten(model.parameters()))


def logits(model) -> mx.array:
    out = model(TOKENS)
    mx.eval(out)
    return out


def case(path: str, spec: str, flags: list[str], group) -> dict:
    lazy = "lazy" in flags
    base = mx.get_active_memory()
    mx.reset_peak_memory()
    model, tokenizer = mlx_lm.load(path, lazy=lazy)
    if "pipeline" in flags:
        model.model.pipeline(group)
    try:
        verify = not lazy and "unverified" not in flags
        report = graphpatch.apply(model, [spec], verify=verify)
    except graphpatch.GraphpatchError as e:
        checks = getattr(getattr(e, "report", None), "checks", [])
        sites = getattr(getattr(e, "report", None), "sites", [])
        return {
            "rank": group.rank(),
            "error": str(e),
            "checks": [[c.max_error, c.tolerance, c.top1] for c in checks],
            "sites": [[s.path, s.max_error, s.tolerance] for s in sites],
        }
    if "thread" not in flags:
        materialize(model)
    peak = mx.get_peak_memory() - base
    reference, _ = mlx_lm.load(path)
    expected = logits(reference)
    if "thread" in flags:  # the first call comes on another thread (a server's)
        with ThreadPoolExecutor(1) as pool:
            got = pool.submit(logits, model).result()
    else:
        got = logits(model)
    cmp = compare([expected], [got])
    rules = [c.rule for c in report.checks if c.rule]  # "... x float16's tolerance"
    held_in = rules[0].split(" x ")[1].split("'")[0] if rules else "float32"
    summed = reordered(cmp, [held_in] * len(report.rewritten()))
    result = {
        "rank": group.rank(),
        "size": group.size(),
        "rewritten": [f"{s.path} ({s.kind})" for s in report.rewritten()],
        "skipped": sorted({s.reason for s in report.skipped()}),
        "warnings": report.warnings,
        "verified": all(s.verified for s in report.rewritten()),
        "max_error": cmp.max_error,
        "ok": cmp.ok,
        "reordered_ok": summed.ok,  # under the model check's rule for all_sums
        "model_checks": [[c.max_error, c.tolerance, c.rule] for c in report.checks],
        "top1": cmp.top1,
        "scale": mx.abs(expected).max().item(),
        "dtypes": sorted({s.dtype for s in report.rewritten() if s.dtype}),
        "bytes": [nbytes(reference), nbytes(model)],
        "sites": [[s.bytes_before, s.bytes_after] for s in report.rewritten()],
        "peak": peak,
    }
    if "generate" in flags:
        texts = [
            [mlx_lm.generate(m, tokenizer, p, max_tokens=8) for p in PROMPTS]
            for m in (reference, model)
        ]
        result["texts"] = texts
    if "twice" in flags:
        again = graphpatch.apply(model, [spec])
        result["again"] = sorted({s.reason for s in again.sites})
        result["again_error"] = mx.abs(logits(model) - got).max().item()
    if "save" in flags:
        with tempfile.TemporaryDirectory() as out:
            try:
                graphpatch.save(model, path, Path(out) / "saved")
            except graphpatch.SaveError as e:
                result["save"] = str(e)
    if "fuse" in flags:
        fused = graphpatch.apply(model, ["fuse_glu", "fuse_qkv", "last_token"])
        result["fused"] = len(fused.rewritten())
        result["fused_error"] = mx.abs(logits(model) - got).max().item()
    if "revert" in flags:
        result["reverted"] = len(graphpatch.revert(model))
        result["revert_exact"] = mx.array_equal(logits(model), expected).item()
        result["revert_bytes"] = nbytes(model)
    if "mlx-lm" in flags:
        base = mx.get_active_memory()
        mx.reset_peak_memory()
        theirs, _ = mlx_lm.load(path, lazy=lazy)
        theirs.shard(group)
        mx.eval(theirs.parameters())
        their_peak = mx.get_peak_memory() - base
        out = logits(theirs)
        result["mlx_lm"] = {
            "peak": their_peak,
            "max_error": compare([expected], [out]).max_error,
            "bytes": nbytes(theirs),
            "vs_ours": mx.abs(out - got).max().item(),
        }
    return result


group = mx.distributed.init(backend="ring", strict=True)
for arg in sys.argv[1:]:
    paths, spec, *flags = arg.split(",")
    path = paths.split("|")[group.rank() % len(paths.split("|"))]
    print(json.dumps(case(path, spec, flags, group)), flush=True)
