"""Open a model directory: a plain mlx-lm model, or a graphpatch save of
either format (``saving``), which comes back patched as it was saved.

A plain save is loaded by ``mlx_lm.load`` and its recorded passes are applied
again (verified, or trusted from a record). A fused save is built straight
into its patched structure and its saved weights are loaded into it, so
nothing is fused twice.
"""

import json
from pathlib import Path
from typing import Any, Literal, overload

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.utils import (
    infer_quant_config,
    load_adapters,
    load_model,
    load_tokenizer,
)

from graphpatch import trust
from graphpatch.checks import (
    LoadError,
    check_config,
    check_weights,
    model_classes,
    read_config,
)
from graphpatch.contract import Context, GraphpatchError, PassSpecError
from graphpatch.loading import (
    mlx_lm_load_checked,
    model_path,
    quiet_transformers,
    read_arrays,
)
from graphpatch.manifest import MANIFEST, read_manifest, section_hash
from graphpatch.outdir import MODEL_TYPE, format_of
from graphpatch.plan import Specs, by_name, check_options, known, named
from graphpatch.report import printable
from graphpatch.saving import FORMATS


@overload
def load(
    path_or_hf_repo: str | Path,
    tokenizer_config: dict[str, Any] | None = None,
    model_config: dict[str, Any] | None = None,
    adapter_path: str | None = None,
    lazy: bool = False,
    return_config: Literal[False] = False,
    *,
    verify: str = "cached",
    passes: Specs | None = None,
) -> tuple[nn.Module, Any]: ...


@overload
def load(
    path_or_hf_repo: str | Path,
    tokenizer_config: dict[str, Any] | None = None,
    model_config: dict[str, Any] | None = None,
    adapter_path: str | None = None,
    lazy: bool = False,
    *,
    return_config: Literal[True],
    verify: str = "cached",
    passes: Specs | None = None,
) -> tuple[nn.Module, Any, dict]: ...


def load(
    path_or_hf_repo: str | Path,
    tokenizer_config: dict[str, Any] | None = None,
    model_config: dict[str, Any] | None = None,
    adapter_path: str | None = None,
    lazy: bool = False,
    return_config: bool = False,
    *,
    verify: str = "cached",
    passes: Specs | None = None,
) -> tuple[nn.Module, Any] | tuple[nn.Module, Any, dict]:
    """``mlx_lm.load``, with its arguments and what it returns; a graphpatch
    save comes back patched as it was saved.

    Args:
        path_or_hf_repo: a model directory or a Hugging Face repo id.
        tokenizer_config, model_config, adapter_path, lazy, return_config:
            as ``mlx_lm.load`` takes them (the adapters are loaded before a
            save's passes are applied again, and key its record).
        verify: for a plain save, how the recorded passes it re-applies are
            verified: ``always``, ``cached`` or ``never`` (the only one that
            keeps a lazy model lazy).
        passes: users' own ``Pass`` objects a save may have recorded, so
            that it reopens with them (graphpatch's own are always known).

    Returns:
        (model, tokenizer), or (model, tokenizer, config) with
        ``return_config``.

    Raises:
        LoadError: the directory cannot be loaded; the message says why.
    """
    if verify not in trust.MODES:  # before a plain directory hides it
        raise PassSpecError(
            f"verify must be one of {', '.join(trust.MODES)}", argument="verify"
        )
    if passes is not None:
        named(passes)  # known by name before the save's record is read
    model_dir = model_path(path_or_hf_repo)
    config = read_config(model_dir)
    names = check_weights(model_dir)
    saved_as = checked_section(model_dir, config)
    if saved_as == "fused":
        section = config["graphpatch"]
        check_config(model_dir, {**config, "model_type": section["model_type"]}, names)
        _check_aliases(model_dir, section["aliases"], names)
        model, tokenizer, config = _fused(model_dir, lazy, model_config)
    else:
        check_config(model_dir, {**config, **(model_config or {})}, names)
        model, tokenizer, config = _opened(model_dir, lazy, model_config)
    if tokenizer_config is not None:  # as mlx_lm.load reads it
        with quiet_transformers():
            tokenizer = load_tokenizer(
                model_dir, tokenizer_config, eos_token_ids=config.get("eos_token_id")
            )
    if adapter_path is not None:
        model = _adapted(model, adapter_path)
    if saved_as == "plain":
        reapply(model, model_dir, config, verify, adapter_path)
    return (model, tokenizer, config) if return_config else (model, tokenizer)


