"""graphpatch: verified rewrite passes for MLX language models."""

import contextlib
import os
import signal
import sys
import threading
from typing import NoReturn

INTERRUPTED = "interrupted"  # all Ctrl-C says, whenever it comes (exit 130)


def interrupted() -> NoReturn:
    with contextlib.suppress(OSError, ValueError):
        print(INTERRUPTED, file=sys.stderr)
    raise SystemExit(130)


_interrupted = False


def _on_interrupt(signum: int, frame) -> None:
    """Ctrl-C as Python's own handler, remembered: finally blocks (a save's
    temporary directory) still run, and a Ctrl-C that an import swallows
    (some catch everything) is still seen once the imports are done."""
    global _interrupted
    _interrupted = True
    raise KeyboardInterrupt


if threading.current_thread() is threading.main_thread():
    signal.signal(signal.SIGINT, _on_interrupt)

try:  # the imports take seconds, and Ctrl-C may come during them
    import json as _json
    import time
    from pathlib import Path
    from typing import Annotated

    import typer
    import typer.core
    from rich.table import Table

    import graphpatch
    import graphpatch.cli_golden  # noqa: F401  (its commands join the app)
    import graphpatch.cli_run  # noqa: F401
    from graphpatch import cli_app, opening, saving, trust
    from graphpatch.cli_app import (
        Passes,
        app,
        err,
        fail,
        joined,
        out,
        verify_mode,
    )
    from graphpatch.contract import GraphpatchError, VerificationError
    from graphpatch.loading import model_path
    from graphpatch.outdir import saved_format
    from graphpatch.report import printable, stamped
except KeyboardInterrupt:
    interrupted()
if _interrupted:
    interrupted()


def _version(shown: bool) -> None:
    if shown:
        print(f"graphpatch {graphpatch.__version__}")
        raise typer.Exit()


@app.callback()
def main_options(
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_version, is_eager=True, help="print the version"
        ),
    ] = False,
) -> None:
    """Verified rewrite passes for MLX language models."""
    cli_app.json_errors = False  # each invocation's own: --json sets it


@app.command("version")
def version_cmd() -> None:
    """Print the version."""
    _version(True)


@app.command("list")
def list_passes(
    json: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
) -> None:
    """List the passes in the order they run."""
    if json:
        passes = [
            {
                "name": name,
                "env": p.env,
                "options": p.settings.defaults,
                "requires": list(p.requires),
                "summary": p.summary,
            }
            for name, p in graphpatch.PASSES.items()
        ]
        print(_json.dumps(stamped({"passes": passes}), indent=2))
        return
    table = Table()
    table.add_column("pass", no_wrap=True)
    table.add_column("env switch", no_wrap=True)  # copied by users: never cut
    table.add_column("options", overflow="fold")
    table.add_column("summary")
    for name, p in graphpatch.PASSES.items():
        options = ", ".join(f"{k}={v}" for k, v in p.settings.defaults.items())
        needs = f" (needs {', '.join(p.requires)})" if p.requires else ""
        table.add_row(name, p.env, options, p.summary + needs)
    out.print(table)


