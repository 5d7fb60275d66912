"""Every registered pass (``graphpatch.passes.PASSES``), on two small zoo
models: revert is bit-exact, a second apply rewrites nothing and says
"already applied", both save formats reopen to the patched logits, an
unverified apply leaves a lazy model lazy, every skip reason is one of the
pass's constants, and the pass is in ``graphpatch list`` and docs/PASSES.md.
A pass gets all of this by registering; none is named here but in
``NEEDS_RANKS``."""

import gc
import re
import string
import sys
import types
from pathlib import Path

import mlx.core as mx
import mlx_lm
import pytest
from helpers import TOKENS, assert_same_bits, run, snapshot

import graphpatch
from graphpatch.passes import PASSES

MODELS = {
    "llama": {},  # float32, tied head, dense GLU, q/k/v
    "qwen3_moe": {"quant": "affine4"},  # quantized, untied head, MoE experts
}
# Passes that rewrite nothing in one process, and why: every other step
# still runs on them (their reasons, revert, saves, laziness, the docs); their
# rewrites are tested on real ring groups in their own test files.
NEEDS_RANKS = {
    "shard": "splits blocks over a group of more than one rank",
    "elide_head": "elides the head of pipeline ranks other than 0",
}
ALREADY_APPLIED = "already applied"
SLACK = 4096  # bytes an unevaluated apply may allocate: below any site's arrays
PASSES_MD = Path(__file__).parents[1] / "docs" / "PASSES.md"
NAMES = list(PASSES)


@pytest.fixture(params=list(MODELS))
def model_dir(request, zoo_dir) -> Path:
    return zoo_dir(request.param, **MODELS[request.param])


def patched(model_dir: Path, name: str):
    """(model, its parameters before, the report of a verified apply)."""
    model, _ = mlx_lm.load(str(model_dir))
    before = snapshot(model)
    return model, before, graphpatch.apply(model, [name], model_dir=str(model_dir))


def applied(model) -> dict[str, list[str]]:
    return {name: p.applied(model) for name, p in PASSES.items()}


@pytest.mark.parametrize("name", NAMES)
def test_revert_gives_back_every_parameter_bit_for_bit(model_dir, name):
    model, before, _ = patched(model_dir, name)
    graphpatch.revert(model)
    assert_same_bits(before, snapshot(model))
    assert applied(model) == {n: [] for n in PASSES}


@pytest.mark.parametrize("name", NAMES)
def test_a_second_apply_rewrites_nothing_and_says_already_applied(model_dir, name):
    model, _, first = patched(model_dir, name)
    once = snapshot(model)
    second = graphpatch.apply(model, [name], model_dir=str(model_dir))
    assert second.rewritten() == []
    reasons = {(s.pass_name, s.path): s.reason for s in second.sites}
    for site in first.rewritten():
        assert reasons[(site.pass_name, site.path)] == ALREADY_APPLIED, site
    assert_same_bits(once, snapshot(model))


@pytest.mark.parametrize("name", NAMES)
def test_the_pass_rewrites_in_one_process_unless_it_needs_ranks(zoo_dir, name):
    rewritten = []
    for model, build in MODELS.items():
        report = patched(zoo_dir(model, **build), name)[2]
        rewritten += report.rewritten(name)
    assert bool(rewritten) == (name not in NEEDS_RANKS), NEEDS_RANKS.get(name)


@pytest.mark.parametrize("save_format", ["plain", "fused"])
@pytest.mark.parametrize("name", NAMES)
def test_a_save_reopens_to_the_patched_logits(model_dir, tmp_path, name, save_format):
    model, _, _ = patched(model_dir, name)
    out = graphpatch.save(model, model_dir, tmp_path / "saved", format=save_format)
    loaded, _ = graphpatch.load(out)
    assert mx.array_equal(loaded(TOKENS), model(TOKENS))
    assert applied(loaded) == applied(model)


@pytest.mark.parametrize("name", NAMES)
def test_an_unverified_apply_leaves_a_lazy_model_unevaluated(model_dir, name):
    gc.collect()  # no earlier test's arrays freed while this one measures
    mx.clear_cache()
    base = mx.get_active_memory()
    model, _ = mlx_lm.load(str(model_dir), lazy=True)
    mx.reset_peak_memory()
    report = graphpatch.apply(model, [name], verify=False, model_dir=str(model_dir))
    assert mx.get_active_memory() - base < SLACK
    assert mx.get_peak_memory() - base < SLACK
    assert report.checks == [] and not any(s.verified for s in report.sites)


@pytest.mark.parametrize("name", NAMES)
def test_every_skip_reason_is_a_constant_of_the_pass(zoo_dir, name):
    reasons = set()
    for model, build in MODELS.items():
        model_dir = zoo_dir(model, **build)
        loaded, _, first = patched(model_dir, name)
        second = graphpatch.apply(loaded, [name], model_dir=str(model_dir))
        reasons |= {(s.pass_name, s.reason) for s in first.skipped() + second.skipped()}
    for pass_name, reason in sorted(reasons):
        templates = constants(PASSES[pass_name])
        assert any(_matches(t, reason) for t in templates), (pass_name, reason)


@pytest.mark.parametrize("name", NAMES)
def test_the_pass_is_listed_and_documented(name):
    listed = run("list")
    assert listed.exit_code == 0 and name in listed.output
    assert PASSES[name].env in listed.output
    headings = [line for line in PASSES_MD.read_text().splitlines() if line[:1] == "#"]
    assert any(re.fullmatch(rf"#+ `?{name}`?", h.strip()) for h in headings), (
        f"docs/PASSES.md has no section for {name}"
    )


def test_a_reason_matches_its_constant_or_template_and_nothing_looser():
    template = "already explicit: a top-level {cls} producing the vocabulary"
    assert _matches(template, template.format(cls="QuantizedLinear"))
    assert _matches("already applied", "already applied")
    assert not _matches(template, "already explicit: a top-level head")
    assert not _matches("already applied", "already applied twice")
    assert not _matches("{name}: {why}", "any text at all: it would pass")


def constants(p) -> list[str]:
    """The module-level strings of the pass's module (its whole package, for
    a pass that is one) and of the graphpatch modules those import from."""
    name = p.find.__module__
    if name.startswith("graphpatch.passes."):
        name = ".".join(name.split(".")[:3])
    own = [m for n, m in sys.modules.items() if n == name or n.startswith(name + ".")]
    found = {m.__name__: m for m in own}
    for module in own:
        for value in vars(module).values():
            source = value if isinstance(value, types.ModuleType) else None
            if source is None and isinstance(getattr(value, "__module__", None), str):
                source = sys.modules.get(value.__module__)
            if source is not None and source.__name__.startswith("graphpatch"):
                found.setdefault(source.__name__, source)
    return [
        value
        for module in found.values()
        for key, value in vars(module).items()
        if key.lstrip("_").isupper() and isinstance(value, str)
    ]


def _matches(template: str, reason: str) -> bool:
    """``reason`` is ``template``, or ``template.format(...)`` of anything."""
    if reason == template:
        return True
    try:
        parts = list(string.Formatter().parse(template))
    except ValueError:  # a brace that is no field: a plain string
        return False
    if all(field is None for _, field, _, _ in parts):
        return False
    if sum(len(literal) for literal, *_ in parts) < 8:  # "{}" would match anything
        return False
    pattern = "".join(
        re.escape(literal) + ("" if field is None else ".+?")
        for literal, field, _, _ in parts
    )
    return re.fullmatch(pattern, reason, re.S) is not None
