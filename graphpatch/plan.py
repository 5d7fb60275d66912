"""Which passes run, with which options, in what order: from arguments or env.

Specs are ``name`` or ``name:option=value:flag``. The env gives
``GRAPHPATCH_PASSES`` and per-pass ``GRAPHPATCH_<NAME>=0/1`` switches (0 is a
kill switch even for a named pass). Passes that another needs are pulled in;
the plan is always in the one canonical order of ``PASSES``.
"""

import difflib
import os
from collections.abc import Mapping

from graphpatch.contract import Pass, PassSpecError
from graphpatch.passes import PASSES

# GRAPHPATCH_* variables that are not pass switches.
OTHER_ENV = {
    "GRAPHPATCH_PASSES",
    "GRAPHPATCH_REPORT",
    "GRAPHPATCH_RUN_DIR",
    "GRAPHPATCH_VERIFY",
}

Plan = list[tuple[Pass, dict]]
TRUE, FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def parse_spec(spec: str) -> tuple[Pass, dict]:
    """``name`` or ``name:option=value:flag`` -> (pass, options with defaults)."""
    name, *items = spec.strip().split(":")
    if name not in PASSES:
        raise PassSpecError(f"unknown pass '{name}' (known: {', '.join(PASSES)})")
    p = PASSES[name]
    options = dict(p.options)
    for item in items:
        key, has_value, text = item.partition("=")
        if key not in p.options:
            known = ", ".join(p.options) or "none"
            raise PassSpecError(f"unknown option '{key}' for {name} (known: {known})")
        options[key] = _parse_value(name, key, p.options[key], text, has_value)
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
    raise PassSpecError(f"option {name}:{key} wants {_kind(default)}, got '{text}'")


def check_options(name: str, options) -> str | None:
    """What is wrong with a mapping of options for pass ``name`` (a saved
    one), or None. Types must be the defaults' exactly (a bool is no int)."""
    p = PASSES[name]
    if not isinstance(options, dict):
        return f"{name}: options are not a mapping"
    for key, value in options.items():
        if key not in p.options:
            return f"unknown option '{key}' for {name}"
        if type(value) is not type(p.options[key]):
            return f"option {name}:{key} wants {_kind(p.options[key])}, got {value!r}"
    return p.validate({**p.options, **options}) if p.validate else None


def _kind(default) -> str:
    return {bool: "true or false", int: "an integer", float: "a number"}.get(
        type(default), f"a {type(default).__name__}"
    )


def _boolean(text: str) -> bool | None:
    """1/0, true/false, yes/no, on/off in any case; None for anything else."""
    word = text.strip().lower()
    return True if word in TRUE else False if word in FALSE else None


def _by_env() -> dict[str, str]:
    return {p.env: name for name, p in PASSES.items()}


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
                f"{key} must be 1/0, true/false, yes/no or on/off, got '{value}'"
            )
        switches[by_env[key]] = switch
    return switches


def resolve(
    passes: str | list[str] | None = None, env: Mapping[str, str] | None = None
) -> tuple[Plan, list[str]]:
    """The passes to run, in canonical order, with their options.

    Args:
        passes: pass specs (``"fuse_glu"``, ``"last_token:keep=4"``), a
            comma-separated string of them, or None to let the env decide.
        env: the environment to read (``os.environ`` by default).

    Returns:
        The plan and the warnings it produced (passes pulled in or switched off).

    Raises:
        PassSpecError: an unknown pass or option, or a value that cannot be
            read (an unknown GRAPHPATCH_ variable is only a warning).
    """
    env = os.environ if env is None else env
    switches, warnings = _switches(env), unknown_variables(env)
    if passes is None:
        specs = [s for s in env.get("GRAPHPATCH_PASSES", "").split(",") if s.strip()]
        specs += [name for name, on in switches.items() if on]
    else:
        specs = passes.split(",") if isinstance(passes, str) else list(passes)
        specs = [s for s in specs if s.strip()]
    chosen: dict[str, dict] = {}
    for spec in specs:
        p, options = parse_spec(spec)
        if p.validate and (problem := p.validate(options)):
            raise PassSpecError(problem)
        if p.name in chosen and chosen[p.name] != options and ":" in spec:
            raise PassSpecError(f"{p.name} named twice with different options")
        if p.name not in chosen or ":" in spec:
            chosen[p.name] = options
    for name in list(chosen):
        for needed in PASSES[name].requires:
            if needed not in chosen:
                chosen[needed] = dict(PASSES[needed].options)
                warnings.append(f"{name} needs {needed}: pulled it in")
    for name, on in switches.items():
        if not on and name in chosen:
            del chosen[name]
            warnings.append(f"{PASSES[name].env}=0 switched {name} off")
    for name in list(chosen):
        missing = [n for n in PASSES[name].requires if n not in chosen]
        if missing:
            del chosen[name]
            warnings.append(f"{name} switched off: it needs {', '.join(missing)}")
    plan = [(p, chosen[n]) for n, p in PASSES.items() if n in chosen]
    return plan, warnings