def _opened(model_dir: Path, lazy: bool, model_config: dict | None) -> tuple:
    """mlx-lm's load of a directory with no fused save in it."""
    if not model_config:
        return mlx_lm_load_checked(model_dir, lazy)
    try:  # loading's checked load takes no model_config: mlx-lm's own steps
        model, config = load_model(model_dir, lazy, model_config=model_config)
    except Exception as e:
        raise LoadError(f"{model_dir}: mlx-lm could not load it ({_why(e)})") from None
    return model, _tokenizer(model_dir, config), config


def _fused(model_dir: Path, lazy: bool, model_config: dict | None) -> tuple:
    try:
        return load_fused(model_dir, lazy, model_config)
    except GraphpatchError:
        raise
    except Exception as e:
        raise LoadError(
            f"{model_dir}: cannot open the saved model: {_why(e)}"
        ) from None


def _why(e: Exception) -> str:
    return printable(str(e).strip().splitlines()[0] if str(e) else repr(e))


def _adapted(model: nn.Module, adapter_path: str) -> nn.Module:
    """The model with mlx-lm's adapters loaded, as ``mlx_lm.load`` does."""
    try:
        model = load_adapters(model, adapter_path)
    except Exception as e:
        raise LoadError(
            f"{adapter_path}: cannot load the adapters ({_why(e)})"
        ) from None
    model.eval()
    return model


NO_SECTION = "a fused save's model_type, but no graphpatch section"
SECTION_EDITED = (
    "the graphpatch section is not the one the save wrote ({manifest} holds "
    "another hash): edited by hand? refused"
)


def checked_section(model_dir: Path, config: dict) -> str | None:
    """``plain`` or ``fused`` for a graphpatch save whose section is whole and
    is the one its manifest vouches for, None for a directory with no section.

    Raises:
        LoadError: the section or the fused marker is malformed or edited.
    """
    where = model_dir / "config.json"
    marked = str(config.get("model_type")).startswith("graphpatch")
    if marked and config["model_type"] != MODEL_TYPE:
        raise LoadError(
            f"{where}: model_type names a graphpatch save, but not the one "
            "graphpatch writes (edited by hand?)"
        )
    if "graphpatch" not in config:
        if marked:
            raise LoadError(f"{where}: {NO_SECTION}")
        return None
    recorded(model_dir, config)
    return "fused" if marked else "plain"


def _check_aliases(model_dir: Path, aliases: dict, names: list[str]) -> None:
    """A fused save's aliases name arrays held twice (a tied head): each one
    absent from the weight files, each pointing at one they hold."""
    held = set(names)
    for alias, name in aliases.items():
        problem = (
            "names an array the weight files hold"
            if alias in held
            else None
            if name in held
            else f"points at {name}, which they do not hold"
        )
        if problem:
            raise LoadError(
                f"{model_dir / 'config.json'}: graphpatch alias "
                f"{printable(alias)} {printable(problem)} (edited by hand?)"
            )


def recorded(model_dir: Path, config: dict) -> list[str]:
    """The pass specs a save recorded (``last_token:keep=4``), to re-apply.

    Raises:
        LoadError: the graphpatch section is malformed, or is not the one the
            save's manifest vouches for (edited by hand).
    """
    section, where = config.get("graphpatch"), model_dir / "config.json"
    problem = _saved_problem(section, config.get("model_type") == MODEL_TYPE)
    if problem or not isinstance(section, dict):
        raise LoadError(f"{where}: graphpatch section: {printable(problem)}")
    manifest = read_manifest(model_dir)
    if manifest is not None and manifest.get("section") != section_hash(section):
        raise LoadError(f"{where}: {SECTION_EDITED.format(manifest=MANIFEST)}")
    return [_spec(entry["name"], entry["options"]) for entry in section["passes"]]


def _spec(name: str, options: dict) -> str:
    def text(value) -> str:
        return str(value).lower() if isinstance(value, bool) else str(value)

    return ":".join([name, *(f"{k}={text(v)}" for k, v in options.items())])


def reapply(
    model: nn.Module,
    model_dir: Path,
    config: dict,
    verify: str,
    adapter_path: str | None = None,
) -> None:
    """Re-apply the passes a plain save recorded (``verify``: see ``trust``)."""
    specs = recorded(model_dir, config)
    if specs:
        report = trust.apply(model, specs, model_dir, verify, adapter_path=adapter_path)
        trust.settle(model, report)


def load_fused(
    model_dir: str | Path, lazy: bool = False, model_config: dict | None = None
) -> tuple:
    """Open a fused save straight into its patched structure.

    Returns:
        (model, tokenizer, config), config as the source model's.
    """
    model, config = build_fused(model_dir, lazy, model_config)
    return model, _tokenizer(Path(model_dir), config), config


