"""Open a model directory (``load``: plain mlx-lm models and graphpatch
saves alike), and save a patched model as one.

The default, plain, format is a directory ``mlx_lm.load`` opens as a normal
model: the weights under the unpatched architecture's names (a fused
``gate_up_proj`` split back into gate and up, bit for bit), the head as the
passes bound it (an untied head as ``lm_head.*`` with
``tie_word_embeddings: false``), and the passes recorded in config.json's
``graphpatch`` section, which mlx-lm ignores; ``graphpatch.load`` and
``graphpatch run`` re-apply them. The fused format writes the patched
structure itself (``gate_up_proj``), which only ``graphpatch.load`` opens,
without fusing again; its ``model_type`` makes mlx-lm refuse it in one line.

Either is written beside OUT and renamed into place (``outdir``): a killed
save leaves no OUT or the complete old one, and nothing graphpatch did not
write is ever replaced.
"""

import dataclasses
import json
import math
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten
from mlx_lm.utils import infer_quant_config, load_tokenizer

from graphpatch._version import __version__
from graphpatch.contract import Context, GraphpatchError
from graphpatch.loading import (
    EXTRA_WEIGHTS,
    LoadError,
    check_config,
    check_weights,
    mlx_lm_load_checked,
    model_classes,
    model_path,
    quiet_transformers,
    read_arrays,
    read_config,
    write_failure,
    write_safetensors,
)
from graphpatch.outdir import (
    SaveError,
    check_out,
    check_room,
    recover,
    write_atomically,
)
from graphpatch.passes import PASSES
from graphpatch.plan import check_options

FORMATS = ("plain", "fused")
MODEL_TYPE = (
    "graphpatch-fused (saved with --save-format fused; open it with "
    "graphpatch.load or graphpatch apply, or save it again without that option)"
)
MAX_SHARD_BYTES = 5 << 30  # mlx-lm's own limit per safetensors file


def _weights(model: nn.Module) -> tuple[dict[str, mx.array], dict[str, str]]:
    """Each array once, and ``alias -> name`` for arrays held twice (a tied
    head holds the embedding's own)."""
    weights: dict[str, mx.array] = {}
    aliases: dict[str, str] = {}
    seen: dict[int, str] = {}
    for name, array in tree_flatten(model.parameters()):
        if id(array) in seen:
            aliases[name] = seen[id(array)]
        else:
            seen[id(array)] = name
            weights[name] = array
    return weights, aliases


def _shards(weights: dict[str, mx.array], max_bytes: int) -> list[dict]:
    # mlx_lm.utils.make_shards splits at whole GiB only; --max-shard-mb and
    # the tests need smaller shards.
    shards: list[dict] = []
    current: dict[str, mx.array] = {}
    size = 0
    for name, array in weights.items():
        if current and size + array.nbytes > max_bytes:
            shards.append(current)
            current, size = {}, 0
        current[name] = array
        size += array.nbytes
    return [*shards, current] if current else shards


def _record(model: nn.Module) -> list[dict]:
    """Each applied pass with the options its sites really carry."""
    record = []
    for name, p in PASSES.items():
        sites = p.applied(model)
        if sites:
            options = {**p.options, **(p.options_in(model) if p.options_in else {})}
            record.append({"name": name, "options": options, "sites": sites})
    return record


def prepare(source_dir: str | Path, out: str | Path, force: bool) -> list[str]:
    """Recover what killed saves of ``out`` left, then check that ``out`` may
    be written; returns what was recovered.

    Raises:
        SaveError: ``out`` must not be written (see ``outdir.check_out``).
    """
    out = Path(out)
    try:
        done = recover(out)
    except OSError as e:
        raise SaveError(f"cannot tidy up beside {out}: {e}") from None
    check_out(Path(source_dir), out, force)
    check_room(Path(source_dir), out)
    return done


