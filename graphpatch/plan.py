"""Which passes run, with which options, in what order: from arguments or env.

Specs are ``name`` or ``name:option=value:flag``, spaces around each part
ignored; ``passes`` is one comma-separated string of them, a ``Pass`` object
(a user's own pass, from their repository), or a list (or tuple) of those,
nothing else. A user's pass is known by its name from then on (``known``), so
that ``revert``, ``save`` and ``load`` find it as they find graphpatch's. A
control character in a spec is an error that names where it came from (a
newline in ``GRAPHPATCH_PASSES`` must not read as one odd pass name). The env
gives ``GRAPHPATCH_PASSES`` and per-pass ``GRAPHPATCH_<NAME>=0/1`` switches (0
is a kill switch even for a named pass). Passes that another needs are pulled in;
the plan is always in the one canonical order of ``PASSES``, users' passes
after them in the order they were first named.
"""

import difflib
import os
import re
import unicodedata
from collections.abc import Mapping, Sequence

from graphpatch.contract import Options, Pass, PassSpecError
from graphpatch.passes import PASSES
from graphpatch.report import printable

# GRAPHPATCH_* variables that are not pass switches.
OTHER_ENV = {
    "GRAPHPATCH_PASSES",
    "GRAPHPATCH_REPORT",
    "GRAPHPATCH_RUN_DIR",
    "GRAPHPATCH_VERIFY",
}

Plan = list[tuple[Pass, Options]]
Spec = str | Pass
Specs = str | Pass | Sequence[str | Pass]  # one, or a list or tuple of them
TRUE, FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")
NOT_SPECS = "passes must be a string of pass specs or a list of them"
CONTROL = "holds a control character"
NAME = re.compile(r"[a-z][a-z0-9_]*")  # a flag, and GRAPHPATCH_<NAME> in the env
BAD_NAME = "a pass name is lowercase letters, digits and _ (a flag and an env switch)"
TAKEN = "{name} is already the name of another pass or of a graphpatch variable"

_users: dict[str, Pass] = {}  # users' own passes, by name, first named first
_replaced: list[Pass] = []  # earlier objects of a user's pass name (reloaded)


def known() -> list[Pass]:
    """Every pass graphpatch can undo, save and reopen: its own in canonical
    order, then each user's pass that has been named."""
    return [*PASSES.values(), *_users.values()]


def undoable() -> list[Pass]:
    """``known``, and the earlier objects of a user's pass name: ``revert``
    undoes what each rewrote."""
    return [*known(), *reversed(_replaced)]


def by_name() -> dict[str, Pass]:
    return {p.name: p for p in known()}


def adopt(p: Pass) -> Pass:
    """Know a user's pass by its name from now on. Another object under the
    same name replaces an earlier user's pass (a module reloaded), never one
    of graphpatch's."""
    if not isinstance(p.name, str) or not NAME.fullmatch(p.name):
        raise PassSpecError(f"{BAD_NAME}: {printable(repr(p.name), 60)}")
    if PASSES.get(p.name, p) is not p or p.env in OTHER_ENV:
        raise PassSpecError(TAKEN.format(name=p.name))
    if p.name not in PASSES:
        if _users.get(p.name, p) is not p:
            _replaced.append(_users[p.name])  # what it rewrote is still undone
        _users[p.name] = p
    return p


def parse_spec(spec: Spec) -> tuple[Pass, Options]:
    """``name``, ``name:option=value:flag`` or a Pass -> (pass, options with
    defaults)."""
    if isinstance(spec, Pass):
        return adopt(spec), dict(spec.settings.defaults)
    name, *items = (part.strip() for part in spec.split(":"))
    passes = by_name()
    if name not in passes:
        names = ", ".join(passes)
        raise PassSpecError(f"unknown pass '{printable(name)}' (known: {names})")
    p = passes[name]
    defaults = p.settings.defaults
    options = dict(defaults)
    for item in items:
        key, has_value, text = (part.strip() for part in item.partition("="))
        if key not in defaults:
            names = ", ".join(defaults) or "none"
            raise PassSpecError(
                f"unknown option '{printable(key)}' for {name} (known: {names})"
            )
        options[key] = _parse_value(name, key, defaults[key], text, has_value)
    return p, options


def _parse_value(name: str, key: str, default, text: str, has_value: str):
    if isinstance(default, bool):
        if not has_value:
            return True
        if (value := _boolean(text)) is not None:
            return value
    elif has_value:
        try:
            return type(default)(text)
        except ValueError:
            pass
    raise PassSpecError(
        f"option {name}:{key} wants {_kind(default)}, got '{printable(text)}'"
    )


def check_options(name: str, options) -> str | None:
    """What is wrong with a mapping of options for pass ``name`` (a saved
    one), or None. Types must be the defaults' exactly (a bool is no int)."""
    p = by_name()[name]
    defaults, validate = p.settings.defaults, p.settings.validate
    if not isinstance(options, dict):
        return f"{name}: options are not a mapping"
    for key, value in options.items():
        if key not in defaults:
            return f"unknown option '{key}' for {name}"
        if type(value) is not type(defaults[key]):
            return f"option {name}:{key} wants {_kind(defaults[key])}, got {value!r}"
    return validate(None, {**defaults, **options}) if validate else None


def _kind(default) -> str:
    return {bool: "true or false", int: "an integer", float: "a number"}.get(
        type(default), f"a {type(default).__name__}"
    )


