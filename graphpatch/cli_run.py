"""``graphpatch run`` and ``graphpatch serve``: a program, or mlx-lm's server,
with every model it loads patched."""

import os
import shutil
import stat
from pathlib import Path
from typing import Annotated

import typer

import graphpatch
from graphpatch.checks import check_config, check_weights, read_config
from graphpatch.cli_app import Passes, app, err, fail, joined, verify_mode
from graphpatch.contract import GraphpatchError
from graphpatch.loading import model_path
from graphpatch.outdir import saved_format
from graphpatch.plan import unknown_variables
from graphpatch.report import printable
from graphpatch.run_hook import FUSED


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
    _run(ctx.args, joined(passes), verify)


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

    specs = joined(passes)
    env = {**os.environ, **({"GRAPHPATCH_PASSES": specs} if specs else {})}
    os.environ["GRAPHPATCH_VERIFY"] = verify_mode(verify)  # read by the hook
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
    env = {**os.environ, "GRAPHPATCH_VERIFY": verify_mode(verify)}
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