def save(
    model: nn.Module,
    source_dir: str | Path,
    out: str | Path,
    force: bool = False,
    max_shard_bytes: int = MAX_SHARD_BYTES,
    progress: Callable[[str], None] | None = None,
    format: str = "plain",
) -> Path:
    """Write ``model`` (patched) as a model directory ``out``.

    The passes and options recorded are read from the model itself.

    Args:
        model: a model patched by ``graphpatch.apply``.
        source_dir: the directory it was loaded from (config, tokenizer).
        out: the directory to create, or an earlier graphpatch save to replace.
        force: replace ``out`` when it is an earlier graphpatch save.
        max_shard_bytes: the largest safetensors file; more get an index.
        progress: called with a short line per step.
        format: ``plain`` (``mlx_lm.load`` opens it; graphpatch re-applies
            the passes) or ``fused`` (the patched structure itself).

    Raises:
        SaveError: ``out`` may not be written, or writing failed (then
            nothing was left behind and an old ``out`` is as it was).
    """
    source_dir, out = Path(source_dir), Path(out)
    progress = progress or (lambda line: None)
    check_format(format)
    if not (isinstance(max_shard_bytes, int) and max_shard_bytes >= 1):
        raise SaveError(
            f"the largest shard must be 1 byte or more, got {max_shard_bytes}"
        )
    for line in prepare(source_dir, out, force):
        progress(line)
    if PASSES["elide_head"].applied(model):
        raise SaveError("an elided model is one rank's view: save it before elide_head")
    config = json.loads((source_dir / "config.json").read_text())
    if config.get("model_type") == MODEL_TYPE:
        raise SaveError(f"{source_dir} is already a saved patched model")
    section: dict = {"version": __version__, "format": format}
    section["passes"] = _record(model)
    if format == "fused":
        weights, aliases = _weights(model)
        extra: dict[str, mx.array] = {}
        section |= {"model_type": config["model_type"], "aliases": aliases}
        config = {**config, "model_type": MODEL_TYPE}
    else:
        weights, extra, config = _plain(model, config)

    def write(tmp: Path) -> None:
        write_safetensors(tmp, _shards(weights, max_shard_bytes), progress)
        if extra:
            mx.save_safetensors(str(tmp / EXTRA_WEIGHTS), extra, {"format": "mlx"})
        progress("writing config.json")
        saved = {**config, "graphpatch": section}
        (tmp / "config.json").write_text(json.dumps(saved, indent=2))
        _copy_other_files(source_dir, tmp)

    try:
        write_atomically(out, write, progress)
    except (OSError, RuntimeError) as e:
        raise SaveError(f"cannot write {out}: {write_failure(e)}") from None
    return out


def _plain(model: nn.Module, config: dict) -> tuple[dict, dict, dict]:
    """The weights under the names the unpatched architecture loads, those it
    does not load (kept apart), and the config that loads the rest."""
    weights = dict(tree_flatten(model.parameters()))
    for p in PASSES.values():
        if p.plain is not None and p.applied(model):
            weights = p.plain(model, weights)
    stray = _not_loaded(model, weights)
    untied = _untied_config(model, config, stray)
    if untied is not None:
        return weights, {}, untied
    return weights, {name: weights.pop(name) for name in stray}, config


def _not_loaded(model: nn.Module, weights: dict) -> list[str]:
    modules = {path for path, _ in model.named_modules()}
    return [name for name in weights if name.rpartition(".")[0] not in modules]


def _untied_config(model: nn.Module, config: dict, stray: list[str]) -> dict | None:
    """A config under which the architecture loads every stray array (an
    untied head): the same one where it decides by the arrays present
    (gemma3), or with ``tie_word_embeddings: false``; None when none does."""
    args: Any = getattr(model, "args", None)
    if not stray or not dataclasses.is_dataclass(args):
        return None
    candidates: list[tuple[dict, Any]] = [({}, args)]
    if "tie_word_embeddings" in {f.name for f in dataclasses.fields(args)}:
        untied = dataclasses.replace(args, tie_word_embeddings=False)  # type: ignore[type-var]
        candidates.append(({"tie_word_embeddings": False}, untied))
    for change, candidate in candidates:
        # Built lazily: its random initial arrays are never evaluated.
        if not _not_loaded(type(model)(candidate), dict.fromkeys(stray)):
            return {**config, **change}
    return None


def check_format(format: str) -> None:
    if format not in FORMATS:
        raise SaveError(f"--save-format is one of {', '.join(FORMATS)}, got {format}")


def max_shard_bytes(megabytes: float) -> int:
    """``--max-shard-mb`` as bytes; a finite size of at least one byte."""
    if not math.isfinite(megabytes) or megabytes * 2**20 < 1:
        raise SaveError(f"--max-shard-mb must be a positive size, got {megabytes}")
    return int(megabytes * 2**20)


