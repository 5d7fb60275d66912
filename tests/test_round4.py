"""What the fourth hostile round found, each held here: ranks agree before
trusting a record, a user's pass is never trusted from one, a rewrite that
raises half-way is restored, and the CLI names its own flags."""

import shutil
from dataclasses import replace
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import pytest
from helpers import assert_same_bits, launch, run, snapshot

import graphpatch
from graphpatch import PassSpecError, sites, trust
from graphpatch.contract import (
    Pass,
    Proof,
    Site,
    mark_at,
    marked,
    module_at,
    unmark_at,
    walk,
)
from graphpatch.saving import NOT_REOPENED


class Halved:
    def __call__(self, x: mx.array) -> mx.array:
        return super().__call__(x)  # type: ignore[misc]


def norms(model, options, context):
    return [Site(p, "norm") for p, m in walk(model) if isinstance(m, nn.RMSNorm)]


def _pass(name: str = "halved_norm", rewrite=None) -> Pass:
    def marks(model, site, options, context):
        mark_at(model, site.path, Halved)

    def probe(model, site, options, context):
        norm = module_at(model, site.path)
        x = mx.ones((1, 2, norm.weight.shape[0]))
        return lambda: [module_at(model, site.path)(x)]

    return Pass(
        name=name,
        summary="marks every RMSNorm (its output unchanged)",
        find=norms,
        why_not=lambda model, site, options, context: None,
        rewrite=rewrite or marks,
        undo=unmark_at,
        applied=lambda model: marked(model, Halved),
        proof=Proof(probe),
    )


pytestmark = pytest.mark.usefixtures("fresh_user_passes")


def test_a_rewrite_that_raises_half_way_is_restored(load_zoo):
    def half(model, site, options, context):
        mark_at(model, site.path, Halved)
        raise RuntimeError("half-way")

    model, _ = load_zoo("llama")
    before = snapshot(model)
    for verify in (True, False):
        report = graphpatch.apply(model, [_pass(rewrite=half)], verify=verify)
        assert report.rewritten() == [] and marked(model, Halved) == []
        assert {s.reason for s in report.sites} == {
            "the rewrite raised RuntimeError: half-way; restored"
        }
    assert_same_bits(before, snapshot(model))


def test_a_users_pass_named_like_a_graphpatch_variable_is_refused(load_zoo):
    model, _ = load_zoo("llama")
    for name in ("verify", "passes", "report", "run_dir"):
        with pytest.raises(PassSpecError, match="name of another pass or of a"):
            graphpatch.apply(model, [_pass(name)])


def test_a_users_kill_switch_holds_the_first_time(load_zoo, monkeypatch):
    model, _ = load_zoo("llama")
    monkeypatch.setenv("GRAPHPATCH_HALVED_NORM", "0")
    report = graphpatch.apply(model, [_pass()])
    assert report.rewritten() == []
    assert "GRAPHPATCH_HALVED_NORM=0 switched halved_norm off" in report.warnings


def test_revert_undoes_what_an_earlier_object_of_the_name_rewrote(load_zoo):
    model, _ = load_zoo("llama")
    first = _pass()
    graphpatch.apply(model, [first])
    graphpatch.apply(model, [replace(_pass(), summary="reloaded")])
    assert len(graphpatch.revert(model)) == len(norms(model, {}, None))
    assert marked(model, Halved) == []


def test_a_users_pass_is_never_trusted_from_a_record(zoo_dir, tmp_path):
    model_dir = Path(shutil.copytree(zoo_dir("llama"), tmp_path / "model"))
    for _ in range(2):
        model, _ = graphpatch.load(model_dir, verify="never")
        report = trust.apply(model, [_pass()], model_dir, "cached")
        assert report.verified and not (
            report.record_used and report.record_used.trusted
        )


def test_the_cli_names_save_where_prepare_refuses(zoo_dir, tmp_path):
    out = tmp_path / "saved"
    args = ["apply", "--passes", "fuse_glu", zoo_dir("llama"), "--save", out]
    assert run(*args).exit_code == 0
    again = run(*args)
    assert again.exit_code == 2
    line = " ".join(again.output.split())
    assert (
        f"error: --save {out} is an earlier graphpatch save (--force replaces it)"
        in line
    )
    assert "source_dir" not in NOT_REOPENED


def test_ranks_trust_a_record_only_when_every_rank_holds_it(zoo_dir, tmp_path):
    """Rank 0 holds a record of the same key, rank 1 none (one machine per
    rank): both verify, rather than one trusting while the other runs the
    collectives of its checks; then, each holding one, both trust."""
    model_dir = str(zoo_dir("llama"))
    cache = str(tmp_path / "cache")
    first = launch("trust_agree.py", model_dir, cache)
    assert [r["verified"] for r in first] == [True, True]
    shutil.rmtree(f"{cache}-1")  # rank 1 loses its record
    second = launch("trust_agree.py", model_dir, cache)
    assert [r["verified"] for r in second] == [True, True]
    third = launch("trust_agree.py", model_dir, cache)
    assert [r["trusted"] for r in third] == [True, True]
    assert len({r["sum"] for r in first + second + third}) == 1


def test_a_collective_site_that_fails_on_one_rank_is_skipped_on_every_rank(zoo_dir):
    """One rank's probe raises before the rewrite, another rank's rewrite
    raises, one's confirm refuses and another's raises: the ranks agree before
    any runs the rewritten site's collectives and after each confirm, so every
    rank skips those sites, rewrites the rest, holds the same model, and ends."""
    ranks = launch("collective_fails.py", str(zoo_dir("llama")))
    first, second, third, fourth = (path for path, _ in ranks[0]["skipped"])
    assert [path for path, _ in ranks[1]["skipped"]] == [first, second, third, fourth]
    reasons = [dict(r["skipped"]) for r in ranks]
    assert reasons[0][first] == reasons[1][second] == sites.ANOTHER_RANK
    assert reasons[0][third] == reasons[1][fourth] == sites.ANOTHER_RANK
    assert "rank 1 cannot probe this one" in reasons[1][first]
    assert "rank 0 cannot rewrite this one" in reasons[0][second]
    assert reasons[1][third] == "rank 1 does not confirm this one"
    assert "rank 0 cannot confirm this one" in reasons[0][fourth]
    assert ranks[0]["rewritten"] == ranks[1]["rewritten"] != []
    assert all(r["checks"] == [True] for r in ranks)