@app.command("apply")
def apply_cmd(
    model: Annotated[
        str,
        typer.Argument(
            metavar="MODEL", help="a model directory or Hugging Face repo id"
        ),
    ],
    passes: Passes = None,
    json: Annotated[
        bool, typer.Option("--json", help="print the report (or the error) as JSON")
    ] = False,
    verbose: Annotated[
        bool, typer.Option("--verbose", "-v", help="one row per site")
    ] = False,
    verify: Annotated[
        str,
        typer.Option(
            help="always (check every site and the logits), cached (trust a "
            "matching verification record) or never"
        ),
    ] = "always",
    no_verify: Annotated[
        bool, typer.Option("--no-verify", help="the same as --verify never")
    ] = False,
    save: Annotated[
        Path | None, typer.Option(help="write the patched model to this directory")
    ] = None,
    force: Annotated[
        bool, typer.Option(help="replace --save when it is an earlier graphpatch save")
    ] = False,
    max_shard_mb: Annotated[
        float, typer.Option(help="largest safetensors file --save writes")
    ] = 5120,
    save_format: Annotated[
        str,
        typer.Option(
            help="plain (mlx_lm.load opens it; graphpatch re-applies the passes) "
            "or fused (opens already fused, only through graphpatch)"
        ),
    ] = "plain",
) -> None:
    """Load MODEL, rewrite it, verify it, print the report.

    With --save, also write the patched model as a directory.
    """
    cli_app.json_errors = json
    specs = joined(passes)
    try:
        plan, warnings = graphpatch.resolve(specs or None)
        model_dir = model_path(model)
        if not plan:
            said = "".join(f"; {w}" for w in warnings)
            fail(
                "no passes chosen: name them with --passes (graphpatch list shows "
                f"them) or GRAPHPATCH_PASSES{said}"
            )
        if save is not None:
            shard_bytes = saving.max_shard_bytes(max_shard_mb)
            saving.check_format(save_format)
            for line in saving.prepare(model_dir, save, force):
                err.print(printable(line, 400), highlight=False, markup=False)
        verify = verify_mode("never" if no_verify else verify)
        start = time.perf_counter()
        with err.status(f"loading {model_dir}"):
            model, _ = graphpatch.load(model_dir, lazy=verify == "never", verify=verify)
        loaded = time.perf_counter() - start
        with err.status("applying and verifying") as status:
            report = trust.apply(
                model, specs or None, model_dir, verify, progress=status.update
            )
        report.load_seconds = loaded
    except VerificationError as e:
        if e.report is not None and not json:
            _print(e.report, json, verbose)
        fail(e, code=1, report=e.report)
    except GraphpatchError as e:
        fail(e)
    _print(report, json, verbose)
    if save is not None:
        try:
            with err.status(f"saving {save}") as status:
                graphpatch.save(
                    model,
                    model_dir,
                    save,
                    force,
                    shard_bytes,
                    status.update,
                    save_format,
                )
        except GraphpatchError as e:
            fail(e)
        err.print(f"saved {save}", highlight=False, soft_wrap=True)
        _carry(Path(save), report)


def _carry(save: Path, report: graphpatch.Report) -> None:
    """The save's first run trusts the verification it came from."""
    if saved_format(save) != "plain":
        return  # a fused save is opened into its structure, not re-applied
    config = _json.loads((save / "config.json").read_text())
    if trust.carry(save, opening.recorded(save, config), report):
        err.print("the save carries this verification", highlight=False)


def _print(report: graphpatch.Report, as_json: bool, verbose: bool) -> None:
    if as_json:
        print(report.to_json())
    else:
        report.print(out, verbose)


class OutputFailed(Exception):
    """Standard output could not be written (full, or its reader gone)."""


class _Guarded:
    """Standard output whose write errors are told apart from any other."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, text: str) -> int:
        try:
            return self.stream.write(text)
        except OSError as e:
            raise OutputFailed(e.strerror or str(e)) from None

    def flush(self) -> None:
        try:
            self.stream.flush()
        except OSError as e:
            raise OutputFailed(e.strerror or str(e)) from None

    def __getattr__(self, name: str):
        return getattr(self.stream, name)


def main() -> None:
    sys.stdout = _Guarded(sys.stdout)  # type: ignore[assignment]
    signal.signal(signal.SIGINT, _on_interrupt)
    try:
        app()
    except OutputFailed as e:  # >/dev/full: one line on stderr, not a traceback
        with contextlib.suppress(OSError, ValueError):
            print(f"error: cannot write the output: {e}", file=sys.stderr)
        os._exit(2)
    except SystemExit:
        if _interrupted:  # typer turns KeyboardInterrupt into a silent exit 130
            _end_interrupted()
        raise
    except KeyboardInterrupt:
        _end_interrupted()


def _end_interrupted() -> NoReturn:
    """The one line, then end now: every finally block has run, and a thread
    the interrupted work started (mlx-lm's server's generation thread, when
    Ctrl-C comes before its own handler) must not keep the process alive."""
    with contextlib.suppress(OSError, ValueError):
        print(INTERRUPTED, file=sys.stderr, flush=True)
        sys.stdout.flush()
    os._exit(130)


if __name__ == "__main__":
    main()
