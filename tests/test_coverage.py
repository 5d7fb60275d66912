"""The coverage table: docs/COVERAGE.md stays true for the pinned mlx-lm.

CI re-runs a subset that spans the cases (dense, MoE, tied, inline head,
already fused, recurrent, a module that cannot be built); ``make coverage``
regenerates the whole table (about a minute on 2 cores).
"""

from pathlib import Path

from test_cli import run

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
    "gemma3_text",
    "gpt_oss",
    "llama4_text",
    "jamba",
]


def entries(text: str) -> dict[str, str]:
    """architecture -> its table row or its "Not built" line."""
    found = {}
    for line in text.splitlines():
        if line.startswith("| ") and not line.startswith("| architecture"):
            found[line.split(" | ")[0][2:]] = line
        elif line.startswith("- ") and ": " in line and "," not in line[:40]:
            found.setdefault(line[2:].split(":")[0], line)
    return found


def test_the_checked_in_table_is_true_for_a_subset():
    checked_in = entries(TABLE.read_text())
    now = entries(coverage.markdown(coverage.run(SUBSET)))
    for name in SUBSET:
        assert now[name] == checked_in[name], name


def test_no_architecture_has_a_wrong_rewrite():
    rows = [line for line in TABLE.read_text().splitlines() if line.startswith("| ")]
    assert len(rows) > 60
    assert not [row for row in rows if "FAILED" in row]


def test_unknown_architectures_are_one_line():
    result = run("coverage", "llama", "not_a_model")
    assert result.exit_code == 2
    assert "not an mlx-lm architecture: not_a_model" in result.output


def test_the_readme_lists_exactly_the_built_architectures():
    readme = (TABLE.parent.parent / "README.md").read_text()
    listed = readme.split("<!-- built: generated from docs/COVERAGE.md -->")[1]
    listed = listed.split("<!-- end built -->")[0]
    rows = [v for v in entries(TABLE.read_text()).values() if v.startswith("| ")]
    built = [row.split(" | ")[0][2:] for row in rows]
    assert listed.split() == [f"{name}," for name in built[:-1]] + [built[-1]]
    assert f"{len(built)} of 124 are" in readme
