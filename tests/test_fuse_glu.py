"""fuse_glu on real mlx-lm models: every architecture, mode, shape, and skip."""

import mlx.core as mx
import mlx.nn as nn
import mlx_lm
import pytest
from helpers import (
    TOKENS,
    assert_exact_and_redone,
    assert_same_bits,
    calls_of,
    snapshot,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mlx_lm.utils import quantize_model

import graphpatch
from graphpatch.compare import last_logits, probe_tokens
from graphpatch.contract import module_at
from graphpatch.passes import fuse_glu
from graphpatch.testing import zoo

# name, build options, sites rewritten, sites left alone (with this reason)
ARCHITECTURES = [
    ("llama", {}, 2, 0, None),
    ("llama_untied", {"dtype": "bfloat16"}, 2, 0, None),
    ("qwen2", {"dtype": "float16"}, 2, 0, None),
    ("qwen3", {"quant": "affine8"}, 2, 0, None),
    ("qwen3_moe", {}, 2, 0, None),
    ("qwen3_moe", {"quant": "mxfp4", "dtype": "bfloat16"}, 2, 0, None),
    ("mixtral", {"quant": "affine4"}, 2, 0, None),
    ("deepseek_v3", {}, 5, 0, None),  # dense layer 0, then shared + routed experts
    ("gemma2", {}, 2, 0, None),  # gelu_approx activation
    ("gpt_oss", {}, 2, 0, None),  # SwigluOAI activation, expert biases
    ("phi3", {}, 0, 2, fuse_glu.ALREADY_FUSED),
    # a GLU named w1/w2/w3, fused as w13 (small_configs' configs)
    ("internlm2", {"quant": "affine4"}, 2, 0, None),
    ("lfm2", {}, 2, 0, None),  # a hybrid: conv layers beside attention
]


@pytest.mark.parametrize("name, build, rewritten, left, reason", ARCHITECTURES)
def test_architectures(load_zoo, name, build, rewritten, left, reason):
    model, tokenizer = load_zoo(name, **build)
    reference = model(TOKENS)
    text = mlx_lm.generate(model, tokenizer, "The quick brown", max_tokens=8)
    report = graphpatch.apply(model, ["fuse_glu"])
    assert len(report.rewritten()) == rewritten
    assert [s.reason for s in report.skipped()] == [reason] * left
    assert all(s.max_error == 0.0 for s in report.rewritten())  # bit-exact here
    assert mx.array_equal(model(TOKENS), reference)
    assert mlx_lm.generate(model, tokenizer, "The quick brown", max_tokens=8) == text


def test_a_w1_w3_glu_is_one_matmul_and_reverts_bit_for_bit(load_zoo):
    model, _ = load_zoo("internlm2", quant="affine4")
    before = snapshot(model)
    graphpatch.apply(model, ["fuse_glu"])
    mlp = model.model.layers[0].feed_forward
    assert isinstance(mlp.w1, fuse_glu.FusedPart) and "w13" in mlp
    assert mlp.w13.weight.shape[0] == 2 * 512  # [w1; w3], 512 rows each
    assert calls_of(mlp.w13, lambda: mlp(mx.ones((1, 3, 256)))) == 1
    graphpatch.revert(model)
    assert_same_bits(snapshot(model), before)


def test_moe_runs_one_gather_for_gate_and_up(load_zoo):
    model, _ = load_zoo("qwen3_moe")
    graphpatch.apply(model, ["fuse_glu"])
    switch = model.model.layers[0].mlp.switch_mlp
    assert isinstance(switch.gate_up_proj, type(switch.down_proj))
    assert switch.gate_up_proj.weight.shape == (8, 256, 128)
    assert isinstance(switch.gate_proj, fuse_glu.FusedPart)
    # gate and up: one gather_mm
    assert calls_of(switch.gate_up_proj, lambda: model(TOKENS)) == 1


MODES = st.sampled_from(
    [None, ("mxfp4", 4, 32), ("nvfp4", 4, 16), ("mxfp8", 8, 32)]
    + [("affine", b, g) for b in (2, 3, 4, 5, 6, 8) for g in (32, 64, 128)]
)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    moe=st.booleans(),
    mode=MODES,
    dtype=st.sampled_from(["float32", "bfloat16", "float16"]),
    hidden=st.sampled_from([128, 256]),
    intermediate=st.sampled_from([128, 256, 384]),
    batch=st.integers(1, 3),
    length=st.integers(1, 20),
    seed=st.integers(0, 2**16),
)
def test_equivalence_property(
    moe, mode, dtype, hidden, intermediate, batch, length, seed
):
    if moe and mode is None:
        dtype = "float32"  # the CPU backend runs gather_mm in float32 only
    name = "qwen3_moe" if moe else "llama"
    sizes = {"moe_intermediate_size": intermediate} if moe else {}
    config = zoo.config_for(
        name, hidden_size=hidden, intermediate_size=intermediate, **sizes
    )
    model = zoo.make_model(config, seed)
    tokens = mx.random.randint(0, 512, (batch, length), key=mx.random.key(seed))
    assert_exact_and_redone(model, config, mode, dtype, tokens, "fuse_glu")