def _boolean(text: str) -> bool | None:
    """1/0, true/false, yes/no, on/off in any case; None for anything else."""
    word = text.strip().lower()
    return True if word in TRUE else False if word in FALSE else None


def _specs(passes: object, source: str) -> list[Spec]:
    """The non-empty specs of ``passes`` (from ``source``, named in errors)."""
    if isinstance(passes, str):
        items: list = passes.split(",")
    elif isinstance(passes, Pass):
        items = [passes]
    elif isinstance(passes, (list, tuple)):
        items = list(passes)
    else:
        raise PassSpecError(f"{NOT_SPECS}, got {type(passes).__name__}")
    for item in items:
        if isinstance(item, Pass):
            continue
        if not isinstance(item, str):
            got = printable(repr(item), 60)
            raise PassSpecError(f"{NOT_SPECS}: {got} is not a pass spec")
        if any(unicodedata.category(c).startswith("C") for c in item):
            shown = printable(passes if isinstance(passes, str) else item)
            raise PassSpecError(f"{source} {CONTROL}: '{shown}'")
    return [s for s in items if isinstance(s, Pass) or s.strip()]


def _by_env() -> dict[str, str]:
    return {p.env: p.name for p in known()}


def unknown_variables(env: Mapping[str, str]) -> list[str]:
    """A warning for each GRAPHPATCH_ variable graphpatch does not know,
    naming the closest known one: another tool's GRAPHPATCH_HOME must not
    stop a program."""
    known = [*_by_env(), *OTHER_ENV]
    suffixes = [k.removeprefix("GRAPHPATCH_") for k in known]
    warnings = []
    for key in env:
        if key.startswith("GRAPHPATCH_") and key not in known:
            name = key.removeprefix("GRAPHPATCH_")  # the shared prefix says nothing
            close = difflib.get_close_matches(name, suffixes, n=1)
            hint = f" (did you mean GRAPHPATCH_{close[0]}?)" if close else ""
            warnings.append(f"{key} is not a graphpatch variable, ignored{hint}")
    return warnings


def _switches(env: Mapping[str, str]) -> dict[str, bool]:
    """Per-pass GRAPHPATCH_<NAME> switches. A switch whose value cannot be
    read is an error: a kill switch must never be misread."""
    by_env = _by_env()
    switches = {}
    for key, value in env.items():
        if key not in by_env:
            continue
        if (switch := _boolean(value)) is None:
            raise PassSpecError(
                f"{key} must be 1/0, true/false, yes/no or on/off, "
                f"got '{printable(value)}'"
            )
        switches[by_env[key]] = switch
    return switches


def resolve(
    passes: Specs | None = None,
    env: Mapping[str, str] | None = None,
) -> tuple[Plan, list[str]]:
    """The passes to run, in canonical order, with their options.

    Args:
        passes: pass specs (``name``, ``name:option=value``, a
            ``Pass``), a comma-separated string of them, or None to let the
            env decide.
        env: the environment to read (``os.environ`` by default).

    Returns:
        The plan and the warnings it produced (passes pulled in or switched off).

    Raises:
        PassSpecError: an unknown pass or option, or a value that cannot be
            read (an unknown GRAPHPATCH_ variable is only a warning).
    """
    env = os.environ if env is None else env
    if passes is not None:
        specs = _specs(passes, "passes")
        for spec in specs:  # a user's pass is known before its switch is read
            if isinstance(spec, Pass):
                adopt(spec)
    switches, warnings = _switches(env), unknown_variables(env)
    if passes is None:
        specs = _specs(env.get("GRAPHPATCH_PASSES", ""), "GRAPHPATCH_PASSES")
        specs += [name for name, on in switches.items() if on]
    chosen: dict[str, Options] = {}
    for spec in specs:
        p, options = parse_spec(spec)
        validate = p.settings.validate
        if validate and (problem := validate(None, options)):
            raise PassSpecError(problem)
        with_options = isinstance(spec, str) and ":" in spec
        if p.name in chosen and chosen[p.name] != options and with_options:
            raise PassSpecError(f"{p.name} named twice with different options")
        if p.name not in chosen or with_options:
            chosen[p.name] = options
    _pull_in(chosen, warnings)
    passes_by_name = by_name()
    for name, on in switches.items():
        if not on and name in chosen:
            del chosen[name]
            warnings.append(f"{passes_by_name[name].env}=0 switched {name} off")
    for name in list(chosen):
        missing = [n for n in passes_by_name[name].requires if n not in chosen]
        if missing:
            del chosen[name]
            warnings.append(f"{name} switched off: it needs {', '.join(missing)}")
    plan = [(p, chosen[p.name]) for p in known() if p.name in chosen]
    return plan, warnings


def named(passes: Specs) -> list[Pass]:
    """The passes ``passes`` names (options ignored), in canonical order,
    none pulled in."""
    chosen = {parse_spec(spec)[0].name for spec in _specs(passes, "passes")}
    return [p for p in known() if p.name in chosen]


def _pull_in(chosen: dict[str, Options], warnings: list[str]) -> None:
    """Add the passes the chosen ones need, with their defaults."""
    passes = by_name()
    for name in list(chosen):
        for needed in passes[name].requires:
            if needed not in passes:
                raise PassSpecError(f"{name} needs {needed}, which is no known pass")
            if needed not in chosen:
                chosen[needed] = dict(passes[needed].settings.defaults)
                warnings.append(f"{name} needs {needed}: pulled it in")