def build_fused(
    model_dir: str | Path, lazy: bool = False, model_config: dict | None = None
) -> tuple:
    """A fused save's model and config (``model_config`` over it, as mlx-lm
    reads one), without its tokenizer."""
    model_dir = Path(model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    if format_of(config) != "fused":
        raise GraphpatchError(f"{model_dir} is not a fused graphpatch save")
    recorded(model_dir, config)  # the section is checked before it is used
    saved = config.pop("graphpatch")
    config["model_type"] = saved["model_type"]
    config.update(model_config or {})
    weights = read_arrays(model_dir, "")
    model_class, args_class = model_classes(config)
    model = model_class(args_class.from_dict(config))
    if hasattr(model, "sanitize"):  # as mlx-lm's loader: a tied model drops lm_head
        weights = model.sanitize(weights)
    _quantize(model, config, weights)
    _rewrite(model, saved["passes"])
    for alias, name in saved["aliases"].items():
        weights[alias] = weights[name]  # the same array: tied stays tied
    model.load_weights(list(weights.items()), strict=True)
    if not lazy:
        mx.eval(model.parameters())
    model.eval()
    return model, config


def _saved_problem(saved, marked: bool) -> str | None:
    """What is wrong with a saved config's graphpatch section (it may have
    been edited by hand), or None. ``marked``: the config's model_type is the
    fused marker."""
    if not isinstance(saved, dict):
        return "not a mapping"
    saved_as = saved.get("format")
    if saved_as not in FORMATS:
        if "format" not in saved:
            return "no format"
        return f"unknown format {printable(repr(saved_as))}"
    if (saved_as == "fused") != marked:
        said = "is" if marked else "is not"
        return f"format {saved_as}, but model_type {said} the fused marker"
    if saved_as == "fused":
        if not isinstance(saved.get("model_type"), str):
            return "no model_type string"
        aliases = saved.get("aliases")
        if not isinstance(aliases, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in aliases.items()
        ):
            return "aliases is not a mapping of names"
    entries = saved.get("passes")
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        return "passes is not a list of pass entries"
    for entry in entries:
        name, sites = entry.get("name"), entry.get("sites")
        if name not in by_name():
            return (
                f"unknown pass {name!r} (a pass of your own: give it to "
                "graphpatch.load(..., passes=[...]))"
            )
        if not isinstance(sites, list) or not all(isinstance(x, str) for x in sites):
            return f"{name}: sites is not a list of paths"
        problem = check_options(name, entry.get("options"))
        if problem:
            return problem
    return None


def _tokenizer(model_dir: Path, config: dict):
    with quiet_transformers():  # config.json's model_type is not one it knows
        return load_tokenizer(model_dir, eos_token_ids=config.get("eos_token_id"))


def _quantize(model: nn.Module, config: dict, weights: dict) -> None:
    """Quantize the unpatched skeleton as mlx-lm's loader would, seeing each
    fused array (``gate_up_proj``) under its parts' names too (mlx-lm's own
    predicate cannot: it looks for each part's arrays by name)."""
    quantization = config.get("quantization")
    if quantization is None:
        if config.get("quantization_config"):
            raise GraphpatchError("graphpatch.load needs config['quantization']")
        return
    names = dict(weights)
    for fused, parts in (f for p in known() for f in p.saving.fuses.items()):
        for key, value in weights.items():
            for part in parts if f".{fused}." in key else ():
                names[key.replace(f".{fused}.", f".{part}.")] = value

    def predicate(path: str, module: nn.Module):
        if path in quantization:
            return quantization[path]
        if not hasattr(module, "to_quantized") or f"{path}.scales" not in names:
            return False
        params = infer_quant_config(path, module, names)
        if f"{path}.global_scale" in names:
            params["global_scale"] = True
        return params

    nn.quantize(
        model,
        group_size=quantization["group_size"],
        bits=quantization["bits"],
        mode=quantization.get("mode", "affine"),
        class_predicate=predicate,
    )


def _rewrite(model: nn.Module, passes: list[dict]) -> None:
    """Re-make the recorded sites' structure on unevaluated arrays: the saved
    weights replace them, so nothing is fused or checked twice."""
    for entry in passes:
        p = by_name()[entry["name"]]
        options, context = entry["options"], Context(model_dir=None)
        sites = {s.path: s for s in p.find(model, options, context)}
        for path in entry["sites"]:
            if path not in sites or p.why_not(model, sites[path], options, context):
                raise GraphpatchError(
                    f"saved {p.name} site {path} does not fit the model built "
                    "from config.json"
                )
            p.rewrite(model, sites[path], options, context)
