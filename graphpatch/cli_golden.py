"""``graphpatch golden`` and ``graphpatch coverage``: recorded logits, and
which architectures each pass rewrites."""

import json as _json
import os
from pathlib import Path
from typing import Annotated

import typer

from graphpatch import golden
from graphpatch.checks import regular_file
from graphpatch.cli_app import app, err, fail, joined, out
from graphpatch.contract import GraphpatchError
from graphpatch.loading import model_path

COVERAGE_NOT_OURS = (
    "exists and is not a table graphpatch coverage wrote: give --force to replace it"
)


@app.command("coverage")
def coverage_cmd(
    names: Annotated[
        list[str] | None, typer.Argument(help="architectures (default: all)")
    ] = None,
    json: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
    write: Annotated[
        Path | None, typer.Option(help="also write the markdown table here")
    ] = None,
    force: Annotated[
        bool, typer.Option(help="let --write replace a file it did not write")
    ] = False,
) -> None:
    """Which architectures each pass rewrites, verified, or why not.

    Builds every architecture of the installed mlx-lm from a small config.
    """
    from graphpatch.testing import coverage

    known = coverage.architectures()
    unknown = [n for n in names or [] if n not in known]
    if unknown:
        fail(f"not an mlx-lm architecture: {', '.join(unknown)}")
    if write is not None:
        _check_write(write, force)
    with err.status("building architectures") as status:
        results = coverage.run(names or None, progress=status.update)
    table = coverage.markdown(results)
    if write is not None:
        _check_write(write, force)  # again: it may have appeared meanwhile
        try:
            coverage.write_table(write, table)
        except OSError as e:
            fail(f"--write {write}: cannot be written ({e.strerror})")
    if json:
        print(_json.dumps(coverage.as_dicts(results), indent=2))
    else:  # markdown, whole: never wrapped to the terminal's width
        print(table, end="" if table.endswith("\n") else "\n")


def _check_write(write: Path, force: bool) -> None:
    """Before the (long) build: --write names a file that may be written, and
    replaced only when graphpatch coverage wrote it, or with --force."""
    from graphpatch.testing import coverage

    if write.is_dir() or not _writable_dir(write.parent):
        fail(f"--write {write}: not a file in a writable directory")
    if write.exists() and not write.is_file():
        fail(f"--write {write}: not a regular file")
    if write.exists() and not force and not coverage.written_here(write):
        fail(f"--write {write}: {COVERAGE_NOT_OURS}")


def _writable_dir(path: Path) -> bool:
    existing = next((p for p in (path, *path.parents) if p.exists()), Path("/"))
    return existing.is_dir() and os.access(existing, os.W_OK)


golden_app = typer.Typer(no_args_is_help=True, help="Record and check golden logits.")
app.add_typer(golden_app, name="golden")


@golden_app.command("record")
def golden_record(
    model: Annotated[
        str,
        typer.Argument(
            metavar="MODEL", help="a model directory or Hugging Face repo id"
        ),
    ],
    out_file: Annotated[
        Path, typer.Argument(metavar="OUT", help="the golden .safetensors to write")
    ],
    passes: Annotated[
        list[str] | None, typer.Option(help="passes to apply first (may be repeated)")
    ] = None,
    prompts: Annotated[
        Path | None, typer.Option(help="a text file, one prompt per line")
    ] = None,
) -> None:
    """Write the logits of fixed prompts (and their metadata) to OUT."""
    try:
        texts = None if prompts is None else _read_prompts(prompts)
        file = golden.record(model_path(model), out_file, joined(passes), texts)
    except GraphpatchError as e:
        fail(e)
    out.print(f"wrote {file}", highlight=False, soft_wrap=True)


def _read_prompts(file: Path) -> list[str]:
    try:
        text = regular_file(file, "prompts file").read_text(encoding="utf-8")
    except UnicodeDecodeError:
        fail(f"{file}: not UTF-8 text (one prompt per line)")
    except OSError as e:
        fail(f"{file}: cannot be read ({e.strerror})")
    texts = [line for line in text.splitlines() if line.strip()]
    if not texts or "\0" in text:
        fail(f"{file}: no prompts (one per line)" if not texts else f"{file}: binary")
    return texts


@golden_app.command("check")
def golden_check(
    model: Annotated[
        str,
        typer.Argument(
            metavar="MODEL", help="a model directory or Hugging Face repo id"
        ),
    ],
    file: Annotated[Path, typer.Argument(help="a golden file from golden record")],
    passes: Annotated[
        list[str] | None,
        typer.Option(help="default: the passes it was recorded with (may be repeated)"),
    ] = None,
) -> None:
    """Recompute and compare: exit 0 within tolerance, 1 with the diff."""
    try:
        specs = None if passes is None else joined(passes)
        result = golden.check(model_path(model), file, specs)
    except GraphpatchError as e:
        fail(e)
    for line in result.lines:  # golden made its values from the file printable
        out.print(line, highlight=False, soft_wrap=True, markup=False)
    raise typer.Exit(0 if result.ok else 1)
