"""The command line's shared parts: the typer app, its two consoles, and the
one-line error every command ends with on bad input (2) or a failed check (1).
"""

import json as _json
from typing import Annotated, NoReturn

import typer
import typer.core
from rich.console import Console
from rich.markup import escape

import graphpatch
from graphpatch import trust
from graphpatch.report import printable, stamped

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


# The terminal's width, or COLUMNS, or 80 columns when piped: the report keeps
# every column down to 80.
out = Console()
err = Console(stderr=True)
json_errors = False  # set by commands given --json: errors go to stdout as JSON


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
    if argument in FLAGS:  # each clause that begins with it ("a; out ...")
        clauses = message.split("; ")
        for i, clause in enumerate(clauses):
            if clause.startswith(f"{argument} "):
                clauses[i] = FLAGS[argument] + clause[len(argument) :]
        message = "; ".join(clauses)
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
    if json_errors:
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


def joined(passes: list[str] | None) -> str:
    return ",".join(passes or [])


def verify_mode(verify: str) -> str:
    if verify not in trust.MODES:
        fail(f"--verify must be one of {', '.join(trust.MODES)}, got {verify}")
    return verify
