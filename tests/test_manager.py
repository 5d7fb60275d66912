"""The manager: env gating, canonical order, verification, rollback, revert."""

import mlx.core as mx
import mlx.nn as nn
import pytest
from helpers import TOKENS, assert_same_bits, snapshot

import graphpatch
from graphpatch import GraphpatchError, PassSpecError, VerificationError, fusion
from graphpatch.contract import NotAModelError, Pass, Proof, Site, module_at
from graphpatch.passes import PASSES, fuse_glu


def names(plan):
    return [p.name for p, _ in plan]


def test_nothing_runs_by_default():
    plan, warnings = graphpatch.resolve(None, env={})
    assert plan == [] and warnings == []


def test_env_turns_passes_on_and_off():
    assert names(graphpatch.resolve(None, {"GRAPHPATCH_PASSES": "fuse_glu"})[0]) == [
        "fuse_glu"
    ]
    assert names(graphpatch.resolve(None, {"GRAPHPATCH_FUSE_GLU": "1"})[0]) == [
        "fuse_glu"
    ]
    plan, warnings = graphpatch.resolve(["fuse_glu"], {"GRAPHPATCH_FUSE_GLU": "0"})
    assert plan == [] and "GRAPHPATCH_FUSE_GLU=0" in warnings[0]


def test_apply_reads_the_env(load_zoo, monkeypatch):
    model, _ = load_zoo("llama")
    monkeypatch.setenv("GRAPHPATCH_PASSES", "fuse_glu")
    report = graphpatch.apply(model)
    assert len(report.rewritten("fuse_glu")) == 2
    graphpatch.revert(model)
    monkeypatch.setenv("GRAPHPATCH_FUSE_GLU", "0")
    assert graphpatch.apply(model).rewritten() == []


@pytest.mark.parametrize(
    "spec, env, message",
    [
        (["fuse_glue"], {}, "unknown pass 'fuse_glue'"),
        (["fuse_glu:bogus"], {}, "unknown option 'bogus'"),
        (["fuse_glu:tune=maybe"], {}, "wants true or false"),
        (None, {"GRAPHPATCH_FUSE_GLU": "maybe"}, "must be 1/0, true/false"),
        (None, {"GRAPHPATCH_PASSES": "fuse_glu,nope"}, "unknown pass 'nope'"),
    ],
)
def test_bad_pass_lists_are_errors(spec, env, message):
    with pytest.raises(PassSpecError, match=message):
        graphpatch.resolve(spec, env)


@pytest.mark.parametrize("on, off", [("1", "0"), ("true", "false"), ("Yes", "no")])
def test_switches_read_the_usual_booleans(on, off):
    env = {"GRAPHPATCH_FUSE_GLU": on, "GRAPHPATCH_LAST_TOKEN": off}
    plan, _ = graphpatch.resolve(None, env)
    assert [p.name for p, _ in plan] == ["fuse_glu"]


def test_an_unknown_variable_is_a_warning_naming_the_closest():
    env = {"GRAPHPATCH_FUSE_GLUE": "1", "GRAPHPATCH_HOME": "/x"}
    plan, warnings = graphpatch.resolve("last_token", env)
    assert [p.name for p, _ in plan] == ["untied_head", "last_token"]
    assert warnings[:2] == [
        "GRAPHPATCH_FUSE_GLUE is not a graphpatch variable, ignored "
        "(did you mean GRAPHPATCH_FUSE_GLU?)",
        "GRAPHPATCH_HOME is not a graphpatch variable, ignored",
    ]


def test_options_parse_with_types():
    ((p, options),) = graphpatch.resolve("fuse_glu:tune", {})[0]
    assert options == {"tune": True}
    ((p, options),) = graphpatch.resolve("fuse_glu:tune=0", {})[0]
    assert options == {"tune": False}


def test_errors_come_before_anything_is_touched(load_zoo):
    model, _ = load_zoo("llama")
    before = snapshot(model)
    with pytest.raises(PassSpecError):
        graphpatch.apply(model, ["fuse_glu", "nope"])
    with pytest.raises(ValueError, match="token ids"):
        graphpatch.apply(model, ["fuse_glu"], probe=[[0.5, 1.5]])
    assert fuse_glu.PASS.applied(model) == []
    assert_same_bits(before, snapshot(model))
    with pytest.raises(NotAModelError):
        graphpatch.apply({"weight": mx.zeros(3)}, ["fuse_glu"])


def _double_down_proj(name: str, blind: bool, requires=()) -> Pass:
    """A deliberately wrong pass: doubles the first MLP's down_proj weight. With
    ``blind`` its site probe sees nothing, so only the model check can catch it."""
    path = "model.layers.0.mlp.down_proj"

    def rewrite(model, site, options, context):
        module_at(model, path).weight = module_at(model, path).weight * 2

    def undo(model, p):
        module_at(model, path).weight = module_at(model, path).weight / 2

    def probe(model, site, options, context):
        x = mx.ones((1, 2, module_at(model, path).weight.shape[-1]), context.dtype)
        return (lambda: []) if blind else (lambda: [module_at(model, path)(x)])

    return Pass(
        name=name,
        summary="wrong on purpose",
        find=lambda model, options, context: [Site(path, "dense")],
        why_not=lambda model, site, options, context: None,
        rewrite=rewrite,
        undo=undo,
        applied=lambda model: [],
        proof=Proof(probe),
        requires=requires,
    )


