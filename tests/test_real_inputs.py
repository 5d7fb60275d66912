"""Site checks replay what the model really fed each site in the reference
forward: its dtype, its shapes, its values, its expert indices."""

import mlx.core as mx
import mlx.nn as nn
import pytest
from helpers import TOKENS

import graphpatch
from graphpatch import fusion, tapped
from graphpatch.contract import Context, rebuilt
from graphpatch.fusion import joined
from graphpatch.passes import fuse_glu

MIXED = {"dtype": "float16", "quant": "mixed", "norms": "float32"}
PASSES = "untied_head,fuse_glu,last_token"


@pytest.mark.parametrize(
    "name, build",
    [
        ("llama", MIXED),
        ("qwen3_moe", MIXED),
        ("llama", {"dtype": "bfloat16"}),
        ("qwen3", {"dtype": "float16", "quant": "affine4", "norms": "float32"}),
    ],
    ids=["llama-mixed", "qwen3_moe-mixed", "llama-bf16", "qwen3-half-scales"],
)
def test_every_pass_on_checkpoints_that_mix_dtypes(zoo_dir, name, build):
    model_dir = zoo_dir(name, **build)
    model, _ = graphpatch.load(model_dir)
    reference = model(TOKENS)
    report = graphpatch.apply(model, PASSES, model_dir=str(model_dir))
    assert len(report.rewritten()) >= 3
    assert all(s.reason.startswith("already explicit") for s in report.skipped())
    computes_in = "bfloat16" if build["dtype"] == "bfloat16" else "float32"
    assert {s.dtype for s in report.rewritten()} == {computes_in}
    assert report.dtype == computes_in
    assert mx.array_equal(model(TOKENS)[:, -1], reference[:, -1])


def test_sites_are_probed_with_the_activations_the_model_produced(load_zoo):
    model, _ = load_zoo("qwen3_moe", **MIXED)
    taps = fuse_glu.taps(model, {}, Context())
    logits, recorded = tapped.recording(model, taps, lambda: model(TOKENS))
    for tap in taps:
        ((x, indices),) = tapped.inputs(recorded, tap)
        assert x.dtype == mx.float32 and x.shape[:2] == TOKENS.shape
        assert indices.dtype == mx.uint32  # the router's real choice
    assert type(model.model.layers[0].mlp).__name__ == "Qwen3MoeSparseMoeBlock"
    assert mx.array_equal(logits, model(TOKENS))  # recording changed nothing


class HalfInput(nn.QuantizedLinear):
    """Wrong on purpose: rounds its input to float16, an error of about 1e-3
    that only a site fed float32 (as the model really feeds it) can see."""

    def __call__(self, x):
        return super().__call__(x.astype(mx.float16)).astype(x.dtype)


def test_a_wrong_rewrite_visible_only_in_float32_is_caught(load_zoo, monkeypatch):
    monkeypatch.setattr(
        fusion,
        "joined",
        lambda *layers, **kw: rebuilt(joined(*layers, **kw), HalfInput),
    )
    model, _ = load_zoo("llama", dtype="float16", quant="affine4", norms="float32")
    reference = model(TOKENS)
    report = graphpatch.apply(model, "fuse_glu")
    assert report.rewritten() == []
    for site in report.skipped():
        assert site.reason.startswith("rewrite off by") and site.dtype == "float32"
    assert fuse_glu.PASS.applied(model) == []
    assert mx.array_equal(model(TOKENS), reference)
