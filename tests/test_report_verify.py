"""The report's forms and the one tolerance table."""

import io
import json

import mlx.core as mx
from hypothesis import given
from hypothesis import strategies as st
from rich.console import Console

import graphpatch
from graphpatch.compare import (
    TOLERANCE,
    compare,
    logits_dtype,
    reordered,
    reordered_rule,
    tolerance_for,
)


def test_report_as_json_and_table(load_zoo):
    model, _ = load_zoo("gpt_oss")
    report = graphpatch.apply(model, ["fuse_glu"])
    data = json.loads(report.to_json())
    assert [s["status"] for s in data["sites"]] == ["rewritten", "rewritten"]
    assert data["sites"][0]["path"] == "model.layers.0.mlp.experts"
    assert data["sites"][0]["bytes_before"] == data["sites"][0]["bytes_after"] > 0
    assert data["checks"][0]["ok"] is True
    assert report.summary_lines() == ["fuse_glu: 2 rewritten, 0 skipped, max error 0"]
    text = io.StringIO()
    report.print(Console(file=text, width=160), verbose=True)
    assert "model.layers.1.mlp.experts (moe)" in text.getvalue()
    text = io.StringIO()
    report.print(Console(file=text, width=160))
    assert "model.layers.{0..1}.mlp.experts" in text.getvalue()
    assert "top-1 agreement 100%: ok" in text.getvalue()


def test_tolerances_scale_with_the_logits_and_the_dtype():
    assert set(TOLERANCE) == {mx.float32, mx.float16, mx.bfloat16}
    assert tolerance_for(mx.bfloat16, 10.0) > tolerance_for(mx.float16, 10.0)
    assert tolerance_for(mx.float16, 10.0) > tolerance_for(mx.float32, 10.0)
    assert tolerance_for(mx.float32, 100.0) > tolerance_for(mx.float32, 1.0)


def test_compare_reports_error_and_top1():
    ref = mx.array([[[0.0, 1.0, 0.5], [2.0, 0.0, 0.0]]])
    out = mx.array([[[0.0, 1.0, 0.5], [0.0, 2.5, 0.0]]])
    cmp = compare([ref], [out])
    assert cmp.max_error == 2.5 and cmp.top1 == 0.5 and not cmp.ok
    assert compare([ref], [ref]).ok


def test_a_token_masked_in_both_is_no_error_and_no_scale():
    inf = float("inf")
    ref = mx.array([[[0.5, -inf, 1.0]]])
    cmp = compare([ref], [mx.array([[[0.5, -inf, 1.0]]])])
    assert (
        cmp.ok
        and cmp.max_error == 0
        and cmp.tolerance == tolerance_for(mx.float32, 1.0)
    )
    # masked in one only, or a finite logit moved: caught, not absorbed
    assert not compare([ref], [mx.array([[[0.5, 0.0, 1.0]]])]).ok
    assert not compare([ref], [mx.array([[[0.5, -inf, 2.0]]])]).ok
    assert not compare([ref], [mx.array([[[0.5, inf, 1.0]]])]).ok
    assert not compare([ref * float("nan")], [ref * float("nan")]).ok


def test_logits_dtype_is_what_the_model_computes_in(load_zoo):
    assert logits_dtype(load_zoo("llama", dtype="bfloat16")[0]) == mx.bfloat16
    quantized = load_zoo("qwen3", quant="affine4", dtype="float16")[0]
    assert logits_dtype(quantized) == mx.float16
    # float32 norms over float16 scales: most floats are half, the math is not
    mixed = load_zoo("llama", dtype="float16", quant="mixed", norms="float32")[0]
    assert logits_dtype(mixed) == mx.float32


@given(
    sums=st.integers(1, 400),
    scale=st.floats(0.5, 500),
    dtype=st.sampled_from(["float32", "float16", "bfloat16"]),
)
def test_reordered_sums_widen_by_the_least_precise_dtype_and_keep_top1(
    sums, scale, dtype
):
    """The model check of a sum-reordering pass: sqrt(sums) times the least
    precise held-in dtype's tolerance at the logits' scale, and every top-1."""
    held_in = ["float32"] * (sums - 1) + [dtype]
    ref = mx.array([[[scale, 0.0, -scale / 2]], [[0.0, scale, -scale]]])
    widened = sums**0.5 * tolerance_for(getattr(mx, dtype), scale)
    within = ref + mx.array([0.0, 0.0, 0.99 * widened])
    assert reordered(compare([ref], [within]), held_in).ok
    beyond = ref + mx.array([0.0, 0.0, 1.01 * max(widened, 1e-5 + 1e-5 * scale)])
    assert not reordered(compare([ref], [beyond]), held_in).ok
    # a flipped top-1 fails, however small the move
    d = widened / 4
    tie = mx.array([[scale, scale - d, 0.0]])
    flipped = mx.array([[scale, scale + d, 0.0]])
    assert compare([tie], [flipped]).max_error < widened
    assert not reordered(compare([tie], [flipped]), held_in).ok
    assert reordered(compare([ref], [ref]), []) == compare([ref], [ref])
    assert reordered_rule(held_in).startswith(f"{sums} reordered sums")
    assert f"{dtype}'s tolerance" in reordered_rule(held_in)