def _llama(**overrides):
    return zoo.make_model(zoo.config_for("llama", **overrides))


def _quantize(model, predicate):
    nn.quantize(model, class_predicate=predicate)
    return model


def _reasons(model):
    return [s.reason for s in graphpatch.apply(model, ["fuse_glu"]).skipped()]


def test_skips_gate_and_up_with_different_bits():
    model = _quantize(
        _llama(),
        lambda p, m: (
            {"bits": 8 if "up_proj" in p else 4, "group_size": 64}
            if p.endswith(("gate_proj", "up_proj"))
            else False
        ),
    )
    assert _reasons(model) == ["gate and up differ in bits (4 vs 8)"] * 2


def test_skips_gate_and_up_of_different_kinds():
    model = _quantize(_llama(), lambda p, m: p.endswith("gate_proj"))
    assert (
        _reasons(model) == ["gate_proj is a QuantizedLinear and up_proj a Linear"] * 2
    )


def test_skips_one_sided_bias():
    model = _llama()
    for layer in model.layers:
        layer.mlp.up_proj = nn.Linear(128, 256, bias=True)
    assert (
        _reasons(model)
        == ["some of gate_proj and up_proj have a bias and others have none"] * 2
    )


def test_skips_layers_it_does_not_know():
    class Scaled(nn.Module):
        def __init__(self, linear):
            super().__init__()
            self.linear = linear

        def __call__(self, x):
            return 2 * self.linear(x)

    model = _llama()
    model.layers[1].mlp.gate_proj = Scaled(model.layers[1].mlp.gate_proj)
    report = graphpatch.apply(model, ["fuse_glu"])
    assert [s.path for s in report.rewritten()] == ["model.layers.0.mlp"]
    assert report.skipped()[0].reason == (
        "gate_proj is a Scaled, not a linear layer that can be concatenated"
    )


def test_skips_nvfp4_experts_with_different_global_scales():
    config = zoo.config_for("qwen3_moe")
    model = zoo.make_model(config)
    model, _ = quantize_model(model, config, 16, 4, mode="nvfp4", global_scale=True)
    switch = model.model.layers[0].mlp.switch_mlp
    assert switch.gate_proj.global_scale is not None
    # mlx runs global scales on the GPU only: the skip is structural, no probe.
    report = graphpatch.apply(model, ["fuse_glu"], verify=False)
    assert [s.reason for s in report.skipped()] == [
        "nvfp4 layers with different global scales for gate and up"
    ] * 2


def test_nvfp4_experts_with_equal_global_scales_fuse():
    config = zoo.config_for("qwen3_moe")
    model = zoo.make_model(config)
    for layer in model.layers:
        layer.mlp.switch_mlp.up_proj.weight = layer.mlp.switch_mlp.gate_proj.weight * 1
    model, _ = quantize_model(model, config, 16, 4, mode="nvfp4", global_scale=True)
    gpu = mx.default_device() == mx.gpu
    reference = model(TOKENS) if gpu else None
    report = graphpatch.apply(model, ["fuse_glu"], verify=gpu)
    assert len(report.rewritten()) == 2
    switch = model.model.layers[0].mlp.switch_mlp
    assert switch.gate_up_proj.global_scale.shape == (8,)
    assert switch.gate_up_proj.weight.shape[1] == 256
    if gpu:
        assert mx.array_equal(model(TOKENS), reference)


