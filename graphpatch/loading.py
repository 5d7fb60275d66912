"""Load a local model directory through mlx-lm, with one clear error per fault.

The real path is ``mlx_lm.load`` (config, sanitize, quantization, sharded
safetensors). Before it runs, the directory is checked so that the usual
faults (no directory, no or broken config.json, an unknown model type,
truncated or missing safetensors) say what is wrong instead of a traceback.
"""

import json
import struct
from pathlib import Path

import mlx.nn as nn
from mlx_lm.utils import _get_classes
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
    try:
        _get_classes(config)
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


def check_weights(model_dir: Path) -> None:
    files = sorted(model_dir.glob("model*.safetensors"))
    if not files:
        raise LoadError(f"{model_dir}: no model*.safetensors files")
    index_file = model_dir / "model.safetensors.index.json"
    if index_file.is_file():
        try:
            weight_map = json.loads(index_file.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise LoadError(f"{index_file}: no weight_map") from None
        for shard in sorted(set(weight_map.values())):
            if not (model_dir / shard).is_file():
                raise LoadError(f"{index_file}: points at missing shard {shard}")
    for file in files:
        check_safetensors(file)


def load(model_dir: str | Path, lazy: bool = False) -> tuple[nn.Module, object, dict]:
    """Load a local model directory with ``mlx_lm.load``.

    Args:
        model_dir: a directory with config.json, safetensors and a tokenizer.
        lazy: leave the weights unevaluated (loaded when first used).

    Returns:
        (model, tokenizer, config).

    Raises:
        LoadError: the directory cannot be loaded; the message says why.
    """
    model_dir = Path(model_dir)
    read_config(model_dir)
    check_weights(model_dir)
    try:
        return mlx_lm_load(str(model_dir), lazy=lazy, return_config=True)
    except (ValueError, KeyError, OSError, RuntimeError) as e:
        raise LoadError(f"{model_dir}: mlx-lm could not load it: {e}") from None
