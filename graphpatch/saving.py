"""Save a patched model as a directory that opens straight into its patched
structure, and open it.

The directory holds the weights under their patched names (``gate_up_proj``,
``embed_tokens.lm_head``), each array once (a tied head's names are recorded
as aliases), a config.json whose ``graphpatch`` section records the passes,
their sites and the original ``model_type``, and the tokenizer and other files
of the source directory. ``model_type`` itself reads ``graphpatch``, so
``mlx_lm.load`` refuses it with a message naming ``graphpatch.load``.

It is written to a hidden temporary directory next to OUT and renamed, so an
interrupted save leaves no OUT.
"""

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten
from mlx_lm.utils import _get_classes, infer_quant_config, load_tokenizer

import graphpatch
from graphpatch.contract import GraphpatchError
from graphpatch.loading import read_arrays, write_safetensors
from graphpatch.passes import PASSES
from graphpatch.plan import resolve

MODEL_TYPE = "graphpatch (a patched model: open it with graphpatch.load)"
MAX_SHARD_BYTES = 5 << 30  # mlx-lm's own limit per safetensors file


class SaveError(GraphpatchError):
    """A model or an OUT that cannot be saved; nothing was written."""


def _weights(model: nn.Module) -> tuple[dict[str, mx.array], dict[str, str]]:
    """Each array once, and ``alias -> name`` for arrays held twice (a tied
    head holds the embedding's own)."""
    weights, aliases, seen = {}, {}, {}
    for name, array in tree_flatten(model.parameters()):
        if id(array) in seen:
            aliases[name] = seen[id(array)]
        else:
            seen[id(array)] = name
            weights[name] = array
    return weights, aliases


def _shards(weights: dict[str, mx.array], max_bytes: int) -> list[dict]:
    shards, current, size = [], {}, 0
    for name, array in weights.items():
        if current and size + array.nbytes > max_bytes:
            shards.append(current)
            current, size = {}, 0
        current[name] = array
        size += array.nbytes
    return [*shards, current] if current else shards


def _record(model: nn.Module, passes: list[str] | str | None) -> list[dict]:
    plan, _ = resolve(passes)  # None: the env's, as apply read them
    options = {p.name: o for p, o in plan}
    record = []
    for name, p in PASSES.items():
        sites = p.applied(model)
        if sites:
            record.append(
                {"name": name, "options": options.get(name, p.options), "sites": sites}
            )
    return record


def save(
    model: nn.Module,
    source_dir: str | Path,
    out: str | Path,
    passes: list[str] | str | None = None,
    force: bool = False,
    max_shard_bytes: int = MAX_SHARD_BYTES,
    progress: Callable[[str], None] | None = None,
) -> Path:
    """Write ``model`` (patched) as a model directory ``out``.

    Args:
        model: a model patched by ``graphpatch.apply``.
        source_dir: the directory it was loaded from (config, tokenizer).
        out: the directory to create.
        passes: the pass specs it was patched with (for their options).
        force: replace an existing ``out``.
        max_shard_bytes: the largest safetensors file; more get an index.
        progress: called with a short line per file written.

    Raises:
        SaveError: ``out`` exists without ``force``, or the model cannot be saved.
    """
    source_dir, out = Path(source_dir), Path(out)
    progress = progress or (lambda line: None)
    if out.exists() and not force:
        raise SaveError(f"{out} exists (use --force to replace it)")
    if PASSES["elide_head"].applied(model):
        raise SaveError("an elided model is one rank's view: save it before elide_head")
    config = json.loads((source_dir / "config.json").read_text())
    if config.get("model_type") == MODEL_TYPE:
        raise SaveError(f"{source_dir} is already a saved patched model")
    for stale in out.parent.glob(f".{out.name}.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)  # left by a killed save
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    tmp.mkdir(parents=True)
    try:
        weights, aliases = _weights(model)
        write_safetensors(tmp, _shards(weights, max_shard_bytes), progress)
        config["graphpatch"] = {
            "version": graphpatch.__version__,
            "model_type": config["model_type"],
            "passes": _record(model, passes),
            "aliases": aliases,
        }
        config["model_type"] = MODEL_TYPE
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        _copy_other_files(source_dir, tmp)
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _copy_other_files(source_dir: Path, out: Path) -> None:
    skip = {"config.json", "model.safetensors.index.json"}
    for file in source_dir.iterdir():
        if file.is_file() and file.name not in skip and file.suffix != ".safetensors":
            shutil.copy2(file, out / file.name)


def is_saved(config: dict) -> bool:
    return config.get("model_type") == MODEL_TYPE


def load(model_dir: str | Path, lazy: bool = False) -> tuple[nn.Module, object, dict]:
    """Open a directory written by ``save`` straight into its patched structure.

    Returns:
        (model, tokenizer, config), config as the source model's.
    """
    model_dir = Path(model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    if not is_saved(config):
        raise GraphpatchError(f"{model_dir} was not written by graphpatch save")
    saved = config.pop("graphpatch")
    config["model_type"] = saved["model_type"]
    weights = read_arrays(model_dir, "")
    model_class, args_class = _get_classes(config)
    model = model_class(args_class.from_dict(config))
    _quantize(model, config, weights)
    _rewrite(model, saved["passes"])
    for alias, name in saved["aliases"].items():
        weights[alias] = weights[name]  # the same array: tied stays tied
    model.load_weights(list(weights.items()), strict=True)
    if not lazy:
        mx.eval(model.parameters())
    model.eval()
    return model, _tokenizer(model_dir, config), config


def _tokenizer(model_dir: Path, config: dict):
    from transformers.utils import logging

    # transformers warns that config.json's model_type is not one it knows.
    level = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        return load_tokenizer(model_dir, eos_token_ids=config.get("eos_token_id"))
    finally:
        logging.set_verbosity(level)


def _quantize(model: nn.Module, config: dict, weights: dict) -> None:
    """Quantize the unpatched skeleton as mlx-lm's loader would, seeing each
    fused ``gate_up_proj`` array under its gate and up names too."""
    quantization = config.get("quantization")
    if quantization is None:
        if config.get("quantization_config"):
            raise GraphpatchError("graphpatch.load needs config['quantization']")
        return
    names = dict(weights)
    for key, value in weights.items():
        if ".gate_up_proj." in key:
            names[key.replace(".gate_up_proj.", ".gate_proj.")] = value
            names[key.replace(".gate_up_proj.", ".up_proj.")] = value

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
        options = {**entry["options"], "model_dir": None}
        sites = {s.path: s for s in p.find(model, options)}
        for path in entry["sites"]:
            if path not in sites or p.why_not(model, sites[path], options):
                raise GraphpatchError(
                    f"saved {p.name} site {path} does not fit the model built "
                    "from config.json"
                )
            p.rewrite(model, sites[path], options)