def _copy_other_files(source_dir: Path, out: Path) -> None:
    # Byte for byte, rather than mlx-lm's tokenizer.save_pretrained, which
    # writes the files anew: the source's own files (chat template, extras)
    # stay exactly as the user had them.
    skip = {"config.json", "model.safetensors.index.json"}
    for file in source_dir.iterdir():
        if file.is_file() and file.name not in skip and file.suffix != ".safetensors":
            shutil.copy2(file, out / file.name)


def load(
    model_dir: str | Path, lazy: bool = False, verify: str = "cached"
) -> tuple[nn.Module, object, dict]:
    """Load a local model directory with ``mlx_lm.load``; a graphpatch save
    comes back patched as it was saved.

    Args:
        model_dir: a directory with config.json, safetensors and a tokenizer.
        lazy: leave the weights unevaluated (loaded when first used).
        verify: for a plain save, how the recorded passes it re-applies are
            verified: ``always``, ``cached`` or ``never`` (the only one that
            keeps a lazy model lazy).

    Returns:
        (model, tokenizer, config).

    Raises:
        LoadError: the directory cannot be loaded; the message says why.
    """
    model_dir = model_path(model_dir)
    config = read_config(model_dir)
    names = check_weights(model_dir)
    if is_fused(config):
        try:
            return load_fused(model_dir, lazy)
        except GraphpatchError:
            raise
        except Exception as e:
            raise LoadError(f"{model_dir}: cannot open the saved model: {e}") from None
    if "graphpatch" in config:
        recorded(model_dir, config)  # a bad section, before loading
    check_config(model_dir, config, names)
    model, tokenizer, config = mlx_lm_load_checked(model_dir, lazy)
    if "graphpatch" in config:
        reapply(model, model_dir, config, verify)
    return model, tokenizer, config


def is_fused(config: dict) -> bool:
    return config.get("model_type") == MODEL_TYPE


def recorded(model_dir: Path, config: dict) -> list[str]:
    """The pass specs a save recorded (``last_token:keep=4``), to re-apply.

    Raises:
        LoadError: the graphpatch section is malformed (edited by hand).
    """
    section = config.get("graphpatch")
    problem = _saved_problem(section)
    if problem or not isinstance(section, dict):
        raise LoadError(f"{model_dir / 'config.json'}: graphpatch section: {problem}")
    return [_spec(entry["name"], entry["options"]) for entry in section["passes"]]


def _spec(name: str, options: dict) -> str:
    def text(value) -> str:
        return str(value).lower() if isinstance(value, bool) else str(value)

    return ":".join([name, *(f"{k}={text(v)}" for k, v in options.items())])


def reapply(model: nn.Module, model_dir: Path, config: dict, verify: str) -> None:
    """Re-apply the passes a plain save recorded (``verify``: see ``verified``)."""
    from graphpatch import verified  # verified -> manager -> loading -> here

    specs = recorded(model_dir, config)
    if specs:
        report = verified.apply(model, specs, model_dir, verify)
        verified.settle(model, report)


def load_fused(model_dir: str | Path, lazy: bool = False) -> tuple:
    """Open a fused save straight into its patched structure.

    Returns:
        (model, tokenizer, config), config as the source model's.
    """
    model_dir = Path(model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    if not is_fused(config):
        raise GraphpatchError(f"{model_dir} is not a fused graphpatch save")
    recorded(model_dir, config)  # the section is checked before it is used
    saved = config.pop("graphpatch")
    config["model_type"] = saved["model_type"]
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
    return model, _tokenizer(model_dir, config), config


def _saved_problem(saved) -> str | None:
    """What is wrong with a saved config's graphpatch section (it may have
    been edited by hand), or None."""
    if not isinstance(saved, dict):
        return "not a mapping"
    if saved.get("format", "fused") not in FORMATS:
        return f"unknown format {saved.get('format')!r}"
    if saved.get("format", "fused") == "fused":
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
        if name not in PASSES:
            return f"unknown pass {name!r}"
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
    for fused, parts in (f for p in PASSES.values() for f in p.fuses.items()):
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
        p = PASSES[entry["name"]]
        options, context = entry["options"], Context(model_dir=None)
        sites = {s.path: s for s in p.find(model, options, context)}
        for path in entry["sites"]:
            if path not in sites or p.why_not(model, sites[path], options, context):
                raise GraphpatchError(
                    f"saved {p.name} site {path} does not fit the model built "
                    "from config.json"
                )
            p.rewrite(model, sites[path], options, context)
