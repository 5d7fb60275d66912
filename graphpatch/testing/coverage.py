"""Coverage: every architecture of the installed mlx-lm, rewritten and
verified, or skipped with a reason.

Each module of ``mlx_lm.models`` that defines ``Model`` and ``ModelArgs`` is
built from a small config derived from its ``ModelArgs`` fields (small sizes
for the fields every architecture shares, the dataclass defaults for the
rest), with seeded float32 weights. Then every pass is applied alone, and
all together, to a fresh copy, each verified against the unpatched model by
the manager. What cannot be built or run says why.

A pass that needs a group of ranks (``Pass.tensor_parallel``) is
checked over ``RANKS`` ranks simulated in one process by its own
``Proof.simulate``, and left out of "all", where one rank would rewrite
nothing.
"""

import contextlib
import io
import json
import os
import re
import subprocess
import sys
import textwrap
import traceback
import types
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn

import graphpatch
from graphpatch.contract import Pass
from graphpatch.passes import PASSES
from graphpatch.testing.hints import HINTS
from graphpatch.testing.small_configs import VOCAB, architectures, build

TOKENS = [[1, 7, 42, 5, 60, 3, 11, 2]]
RANKS = 2  # simulated for the passes that need ranks
RANKED = [p for p in PASSES.values() if p.tensor_parallel and p.proof.simulate]
# mlx-lm modules that import a package only to see that it is installed
# (olmo's comment: "availability probe") and never use it: an empty module
# stands in, so that the model code itself is what gets run.
PROBED = {"olmo": "hf_olmo"}
# Failures that are mlx-lm's, whatever the config: a text of the error, and
# the cause in a user's words.
UPSTREAM = {
    "No Metal back-end": "a Metal-only kernel in mlx-lm (Apple silicon only)",
    "Cannot perform inplace addition on an mlx.core.array and str": (
        "mlx-lm's attention adds the mask 'causal' (a string) to its scores, "
        "so no prompt of 2 or more tokens runs"
    ),
}


@dataclass
class PassCoverage:
    rewritten: int = 0
    skipped: list[str] = field(default_factory=list)
    max_error: float | None = None
    failed: str | None = None  # a verification error: a wrong rewrite caught


@dataclass
class Architecture:
    name: str
    built: bool = False
    reason: str | None = None  # why it could not be built or run
    passes: dict[str, PassCoverage] = field(default_factory=dict)


def _short(e: BaseException) -> str:
    frame = traceback.extract_tb(e.__traceback__)[-1]
    where = f"{frame.filename.rpartition('/')[2]}:{frame.lineno}"
    first = str(e).splitlines()[0][:120] if str(e) else ""
    return f"{type(e).__name__}: {first} ({where})"


def _not_built(e: BaseException) -> str:
    cause = next((c for text, c in UPSTREAM.items() if text in str(e)), None)
    if cause:
        return f"upstream, {cause}: {_short(e)}"
    return f"cannot build or run from a small config: {_short(e)}"


def cover(name: str) -> Architecture:
    """Build ``name``, run it, apply each pass alone and all of them. Meant
    for a child process (``cover_in_child``): it may add a ``PROBED`` module."""
    result = Architecture(name)
    if name in PROBED:
        sys.modules.setdefault(PROBED[name], types.ModuleType(PROBED[name]))
    printed = io.StringIO()  # what a module says before it exits
    try:
        with contextlib.redirect_stdout(printed):
            model = build(name)
        out = model(mx.array(TOKENS))
        mx.eval(out)
        vocab = HINTS.get(name, {}).get("vocab_size", VOCAB)
        if out.ndim != 3 or out.shape[-1] != vocab:
            result.reason = f"returns {tuple(out.shape)}, not (B, S, vocab) logits"
            return result
        # -inf is a masked token (phi3small's), NaN and +inf a broken config
        if (mx.isnan(out) | mx.isposinf(out)).any().item():
            result.reason = "its small config gives NaN or infinite logits"
            return result
        if not mx.array_equal(build(name)(mx.array(TOKENS)), out).item():
            result.reason = "two builds from the same seed give different logits here"
            return result
    except SystemExit:  # mlx-lm's module exits when an optional package is missing
        said = " ".join(printed.getvalue().split()) or "no message"
        result.reason = f"mlx-lm's module exits on import and says: {said}"
        return result
    except Exception as e:
        result.reason = _not_built(e)
        return result
    result.built = True
    together = [p for p in PASSES if p not in {r.name for r in RANKED}]
    for spec in [*together, "all"]:
        passes = together if spec == "all" else [spec]
        result.passes[spec] = _apply(build(name), passes, spec)
    for p in RANKED:
        result.passes[p.name] = _simulated(p, build(name))
    return result