class GateUpOnDifferentInputs(nn.Module):
    """A GLU whose __call__ feeds gate and up different inputs."""

    def __init__(self, dim, hidden):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def __call__(self, x):
        return self.down_proj(nn.silu(self.gate_proj(x)) * self.up_proj(2 * x))


def test_gate_and_up_on_different_inputs_stay_correct():
    model = _llama()
    model.layers[0].mlp = GateUpOnDifferentInputs(128, 256)
    mx.eval(model.parameters())
    reference = model(TOKENS)
    report = graphpatch.apply(model, ["fuse_glu"])
    assert len(report.rewritten()) == 2
    assert mx.array_equal(model(TOKENS), reference)


def test_a_later_quantize_of_the_fused_layer_is_honoured():
    model = _llama()
    graphpatch.apply(model, ["fuse_glu"])
    nn.quantize(model, group_size=64, bits=8)
    assert isinstance(model.layers[0].mlp.gate_up_proj, nn.QuantizedLinear)
    fused = model(TOKENS)
    graphpatch.revert(model)
    assert mx.allclose(model(TOKENS), fused, atol=1e-5)


def test_weights_are_freed_and_peak_is_one_site():
    model = _llama(hidden_size=512, intermediate_size=2048, num_hidden_layers=4)
    mx.eval(model.parameters())
    mx.clear_cache()
    unpatched = mx.get_active_memory()
    mx.reset_peak_memory()
    last_logits(model, probe_tokens(None))  # the checks' own activations
    activations = mx.get_peak_memory() - unpatched
    mx.reset_peak_memory()
    report = graphpatch.apply(model, ["fuse_glu"])
    mx.clear_cache()
    site = 2 * 512 * 2048 * 4  # gate + up of one layer, float32
    assert len(report.rewritten()) == 4
    assert abs(mx.get_active_memory() - unpatched) <= 0.01 * unpatched
    assert mx.get_peak_memory() - unpatched <= site + activations + 64 * 1024


def test_tune_keeps_only_sites_measured_faster(load_zoo):
    model, _ = load_zoo("qwen3_moe")
    reference = model(TOKENS)
    report = graphpatch.apply(model, ["fuse_glu:tune"])
    for site in report.for_pass("fuse_glu"):
        if site.status == "rewritten":
            assert min(site.speedup.values()) >= 1.0
        else:
            assert site.reason.startswith("fused measured slower")
            assert not isinstance(
                module_at(model, site.path)["gate_proj"], fuse_glu.FusedPart
            )
    assert mx.array_equal(model(TOKENS), reference)


LAZY_BUILD = {"hidden_size": 256, "intermediate_size": 2048, "num_hidden_layers": 4}


def test_a_lazy_model_is_loaded_once_already_fused(zoo_dir):
    import mlx_lm

    model_dir = str(zoo_dir("llama", **LAZY_BUILD))
    size = graphpatch.sites.nbytes(mlx_lm.load(model_dir)[0])
    site = 2 * 256 * 2048 * 4  # gate + up of one layer, float32
    mx.clear_cache()
    base = mx.get_active_memory()
    model, _ = mlx_lm.load(model_dir, lazy=True)
    graphpatch.apply(model, ["fuse_glu"], verify=False)
    assert mx.get_active_memory() - base < 64 * 1024  # still nothing loaded
    mx.eval(model.parameters())
    assert abs(mx.get_active_memory() - base - size) <= 0.01 * size
    del model
    mx.clear_cache()
    mx.reset_peak_memory()
    model, _ = mlx_lm.load(model_dir, lazy=True)
    graphpatch.apply(model, ["fuse_glu"])  # verified: loads as it checks
    mx.clear_cache()
    assert abs(mx.get_active_memory() - base - size) <= 0.01 * size
    assert mx.get_peak_memory() - base <= size + site + 4 * 1024 * 1024


def test_a_half_precision_moe_on_cpu_is_refused_before_anything_changes():
    if mx.default_device() != mx.cpu:
        pytest.skip("the CPU backend's gather_mm is float32 only; GPUs run it")
    model = zoo.make_model(zoo.config_for("qwen3_moe"))
    model.set_dtype(mx.float16)
    before = snapshot(model)
    with pytest.raises(graphpatch.GraphpatchError, match="only supports float32"):
        graphpatch.apply(model, ["fuse_glu"])
    assert_same_bits(before, snapshot(model))
