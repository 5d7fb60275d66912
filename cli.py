"""The graphpatch command: parses, calls the library, prints. Nothing else."""

import json as _json
import os
import shutil
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

import graphpatch
from graphpatch import golden
from graphpatch.contract import GraphpatchError, VerificationError
from graphpatch.loading import load

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help=__doc__,
)
# Piped output (logs, CI) gets a wide table rather than rich's 80 columns.
out = Console(width=None if Console().is_terminal else 120)
err = Console(stderr=True)


def fail(message: str, code: int = 2) -> None:
    err.print(f"[red]error:[/red] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


@app.command("list")
def list_passes() -> None:
    """List the passes in the order they run."""
    table = Table()
    for column in ("pass", "env switch", "options", "summary"):
        table.add_column(column)
    for name, p in graphpatch.PASSES.items():
        options = ", ".join(f"{k}={v}" for k, v in p.options.items())
        needs = f" (needs {', '.join(p.requires)})" if p.requires else ""
        table.add_row(name, p.env, options, p.summary + needs)
    out.print(table)


@app.command("apply")
def apply_cmd(
    model_dir: Annotated[Path, typer.Argument(help="a local mlx-lm model directory")],
    passes: Annotated[
        str, typer.Option(help="comma-separated, e.g. fuse_glu,last_token:keep=2")
    ] = "",
    json: Annotated[
        bool, typer.Option("--json", help="print the report as JSON")
    ] = False,
    verify: Annotated[
        bool, typer.Option(help="check every site and the logits")
    ] = True,
    save: Annotated[
        Path | None, typer.Option(help="write the patched model to this directory")
    ] = None,
    force: Annotated[bool, typer.Option(help="replace an existing --save")] = False,
    max_shard_mb: Annotated[
        float, typer.Option(help="largest safetensors file --save writes")
    ] = 5120,
) -> None:
    """Load MODEL_DIR, rewrite it, verify it, print the report.

    With --save, also write the patched model as a directory.
    """
    try:
        graphpatch.resolve(passes or None)
        if save is not None and save.exists() and not force:
            fail(f"{save} exists (use --force to replace it)")
        with err.status(f"loading {model_dir}"):
            model, _, _ = load(model_dir, lazy=not verify)
        with err.status("applying and verifying") as status:
            report = graphpatch.apply(
                model,
                passes or None,
                verify=verify,
                progress=status.update,
                model_dir=str(model_dir),
            )
    except VerificationError as e:
        if e.report is not None:
            _print(e.report, json)
        fail(str(e), code=1)
    except GraphpatchError as e:
        fail(str(e))
    _print(report, json)
    if save is not None:
        try:
            with err.status(f"saving {save}") as status:
                graphpatch.save(
                    model,
                    model_dir,
                    save,
                    passes or None,
                    force,
                    int(max_shard_mb * 2**20),
                    status.update,
                )
        except GraphpatchError as e:
            fail(str(e))
        err.print(f"saved {save}", highlight=False)


def _print(report: graphpatch.Report, as_json: bool) -> None:
    if as_json:
        print(report.to_json())
    else:
        report.print(out)


@app.command(
    "run",
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
)
def run_cmd(
    ctx: typer.Context,
    passes: Annotated[
        str, typer.Option(help="comma-separated; default: GRAPHPATCH_PASSES")
    ] = "",
) -> None:
    """Run a program (after --) with every model it loads patched.

    Models loaded through mlx-lm's loaders are patched, in child processes too.
    """
    _run(ctx.args, passes)


@app.command("serve")
def serve_cmd(
    model_dir: Annotated[Path, typer.Argument(help="a local mlx-lm model directory")],
    passes: Annotated[
        str, typer.Option(help="comma-separated; default: GRAPHPATCH_PASSES")
    ] = "",
    host: Annotated[str, typer.Option(help="address to listen on")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="port to listen on")] = 8080,
) -> None:
    """mlx-lm's own server with the patched model: run -- mlx_lm server."""
    server = [sys.executable, "-m", "mlx_lm", "server", "--model", str(model_dir)]
    _run([*server, "--host", host, "--port", str(port)], passes)