def _simulated(p: Pass, model: nn.Module) -> PassCoverage:
    """``p`` over ``RANKS`` ranks simulated in one process."""
    coverage = PassCoverage()
    assert p.proof.simulate is not None  # RANKED holds only such passes
    try:
        checked = p.proof.simulate(model, RANKS, TOKENS)
    except Exception as e:
        coverage.failed = _short(e)
        return coverage
    coverage.rewritten = sum(c.reason is None for c in checked)
    coverage.skipped = sorted({f"{p.name}: {c.reason}" for c in checked if c.reason})
    errors = [c.max_error for c in checked if c.max_error is not None]
    coverage.max_error = max(errors) if errors else None
    return coverage


def _apply(model: nn.Module, passes: list[str], spec: str) -> PassCoverage:
    coverage = PassCoverage()
    try:
        report = graphpatch.apply(model, passes, probe=TOKENS)
    except graphpatch.VerificationError as e:
        coverage.failed = str(e)
        return coverage
    except Exception as e:
        coverage.failed = _short(e)
        return coverage
    names = passes if spec == "all" else [spec]
    sites = [s for s in report.sites if s.pass_name in names]
    coverage.rewritten = sum(s.status == "rewritten" for s in sites)
    coverage.skipped = sorted(
        {
            f"{s.pass_name}: {s.reason}"
            for s in sites
            if s.reason and s.status != "rewritten"
        }
    )
    errors = [s.max_error for s in sites if s.max_error is not None]
    coverage.max_error = max(errors) if errors else None
    return coverage


def cover_in_child(name: str, timeout: float = 300) -> Architecture:
    """``cover`` in a child process: an architecture that crashes the
    interpreter (a segfault, an exit on a missing dependency) or hangs is
    reported, not fatal."""
    command = [sys.executable, "-m", "graphpatch.testing.coverage", "--child", name]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return Architecture(name, reason=f"cannot build or run: timed out ({timeout}s)")
    if done.returncode != 0 or not done.stdout.strip():
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1][:120]
        return Architecture(
            name, reason=f"cannot build or run: exit {done.returncode} ({tail})"
        )
    data = json.loads(done.stdout.strip().splitlines()[-1])
    passes = {k: PassCoverage(**v) for k, v in data.pop("passes").items()}
    return Architecture(**data, passes=passes)


def run(
    names: list[str] | None = None, workers: int = 2, progress=None
) -> list[Architecture]:
    """Cover ``names`` (default: every architecture), ``workers`` at a time."""
    progress = progress or (lambda line: None)
    names = names or architectures()
    with ThreadPoolExecutor(workers) as pool:
        futures = {pool.submit(cover_in_child, name): name for name in names}
        for done, future in enumerate(as_completed(futures), 1):
            progress(f"[{done}/{len(names)}] {futures[future]}")
    return [future.result() for future in futures]


def as_dicts(results: list[Architecture]) -> list[dict]:
    return [asdict(r) for r in results]


# How every table markdown() makes begins: the mark of a file --write may
# replace without --force (docs/COVERAGE.md, rewritten by make coverage).
MARKER = "# Coverage\n\nGenerated by `graphpatch coverage` "


def written_here(path: Path) -> bool:
    """Whether the regular file ``path`` begins as a table of ours does."""
    try:
        with open(path, "rb") as f:
            return f.read(len(MARKER.encode())) == MARKER.encode()
    except OSError:
        return False