def test_failed_model_check_rolls_everything_back(load_zoo, monkeypatch):
    monkeypatch.setitem(PASSES, "double", _double_down_proj("double", blind=True))
    model, _ = load_zoo("llama")
    before = snapshot(model)
    with pytest.raises(VerificationError) as failure:
        graphpatch.apply(model, ["double", "fuse_glu"])
    assert failure.value.pass_name == "double"
    assert failure.value.report.rolled_back
    assert len(failure.value.report.rewritten("fuse_glu")) == 2
    assert fuse_glu.PASS.applied(model) == []
    assert_same_bits(before, snapshot(model))


def test_failed_site_check_restores_the_site(load_zoo, monkeypatch):
    monkeypatch.setitem(PASSES, "double", _double_down_proj("double", blind=False))
    model, _ = load_zoo("llama")
    before = snapshot(model)
    report = graphpatch.apply(model, ["double"])
    (site,) = report.for_pass("double")
    assert site.status == "skipped" and "restored" in site.reason
    assert site.max_error > site.tolerance
    assert_same_bits(before, snapshot(model))


def test_wrong_concatenation_order_is_caught(load_zoo, monkeypatch):
    """The field's classic pitfall: [up, gate] where [gate, up] is split."""
    real = fusion.joined
    monkeypatch.setattr(fusion, "joined", lambda gate, up, **kw: real(up, gate, **kw))
    model, _ = load_zoo("qwen3_moe")
    before = snapshot(model)
    report = graphpatch.apply(model, ["fuse_glu"])
    assert report.rewritten() == []
    assert all("restored" in s.reason for s in report.skipped())
    assert_same_bits(before, snapshot(model))


def test_canonical_order_and_pulled_in_requirements(monkeypatch):
    monkeypatch.setitem(
        PASSES, "double", _double_down_proj("double", True, ("fuse_glu",))
    )
    plan, warnings = graphpatch.resolve(["double"], {})
    assert names(plan) == ["fuse_glu", "double"]
    assert warnings == ["double needs fuse_glu: pulled it in"]
    assert names(graphpatch.resolve(["double", "fuse_glu"], {})[0]) == names(plan)
    plan, warnings = graphpatch.resolve(["double"], {"GRAPHPATCH_FUSE_GLU": "0"})
    assert plan == [] and "double switched off: it needs fuse_glu" in warnings


def test_second_apply_says_already_applied(load_zoo):
    model, _ = load_zoo("qwen3")
    first = graphpatch.apply(model, ["fuse_glu"])
    second = graphpatch.apply(model, ["fuse_glu"])
    assert len(first.rewritten()) == 2 and second.rewritten() == []
    assert {s.reason for s in second.skipped()} == {fuse_glu.ALREADY_APPLIED}


def test_revert_restores_bit_for_bit(load_zoo):
    model, _ = load_zoo("mixtral", quant="affine4")
    before = snapshot(model)
    graphpatch.apply(model, ["fuse_glu"])
    assert "model.layers.0.block_sparse_moe.switch_mlp.gate_up_proj.weight" in snapshot(
        model
    )
    restored = graphpatch.revert(model)
    assert restored == [
        "fuse_glu:model.layers.0.block_sparse_moe.switch_mlp",
        "fuse_glu:model.layers.1.block_sparse_moe.switch_mlp",
    ]
    assert_same_bits(before, snapshot(model))


def test_unverified_apply_evaluates_nothing(zoo_dir):
    import mlx_lm

    mx.clear_cache()
    base = mx.get_active_memory()
    model, _ = mlx_lm.load(str(zoo_dir("qwen3_moe")), lazy=True)
    assert mx.get_active_memory() - base < 64 * 1024
    report = graphpatch.apply(model, ["fuse_glu"], verify=False)
    assert mx.get_active_memory() - base < 64 * 1024
    assert [s.verified for s in report.rewritten()] == [False, False]
    assert report.checks == []
    assert "(unverified)" in report.summary_lines()[0]
    assert model(TOKENS).shape == (1, 10, 512)


def test_progress_is_reported(load_zoo):
    model, _ = load_zoo("llama")
    lines = []
    graphpatch.apply(model, ["fuse_glu"], progress=lines.append)
    assert lines == [
        "fuse_glu: site 1 of 2 (model.layers.0.mlp)",
        "fuse_glu: site 2 of 2 (model.layers.1.mlp)",
        "fuse_glu: checking the model",
    ]


def test_a_module_that_is_not_a_language_model_is_refused_cleanly():
    with pytest.raises(GraphpatchError, match="cannot run the model on probe tokens"):
        graphpatch.apply(nn.Linear(4, 4), ["fuse_glu"])


@pytest.mark.parametrize("name", ["llama", "qwen3_moe", "gemma2"])
def test_the_patched_forward_compiles(load_zoo, name):
    model, _ = load_zoo(name)
    graphpatch.apply(model, "untied_head,fuse_glu,last_token:keep=2:short=4")
    compiled = mx.compile(model)
    assert mx.array_equal(compiled(TOKENS), model(TOKENS))
    assert compiled(TOKENS).shape == (1, 10, 512)  # no cache: every position
