"""The coverage table: docs/COVERAGE.md stays true for the pinned mlx-lm.

CI re-runs a subset that spans the cases (dense, MoE, tied, inline head,
already fused, recurrent, hybrid SSM, w1/w3 GLU, -inf masks, the popular
families the README names, modules that cannot be built); ``make coverage``
regenerates the whole table (about two minutes on 2 cores).
"""

import importlib.util
from pathlib import Path

from helpers import run

from graphpatch.testing import coverage

TABLE = Path(__file__).parent.parent / "docs" / "COVERAGE.md"
SUBSET = [
    "llama",
    "qwen3_moe",
    "gemma2",
    "phi3",
    "seed_oss",
    "mamba",
    "deepseek_v3",
    "gpt_neox",
    "olmo",
    "gemma3",
    "gemma3_text",
    "gpt_oss",
    "llama4",
    "llama4_text",
    "jamba",
    "phi3small",  # masks tokens with -inf in its logits
    "muse_spark",
    "internlm2",  # a GLU named w1/w2/w3
    "starcoder2",  # a plain MLP with biases, sharded
]


def entries(text: str) -> dict[str, str]:
    """architecture -> its table row or its "Not built" line."""
    table, _, not_built = text.partition("## Not built")
    found = {}
    for line in table.splitlines():
        if line.startswith("| ") and not line.startswith("| architecture"):
            found[line.split(" | ")[0][2:]] = line
    for line in not_built.splitlines():
        if line.startswith("- "):
            found[line[2:].split(":")[0]] = line
    return found


def test_the_checked_in_table_is_true_for_a_subset():
    checked_in = entries(TABLE.read_text())
    now = entries(coverage.markdown(coverage.run(SUBSET)))
    for name in SUBSET:
        assert now[name] == checked_in[name], name


def test_a_probed_package_is_only_imported_never_used():
    for name, package in coverage.PROBED.items():
        spec = importlib.util.find_spec(f"mlx_lm.models.{name}")
        lines = Path(spec.origin).read_text().splitlines()
        assert [line.strip() for line in lines if package in line] == [
            f"import {package}  # noqa: F401  # availability probe"
        ]


def test_no_architecture_has_a_wrong_rewrite():
    rows = [line for line in TABLE.read_text().splitlines() if line.startswith("| ")]
    assert len(rows) > 60
    assert not [row for row in rows if "FAILED" in row]


def test_shard_covers_at_least_100_architectures():
    rows = [line for line in TABLE.read_text().splitlines() if line.startswith("| ")]
    column = rows[0].split(" | ").index("shard")
    sharded = [row for row in rows[1:] if row.split(" | ")[column] != "-"]
    assert len(sharded) >= 100
    assert (
        f"{len(sharded)} of {len(rows) - 1} built architectures rewritten by shard"
        in (TABLE.read_text())
    )


def test_unknown_architectures_are_one_line():
    result = run("coverage", "llama", "not_a_model")
    assert result.exit_code == 2
    assert "not an mlx-lm architecture: not_a_model" in result.output


def test_the_readme_lists_exactly_the_built_architectures():
    readme = (TABLE.parent.parent / "README.md").read_text()
    assert coverage.readme_section(TABLE.read_text()) in readme


def test_every_architecture_not_built_fails_inside_mlx_lm():
    not_built = TABLE.read_text().partition("## Not built")[2].split("\n- ")[1:]
    assert 0 < len(not_built) <= 6
    assert [line for line in not_built if ": upstream, " not in line] == []