def write_table(path: Path, table: str) -> None:
    """Write ``table`` to ``path`` whole or not at all: a temporary file
    beside it, then renamed over it (a link's target is what is replaced).

    Raises:
        OSError: the directory cannot be written.
    """
    target = path.resolve()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.graphpatch-{os.getpid()}"
    try:
        tmp.write_text(table, encoding="utf-8")
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def markdown(results: list[Architecture]) -> str:
    import mlx_lm

    columns = [*PASSES, "all"]
    ranked = ", ".join(p.name for p in RANKED)
    lines = [
        "# Coverage",
        "",
        f"Generated by `graphpatch coverage` for mlx-lm {mlx_lm.__version__} "
        f"(mlx {mx.__version__}, {mx.default_device()}). Each architecture is "
        "built from a small config with seeded float32 weights; each pass is "
        "applied alone and all together, verified against the unpatched model. "
        "A cell gives the sites rewritten and the max error; `-` means none "
        "rewritten (the reasons are listed below the table); `FAILED` would "
        "be a wrong rewrite caught and rolled back. Here every model runs on "
        "one rank, so elide_head finds no pipeline to elide; "
        "`tests/test_elide_head.py` runs it on a 2-rank ring pipeline for "
        f"every pipelined architecture below. {ranked} needs ranks: it is "
        f"checked over {RANKS} ranks simulated in one process by its own "
        "`Proof.simulate` (each rank's rewrite built, run on the inputs the "
        "model fed the site, and the outputs combined as its collective "
        f"would), and `all` leaves {ranked} out; its own tests run it on "
        "real ring groups.",
        "",
        "| architecture | " + " | ".join(columns) + " |",
        "|---|" + "---|" * len(columns),
    ]
    for r in results:
        if not r.built:
            continue
        cells = [_cell(r.passes[c]) for c in columns]
        lines.append(f"| {r.name} | " + " | ".join(cells) + " |")
    built = [r for r in results if r.built]
    lines += ["", f"{len(built)} of {len(results)} architectures built and run."]
    for p in RANKED:
        rewritten = [r for r in built if r.passes[p.name].rewritten]
        lines += [
            "",
            f"{len(rewritten)} of {len(built)} built architectures rewritten by "
            f"{p.name} over {RANKS} ranks (at least one site, every one verified).",
        ]
    lines += [""]
    lines += ["## Skipped sites, by reason", ""]
    reasons: dict[str, list[str]] = {}
    for r in built:
        ranked_skips = [s for p in RANKED for s in r.passes[p.name].skipped]
        for reason in r.passes["all"].skipped + ranked_skips:
            reasons.setdefault(reason, []).append(r.name)
    for reason, names in sorted(reasons.items()):
        lines.append(f"- {reason}: {', '.join(names)}")
    lines += [
        "",
        "Float16 and bfloat16 MoE models cannot run on the CPU backend (its "
        "gather_mm is float32 only): `apply` refuses them with that error before "
        "anything changes; on a GPU they run and are verified like any other.",
    ]
    lines += ["", "## Not built", ""]
    lines += [f"- {r.name}: {r.reason}" for r in results if not r.built]
    return "\n".join(lines) + "\n"


README_START = "<!-- built: generated from docs/COVERAGE.md by `make coverage` -->"
README_END = "<!-- end built -->"


def readme_section(table: str) -> str:
    """The README's list of built architectures, from docs/COVERAGE.md."""
    rows = [line for line in table.splitlines() if line.startswith("| ")]
    built = [row.split(" | ")[0][2:] for row in rows[1:]]  # after the header
    not_built = table.partition("## Not built")[2].split("\n- ")[1:]
    total = len(built) + len(not_built)
    version = table.split("for mlx-lm ")[1].split()[0]
    names = textwrap.fill(
        ", ".join(built), 79, break_long_words=False, break_on_hyphens=False
    )
    # "- name: upstream, cause: the error" -> "- name: cause"
    missing = []
    for line in not_built:
        name, _, reason = line.partition(": ")
        cause, _, _ = reason.removeprefix("upstream, ").partition(": ")
        missing.append(f"- {name}: {cause}")
    ranked = re.findall(
        r"(\d+) of \d+ built architectures rewritten by (\w+) over (\d+) ranks", table
    )
    over = "".join(
        f", and {n} of them rewritten by {p} over {k} ranks" for n, p, k in ranked
    )
    return (
        f"{README_START}\nWith mlx-lm {version}, {len(built)} of {total} are "
        f"built and verified, with no wrong rewrite{over}:\n\n{names}\n\n"
        f"Not built ({len(not_built)}):\n\n" + "\n".join(missing) + f"\n{README_END}"
    )


def update_readme(readme: str, table: str) -> str:
    """``readme`` with its generated section replaced from ``table``."""
    before, _, rest = readme.partition(README_START)
    _, _, after = rest.partition(README_END)
    return before + readme_section(table) + after


def _cell(c: PassCoverage) -> str:
    if c.failed:
        return "FAILED"
    if not c.rewritten:
        return "-"
    error = "" if c.max_error is None else f" ({c.max_error:.2g})"
    return f"{c.rewritten}{error}"


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:
        print(json.dumps(asdict(cover(sys.argv[2]))))
    elif sys.argv[1:2] == ["--readme"]:  # README.md from docs/COVERAGE.md
        readme, table = (open(path).read() for path in sys.argv[2:4])
        with open(sys.argv[2], "w") as f:
            f.write(update_readme(readme, table))
    else:
        progress = lambda line: print(line, file=sys.stderr)  # noqa: E731
        print(markdown(run(sys.argv[1:] or None, progress=progress)))
