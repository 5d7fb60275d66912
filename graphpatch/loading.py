"""Load a local model directory through mlx-lm, with one clear error per fault.

The real path is ``mlx_lm.load`` (config, sanitize, quantization, sharded
safetensors). Before it runs, the directory is checked so that the usual
faults (no directory, no or broken config.json, an unknown model type,
truncated or missing safetensors) say what is wrong instead of a traceback.
"""

import json
import re
import struct
from collections.abc import Callable
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.utils import _get_classes, load_model, load_tokenizer
from mlx_lm.utils import load as mlx_lm_load

from graphpatch.contract import GraphpatchError


class LoadError(GraphpatchError):
    """A model directory that cannot be loaded; the message says why."""


def read_config(model_dir: Path) -> dict:
    if not model_dir.is_dir():
        raise LoadError(f"{model_dir}: no such directory")
    config_file = model_dir / "config.json"
    if not config_file.is_file():
        raise LoadError(f"{model_dir}: no config.json")
    try:
        config = json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise LoadError(f"{config_file}: not valid JSON ({e})") from None
    if not isinstance(config, dict) or "model_type" not in config:
        raise LoadError(f"{config_file}: no model_type")
    saved = config.get("graphpatch")
    try:
        _get_classes(
            {**config, **({"model_type": saved["model_type"]} if saved else {})}
        )
    except ValueError:
        raise LoadError(
            f"{config_file}: model_type '{config['model_type']}' is not an "
            "architecture the installed mlx-lm knows"
        ) from None
    return config


def check_safetensors(file: Path) -> None:
    """The header parses and the file holds every byte the header promises."""
    size = file.stat().st_size
    with open(file, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise LoadError(f"{file}: not a safetensors file (too short)")
        (length,) = struct.unpack("<Q", head)
        if length > size - 8:
            raise LoadError(f"{file}: not a safetensors file (bad header length)")
        try:
            header = json.loads(f.read(length))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise LoadError(f"{file}: not a safetensors file (bad header)") from None
    ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"]
    if 8 + length + max(ends, default=0) > size:
        raise LoadError(f"{file}: truncated ({size} bytes, header promises more)")


def _weight_map(index_file: Path) -> dict[str, str]:
    try:
        weight_map = json.loads(index_file.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError):
        raise LoadError(f"{index_file}: no weight_map") from None
    if not isinstance(weight_map, dict):
        raise LoadError(f"{index_file}: weight_map is not a mapping")
    return weight_map


def _shards(model_dir: Path, names: set[str] | None = None) -> list[Path]:
    """The safetensors files holding ``names`` (all of them when None), checked."""
    index_file = model_dir / "model.safetensors.index.json"
    if index_file.is_file():
        weight_map = _weight_map(index_file)
        wanted = {f for k, f in weight_map.items() if names is None or k in names}
        files = [model_dir / f for f in sorted(wanted)]
        for file in files:
            if not file.is_file():
                raise LoadError(f"{index_file}: points at missing shard {file.name}")
    else:
        files = sorted(model_dir.glob("model*.safetensors"))
    for file in files:
        check_safetensors(file)
    return files


def check_weights(model_dir: Path) -> None:
    if not sorted(model_dir.glob("model*.safetensors")):
        raise LoadError(f"{model_dir}: no model*.safetensors files")
    _shards(model_dir)


def write_safetensors(
    out: Path,
    shards: list[dict[str, mx.array]],
    progress: Callable[[str], None] | None = None,
) -> None:
    """Write weights as mlx-lm does: one model.safetensors, or one file per
    shard with a ``model.safetensors.index.json`` weight map."""
    if len(shards) == 1:
        mx.save_safetensors(
            str(out / "model.safetensors"), shards[0], {"format": "mlx"}
        )
        return
    weight_map = {}
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        if progress:
            progress(f"writing {name}")
        mx.save_safetensors(str(out / name), shard, {"format": "mlx"})
        weight_map.update(dict.fromkeys(shard, name))
    total = sum(v.nbytes for shard in shards for v in shard.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def read_arrays(model_dir: str | Path, prefix: str) -> dict[str, mx.array]:
    """The checkpoint's arrays named ``prefix*``, lazily (read when evaluated).

    Raises:
        LoadError: a missing or malformed file, or an index that points at a
            missing shard.
    """
    model_dir = Path(model_dir)
    index_file = model_dir / "model.safetensors.index.json"
    names = None
    if index_file.is_file():
        names = {k for k in _weight_map(index_file) if k.startswith(prefix)}
    arrays = {}
    for file in _shards(model_dir, names):
        arrays.update(
            {k: v for k, v in mx.load(str(file)).items() if k.startswith(prefix)}
        )
    return arrays


def load(model_dir: str | Path, lazy: bool = False) -> tuple[nn.Module, object, dict]:
    """Load a local model directory with ``mlx_lm.load``, or a directory
    written by ``graphpatch.save`` straight into its patched structure.

    Args:
        model_dir: a directory with config.json, safetensors and a tokenizer.
        lazy: leave the weights unevaluated (loaded when first used).

    Returns:
        (model, tokenizer, config).

    Raises:
        LoadError: the directory cannot be loaded; the message says why.
    """
    model_dir = Path(model_dir)
    config = read_config(model_dir)
    check_weights(model_dir)
    if "graphpatch" in config:
        from graphpatch import saving

        try:
            return saving.load(model_dir, lazy)
        except (ValueError, KeyError) as e:
            raise LoadError(f"{model_dir}: cannot open the saved model: {e}") from None
    try:
        return mlx_lm_load(str(model_dir), lazy=lazy, return_config=True)
    except ValueError as e:
        if not _only_head_left_over(e):
            raise LoadError(f"{model_dir}: mlx-lm could not load it: {e}") from None
    except (KeyError, OSError, RuntimeError) as e:
        raise LoadError(f"{model_dir}: mlx-lm could not load it: {e}") from None
    # A tied architecture pops lm_head.weight but not a quantized head's scales
    # and biases; load the rest as exo does (strict=False): untied_head binds them.
    model, config = load_model(model_dir, lazy, strict=False)
    tokenizer = load_tokenizer(model_dir, eos_token_ids=config.get("eos_token_id"))
    return model, tokenizer, config


def _only_head_left_over(error: ValueError) -> bool:
    match = re.match(
        r"Received \d+ parameters not in model: \n(.*)\.$", str(error), re.S
    )
    return bool(match) and all(
        name.startswith("lm_head.") for name in match.group(1).split(",\n")
    )
