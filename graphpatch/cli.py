"""graphpatch: verified rewrite passes for MLX language models."""

import contextlib
import os
import signal
import sys
from typing import NoReturn

INTERRUPTED = "interrupted"  # all Ctrl-C says, whenever it comes (exit 130)


def interrupted() -> NoReturn:
    with contextlib.suppress(OSError, ValueError):
        print(INTERRUPTED, file=sys.stderr)
    raise SystemExit(130)


try:  # the imports take seconds, and Ctrl-C may come during them
    import json as _json
    import shutil
    import stat
    import time
    from pathlib import Path
    from typing import Annotated

    import typer
    import typer.core
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    import graphpatch
    from graphpatch import golden, opening, saving, trust
    from graphpatch.checks import (
        check_config,
        check_weights,
        read_config,
        regular_file,
    )
    from graphpatch.contract import GraphpatchError, VerificationError
    from graphpatch.loading import model_path
    from graphpatch.outdir import saved_format
    from graphpatch.plan import unknown_variables
    from graphpatch.report import printable, stamped
    from graphpatch.run_hook import FUSED
except KeyboardInterrupt:
    interrupted()

_option_type = typer.core.TyperOption.display_type_rich


def _flag_takes_no_value(self, ctx) -> str | None:
    return None if self.is_flag else _option_type(self, ctx)


# typer 0.29's help shows every flag as taking a value (--json <bool>).
setattr(typer.core.TyperOption, "display_type_rich", _flag_takes_no_value)  # noqa: B010

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help=__doc__,
)


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
    global _json_errors
    _json_errors = False  # each invocation's own: a command given --json sets it


@app.command("version")
def version_cmd() -> None:
    """Print the version."""
    _version(True)


# The terminal's width, or COLUMNS, or 80 columns when piped: the report keeps
# every column down to 80.
out = Console()
err = Console(stderr=True)
_json_errors = False  # set by commands given --json: errors go to stdout as JSON


# The library names the argument at fault; the CLI names its flag.
FLAGS = {
    "out": "--save",
    "format": "--save-format",
    "max_shard_mb": "--max-shard-mb",
    "verify": "--verify",
}
FLAG_WORDS = {"(force replaces it)": "(--force replaces it)"}


def in_flags(error: BaseException) -> str:
    """A library error in the CLI's words."""
    message, argument = str(error), getattr(error, "argument", None)
    if argument in FLAGS and message.startswith(f"{argument} "):
        message = FLAGS[argument] + message[len(argument) :]
    for words, flagged in FLAG_WORDS.items():
        message = message.replace(words, flagged)
    return message


def fail(
    message: str | BaseException,
    code: int = 2,
    report: graphpatch.Report | None = None,
) -> NoReturn:
    """One line on stderr, then exit: 2 for bad input, 1 for a failed check."""
    if isinstance(message, BaseException):
        message = in_flags(message)
    # mlx-lm's messages list names a line each; a name read from a file may
    # hold escape sequences or rich markup: shown as text, never obeyed.
    line = printable(" ".join(message.split()), 400)
    if _json_errors:
        entry = report.to_dict() if report else stamped({})
        print(_json.dumps(entry | {"error": line, "exit_code": code}, indent=2))
    err.print(f"[red]error:[/red] {escape(line)}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


# --passes may be given more than once: every one counts, as if comma-joined.
Passes = Annotated[
    list[str] | None,
    typer.Option(
        help="comma-separated, e.g. fuse_glu,last_token:keep=2; may be repeated "
        "(default: GRAPHPATCH_PASSES)"
    ),
]


def _joined(passes: list[str] | None) -> str:
    return ",".join(passes or [])


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
    global _json_errors
    _json_errors = json
    specs = _joined(passes)
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
        verify = _verify_mode("never" if no_verify else verify)
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


def _verify_mode(verify: str) -> str:
    if verify not in trust.MODES:
        fail(f"--verify must be one of {', '.join(trust.MODES)}, got {verify}")
    return verify


def _print(report: graphpatch.Report, as_json: bool, verbose: bool) -> None:
    if as_json:
        print(report.to_json())
    else:
        report.print(out, verbose)


@app.command(
    "run",
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
    options_metavar="[OPTIONS] -- CMD [ARGS]...",
)
def run_cmd(
    ctx: typer.Context,
    passes: Passes = None,
    verify: Annotated[
        str, typer.Option(help="always, cached (a matching record) or never")
    ] = "cached",
) -> None:
    """Run a program (after --) with every model it loads patched.

    Models loaded through mlx-lm's loaders are patched, in child processes too.
    """
    _run(ctx.args, _joined(passes), verify)


@app.command(
    "serve",
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
)
def serve_cmd(
    ctx: typer.Context,
    model: Annotated[
        str,
        typer.Argument(
            metavar="MODEL", help="a model directory or Hugging Face repo id"
        ),
    ],
    passes: Passes = None,
    host: Annotated[str, typer.Option(help="address to listen on")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="port to listen on")] = 8080,
    verify: Annotated[
        str, typer.Option(help="always, cached (a matching record) or never")
    ] = "cached",
) -> None:
    """mlx-lm's server with the model patched and verified before it listens.

    Other flags (--draft-model, --max-tokens, ...) go to mlx_lm server.
    """
    from graphpatch import serving

    specs = _joined(passes)
    env = {**os.environ, **({"GRAPHPATCH_PASSES": specs} if specs else {})}
    os.environ["GRAPHPATCH_VERIFY"] = _verify_mode(verify)  # read by the hook
    try:
        plan, _ = graphpatch.resolve(None, env)
        _refuse_what_needs_the_caller(plan)
        if any(f == "--model" or f.startswith("--model=") for f in ctx.args):
            fail(
                "--model is graphpatch serve's own argument (MODEL): a second one "
                "would be served in its place, unpatched"
            )
        serving.check_address(host, port)
        model_dir = model_path(model)
        config = read_config(model_dir)
        if saved_format(model_dir) == "fused":
            fail(f"{model_dir}: {FUSED}")
        check_config(model_dir, config, check_weights(model_dir))
        serving.serve(model_dir, host, port, specs, ctx.args)
    except GraphpatchError as e:
        fail(e)


