"""elide_head: pipeline ranks other than 0 skip the LM head, every rank still
gets the token. Distributed cases run 2 ranks of a ring group on localhost."""

import importlib
import pkgutil
from pathlib import Path

import mlx.core as mx
import mlx_lm.models
import pytest
from helpers import launch

import graphpatch
from graphpatch.passes import elide_head, last_token
from graphpatch.passes.elide_head import pipeline

HEAD_BYTES = 512 * 128 * 4  # vocab x hidden, float32


def test_a_checkpoint_that_mixes_bit_widths(zoo_dir):
    """8-bit embedding and head over 4-bit layers and a float layer. (With
    float16 scales under float32 norms, mlx-lm 0.32's pipeline itself breaks:
    recv_like takes the embedding's float16 for the float32 h the other rank
    sends, and the logits are NaN; graphpatch refuses such a model.)"""
    model_dir = str(zoo_dir("qwen3_moe", quant="mixed"))
    plain = launch("pipeline_generate.py", model_dir, "0.0", "plain")
    elided = launch("pipeline_generate.py", model_dir, "0.0", "elided")
    expected = plain[0]["tokens"]
    assert len(expected) == 8 and [r["tokens"] for r in elided] == [expected] * 2
    final, other = elided
    assert (final["kind"], other["kind"]) == ("final", "elided")
    assert other["freed"] > 0 and abs(final["freed"]) < 1024


@pytest.mark.parametrize(
    "name, temp, note",
    [
        ("qwen3_moe", 0.0, pipeline.RELEASED.format(mib=HEAD_BYTES / 2**20)),
        ("qwen3_moe", 0.8, pipeline.RELEASED.format(mib=HEAD_BYTES / 2**20)),
        ("qwen2", 0.8, pipeline.TIED),
        ("deepseek_v3", 0.0, pipeline.RELEASED.format(mib=HEAD_BYTES / 2**20)),
    ],
)
def test_every_rank_gets_the_same_tokens(zoo_dir, name, temp, note):
    model_dir = str(zoo_dir(name))
    plain = launch("pipeline_generate.py", model_dir, str(temp), "plain")
    elided = launch("pipeline_generate.py", model_dir, str(temp), "elided")
    expected = plain[0]["tokens"]
    assert len(expected) == 8 and plain[1]["tokens"] == expected
    assert [r["tokens"] for r in elided] == [expected, expected]
    final, other = elided
    assert (final["kind"], final["note"]) == ("final", None)
    assert (other["kind"], other["note"]) == ("elided", note)
    freed = 0 if note == pipeline.TIED else HEAD_BYTES
    assert abs(final["freed"]) < 1024 and abs(other["freed"] - freed) < 1024
    assert other.get("restored", True) and "restored" not in final
    assert ("restored" in other) == (note != pipeline.TIED)
    assert final["gather"] == other["gather"] == ["gather", "rewritten", None]
    assert final["again"] == other["again"] == [elide_head.ALREADY_APPLIED] * 2
    assert final["logits"] == other["logits"] == [1, 3, 512]


@pytest.mark.parametrize(
    "mode, reason",
    [("gathered", elide_head.GATHER_KEPT), ("stubborn", elide_head.STILL_GATHERS)],
)
def test_the_gather_stays_when_asked_or_when_it_cannot_be_dropped(
    zoo_dir, mode, reason
):
    model_dir = str(zoo_dir("qwen2", tie_word_embeddings=False))
    plain = launch("pipeline_generate.py", model_dir, "0.8", "plain")
    elided = launch("pipeline_generate.py", model_dir, "0.8", mode)
    expected = plain[0]["tokens"]
    assert [r["tokens"] for r in plain + elided] == [expected] * 4
    assert [r["status"] for r in elided] == ["rewritten"] * 2
    assert [r["gather"] for r in elided] == [["gather", "skipped", reason]] * 2


def test_with_logits_each_rank_samples_rank_0s_logits_itself(zoo_dir):
    model_dir = str(zoo_dir("qwen3_moe"))
    plain = launch("pipeline_generate.py", model_dir, "0.8", "plain")
    shared = launch("pipeline_generate.py", model_dir, "0.8", "logits")
    expected = plain[0]["tokens"]
    assert [r["tokens"] for r in plain + shared] == [expected] * 4
    final, other = shared
    assert other["note"] == pipeline.RELEASED.format(mib=HEAD_BYTES / 2**20)
    assert abs(other["freed"] - HEAD_BYTES) < 1024
    assert final["logits"] == other["logits"] == [1, 3, 512]  # a short call: all
    assert final["top"] == other["top"]
    # a second apply: every rank skips last_token, so none runs its probe alone
    assert final["again_last_token"] == [last_token.HEAD_ELIDED]
    assert other["again_last_token"] == [last_token.HEAD_ELIDED]
    assert final["gather"] == other["gather"] == ["gather", "rewritten", None]