def _run(command: list[str], passes: str) -> None:
    if not command:
        fail("no command: graphpatch run [--passes a,b] -- CMD ARGS...")
    env = dict(os.environ)
    if passes:
        env["GRAPHPATCH_PASSES"] = passes
    try:
        plan, _ = graphpatch.resolve(None, env)
    except GraphpatchError as e:
        fail(str(e))
    if any(p.name == "elide_head" and not o["logits"] for p, o in plan):
        fail(
            "elide_head needs elide_head.sampler(...) where the program samples, "
            "which graphpatch run cannot add: use elide_head:logits (rank 0's "
            "logits reach every rank), or apply it from your runtime"
        )
    if not plan:
        err.print("warning: no passes chosen (--passes or GRAPHPATCH_PASSES)")
    if shutil.which(command[0]) is None:
        fail(f"command not found: {command[0]}", code=127)
    from graphpatch import hook

    startup = str(Path(graphpatch.__file__).parent / "_startup")
    raise typer.Exit(hook.run(command, env, startup))


@app.command("coverage")
def coverage_cmd(
    names: Annotated[
        list[str] | None, typer.Argument(help="architectures (default: all)")
    ] = None,
    json: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
    write: Annotated[
        Path | None, typer.Option(help="also write the markdown table here")
    ] = None,
) -> None:
    """Which architectures each pass rewrites, verified, or why not.

    Builds every architecture of the installed mlx-lm from a small config.
    """
    from graphpatch import coverage

    known = coverage.architectures()
    unknown = [n for n in names or [] if n not in known]
    if unknown:
        fail(f"not an mlx-lm architecture: {', '.join(unknown)}")
    with err.status("building architectures") as status:
        results = coverage.run(names or None, progress=status.update)
    table = coverage.markdown(results)
    if write is not None:
        write.parent.mkdir(parents=True, exist_ok=True)
        write.write_text(table)
    if json:
        print(_json.dumps(coverage.as_dicts(results), indent=2))
    else:
        out.print(table, highlight=False, markup=False)


golden_app = typer.Typer(no_args_is_help=True, help="Record and check golden logits.")
app.add_typer(golden_app, name="golden")


@golden_app.command("record")
def golden_record(
    model_dir: Annotated[Path, typer.Argument(help="a local mlx-lm model directory")],
    out_file: Annotated[
        Path, typer.Argument(metavar="OUT", help="the golden .safetensors to write")
    ],
    passes: Annotated[str, typer.Option(help="passes to apply first")] = "",
    prompts: Annotated[
        Path | None, typer.Option(help="a text file, one prompt per line")
    ] = None,
) -> None:
    """Write the logits of fixed prompts (and their metadata) to OUT."""
    try:
        texts = None
        if prompts is not None:
            if not prompts.is_file():
                fail(f"{prompts}: no such file")
            texts = [line for line in prompts.read_text().splitlines() if line]
        file = golden.record(model_dir, out_file, passes, texts)
    except GraphpatchError as e:
        fail(str(e))
    out.print(f"wrote {file}", highlight=False)


@golden_app.command("check")
def golden_check(
    model_dir: Annotated[Path, typer.Argument(help="the model the file is of")],
    file: Annotated[Path, typer.Argument(help="a golden file from golden record")],
    passes: Annotated[
        str | None, typer.Option(help="default: the passes it was recorded with")
    ] = None,
) -> None:
    """Recompute and compare: exit 0 within tolerance, 1 with the diff."""
    try:
        result = golden.check(model_dir, file, passes)
    except GraphpatchError as e:
        fail(str(e))
    for line in result.lines:
        out.print(line, highlight=False, soft_wrap=True)
    raise typer.Exit(0 if result.ok else 1)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