def _refuse_what_needs_the_caller(plan) -> None:
    """A program run unchanged cannot do what some options ask of it."""
    for p, options in plan:
        if p.settings.needs_caller and (why := p.settings.needs_caller(options)):
            fail(why)


def _run(command: list[str], passes: str, verify: str) -> None:
    if not command:
        fail("no command: graphpatch run [--passes a,b] -- CMD ARGS...")
    env = {**os.environ, "GRAPHPATCH_VERIFY": _verify_mode(verify)}
    if passes:
        env["GRAPHPATCH_PASSES"] = passes
    try:
        plan, _ = graphpatch.resolve(None, env)
    except GraphpatchError as e:
        fail(e)
    # Before the child runs, which may load no model; a variable's name is
    # anyone's text.
    for warning in unknown_variables(env):
        err.print(f"warning: {printable(warning, 400)}", highlight=False, markup=False)
    _refuse_what_needs_the_caller(plan)
    if not plan:
        err.print(
            "warning: no passes chosen (--passes or GRAPHPATCH_PASSES): only a "
            "graphpatch save the program loads is patched, with the passes it "
            "recorded"
        )
    _check_command(command[0])
    if report := env.get("GRAPHPATCH_REPORT"):
        # Absolute: a child that changes directory writes where this checked.
        env["GRAPHPATCH_REPORT"] = _check_report(report)
    from graphpatch import run_hook

    startup = str(Path(graphpatch.__file__).parent / "_startup")
    try:
        code = run_hook.run(command, env, startup)
    except run_hook.CannotRun as e:
        fail(e, code=126)
    raise typer.Exit(code)


REPORT_NOT_A_FILE = "not a regular file (a report is appended to one)"
COVERAGE_NOT_OURS = (
    "exists and is not a table graphpatch coverage wrote: give --force to replace it"
)


def _check_command(name: str) -> None:
    """127 for a command that is not there, 126 for one that cannot run."""
    if shutil.which(name) is not None:
        return
    if os.sep in name and os.path.exists(name):
        why = (
            "a directory"
            if os.path.isdir(name)
            else "not executable (chmod +x it, or name its interpreter first)"
        )
        fail(f"cannot run {name}: {why}", code=126)
    fail(f"command not found: {name}", code=127)


def _check_report(report: str) -> str:
    """GRAPHPATCH_REPORT's absolute path, once it is a regular file that can
    be appended to (opened without blocking: a FIFO would hang the run)."""
    path = os.path.abspath(report)
    if os.path.exists(path) and not os.path.isfile(path):
        fail(f"GRAPHPATCH_REPORT={report}: {REPORT_NOT_A_FILE}")
    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NONBLOCK
    try:
        fd = os.open(path, flags, 0o644)
    except OSError as e:
        fail(f"GRAPHPATCH_REPORT={report}: cannot be written ({e.strerror})")
    try:
        regular = stat.S_ISREG(os.fstat(fd).st_mode)
    finally:
        os.close(fd)
    if not regular:
        fail(f"GRAPHPATCH_REPORT={report}: {REPORT_NOT_A_FILE}")
    return path


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
        file = golden.record(model_path(model), out_file, _joined(passes), texts)
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
        specs = None if passes is None else _joined(passes)
        result = golden.check(model_path(model), file, specs)
    except GraphpatchError as e:
        fail(e)
    for line in result.lines:  # golden made its values from the file printable
        out.print(line, highlight=False, soft_wrap=True, markup=False)
    raise typer.Exit(0 if result.ok else 1)


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
            interrupted()
        raise
    except KeyboardInterrupt:
        interrupted()


_interrupted = False


def _on_interrupt(signum: int, frame) -> None:
    """Ctrl-C as Python's own handler, remembered: finally blocks (a save's
    temporary directory) still run."""
    global _interrupted
    _interrupted = True
    raise KeyboardInterrupt


if __name__ == "__main__":
    main()