def test_three_ranks_all_get_rank_0s_token(zoo_dir):
    model_dir = str(zoo_dir("qwen3_moe", num_hidden_layers=3))
    plain = launch("pipeline_generate.py", model_dir, "0.8", "plain", n=3)
    elided = launch("pipeline_generate.py", model_dir, "0.8", "elided", n=3)
    expected = plain[0]["tokens"]
    assert [r["tokens"] for r in plain + elided] == [expected] * 6
    assert [r["kind"] for r in elided] == ["final", "elided", "elided"]
    assert [r["gather"] for r in elided] == [["gather", "rewritten", None]] * 3
    assert [abs(r["freed"] - HEAD_BYTES) < 1024 for r in elided] == [False, True, True]


# Every architecture of the installed mlx-lm with a PipelineMixin body, and
# the wrappers around one, built from the coverage's small configs.
PIPELINED = {
    "bailing_hybrid": 4,  # layers: each rank needs a whole group of 2
    "deepseek_v2": None,
    "deepseek_v3": None,
    "deepseek_v32": None,
    "deepseek_v41": None,
    "glm4_moe": None,
    "glm4_moe_lite": None,
    "kimi_k25": None,
    "kimi_vl": None,
    "minimax_m3_vl": None,
    "ministral3": None,
    "mistral4": None,
    "qwen2": None,
    "qwen2_vl": None,
    "qwen3_5": None,
    "qwen3_5_moe": None,
    "qwen3_moe": None,
    "qwen3_next": None,
    "qwen3_vl_moe": None,
}
METAL_ONLY = {"muse_spark"}  # its qk_norm_rope kernel has no CPU path


def test_the_table_names_every_pipelined_architecture():
    pipelined = set()
    for info in pkgutil.iter_modules(mlx_lm.models.__path__):
        origin = importlib.util.find_spec(f"mlx_lm.models.{info.name}").origin
        if "(PipelineMixin" in Path(origin).read_text():
            pipelined.add(info.name)
    assert pipelined - METAL_ONLY <= PIPELINED.keys()


@pytest.mark.parametrize("name", PIPELINED)
def test_every_pipelined_architecture_drops_head_and_gather(name):
    layers = [str(PIPELINED[name])] if PIPELINED[name] else []
    ranks = launch("pipeline_zoo.py", name, *layers)
    expected = ranks[0]["plain"]
    assert [r["plain"] for r in ranks] == [r["elided"] for r in ranks] == [expected] * 2
    assert [r["sites"] for r in ranks] == [
        [["final", "rewritten", None], ["gather", "rewritten", None]],
        [["elided", "rewritten", None], ["gather", "rewritten", None]],
    ]


def test_ranks_that_disagree_on_the_passes_both_fail_cleanly(zoo_dir):
    ranks = launch("pipeline_generate.py", str(zoo_dir("qwen2")), "0", "disagree")
    for r in ranks:
        assert "the 2 ranks disagree on the passes" in r["error"]


def test_models_that_are_not_pipelined_are_skipped(load_zoo):
    model, _ = load_zoo("llama")  # no PipelineMixin
    (site,) = graphpatch.apply(model, ["elide_head"]).skipped("elide_head")
    assert site.reason == elide_head.NOT_PIPELINED
    model, _ = load_zoo("qwen2")
    model.model.pipeline(mx.distributed.init())  # a group of one
    (site,) = graphpatch.apply(model, ["elide_head"]).skipped("elide_head")
    assert site.reason == elide_head.ONE_RANK


def test_a_pipeline_on_another_group_is_one_error_and_nothing_touched(load_zoo):
    model, _ = load_zoo("qwen2")
    # What model.model.pipeline(group) leaves on rank 1 of a 2-rank group,
    # in a process whose global group has one rank (verify=False: this
    # model cannot run its forward, a real one on a subgroup would).
    model.model.pipeline_rank, model.model.pipeline_size = 1, 2
    with pytest.raises(elide_head.ElideError, match="pipelined over 2 ranks"):
        graphpatch.apply(model, ["elide_head"], verify=False)
    assert graphpatch.PASSES["untied_head"].applied(model) == []


def test_sampler_is_the_plain_sampler_on_one_rank():
    logprobs = mx.array([[0.1, 2.0, -1.0], [3.0, 0.0, 0.5]])
    assert elide_head.sampler()(logprobs).tolist() == [1, 0]
