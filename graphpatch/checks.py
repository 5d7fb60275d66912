"""What graphpatch checks in a model directory before MLX or mlx-lm reads
it, so that the usual faults (no directory, a broken or hand-edited
config.json, an unknown model type, values that would crash or hang mlx-lm,
truncated or missing safetensors, a FIFO where a file should be) each get one
line that says what is wrong instead of a traceback or a hang.
"""

import contextlib
import dataclasses
import io
import json
import re
import stat
import typing
from pathlib import Path
from typing import Any

from safetensors import SafetensorError, safe_open

from graphpatch.contract import GraphpatchError


class LoadError(GraphpatchError):
    """A model directory that cannot be loaded; the message says why."""


def model_classes(config: dict) -> tuple[Any, Any]:
    """(Model, ModelArgs) of ``config`` as mlx-lm's loader resolves them,
    remapped model types included. mlx-lm names no public function for this
    (``load_model`` takes it as its ``get_model_classes`` default), so its
    private one is used here, and only here.

    Raises:
        ValueError: an architecture the installed mlx-lm does not have.
    """
    from mlx_lm.utils import _get_classes

    return _get_classes(config)


def regular_file(file: Path, what: str = "file") -> Path:
    """``file`` when it is a regular file (after links); never open a FIFO,
    a device or a directory, which would hang or fail deep inside a reader."""
    try:
        mode = file.stat().st_mode
    except FileNotFoundError:
        raise LoadError(f"{file}: no such {what}") from None
    except OSError as e:
        raise LoadError(f"{file}: cannot be read ({e.strerror})") from None
    if stat.S_ISDIR(mode):
        raise LoadError(f"{file}: is a directory, not a {what}")
    if not stat.S_ISREG(mode):
        raise LoadError(f"{file}: not a regular file (a FIFO, socket or device)")
    return file


def _check_entries(model_dir: Path) -> None:
    """Every file mlx-lm may open in the directory is a regular file (a FIFO
    would hang it). A dangling link is passed over unless mlx-lm surely reads
    it (config.json, the weights): it cannot hang anything, and mlx-lm opens
    the directory."""
    for entry in sorted(model_dir.iterdir()):
        read = entry.name == "config.json" or entry.suffix == ".safetensors"
        if entry.is_symlink() and not entry.exists() and not read:
            continue
        if entry.suffix in (".json", ".safetensors", ".model", ".txt", ".jinja"):
            try:
                regular_file(entry)
            except LoadError:
                if entry.is_dir() and entry.suffix not in (".json", ".safetensors"):
                    continue
                raise


NOT_A_DIRECTORY = "is a file, not a model directory"


def read_config(model_dir: Path) -> dict:
    if not model_dir.is_dir():
        if model_dir.exists():
            raise LoadError(f"{model_dir}: {NOT_A_DIRECTORY}")
        raise LoadError(f"{model_dir}: no such directory")
    config_file = model_dir / "config.json"
    if not config_file.exists() and not config_file.is_symlink():
        raise LoadError(f"{model_dir}: no config.json")
    _check_entries(model_dir)
    try:
        config = json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise LoadError(f"{config_file}: not valid JSON ({e})") from None
    except RecursionError:
        raise LoadError(f"{config_file}: nested too deep to be a config") from None
    if not isinstance(config, dict) or not isinstance(config.get("model_type"), str):
        raise LoadError(f"{config_file}: no model_type string")
    model_type = config["model_type"]
    if model_type.startswith("graphpatch"):  # a fused save names its own
        saved = config.get("graphpatch")
        if not isinstance(saved, dict) or not isinstance(saved.get("model_type"), str):
            return config  # graphpatch.load says what is wrong with the section
        model_type = saved["model_type"]
    printed = io.StringIO()  # what a module says before it exits
    try:
        with contextlib.redirect_stdout(printed):
            model_classes({**config, "model_type": model_type})
    except ValueError:
        raise LoadError(
            f"{config_file}: model_type '{model_type}' is not an "
            "architecture the installed mlx-lm knows"
        ) from None
    except SystemExit:  # olmo's module exits when ai2-olmo is missing
        said = " ".join(printed.getvalue().split()) or "no message"
        raise LoadError(
            f"{config_file}: mlx-lm's '{model_type}' module exits on import "
            f"and says: {said}"
        ) from None
    return config


def check_safetensors(file: Path) -> list[str]:
    """The header parses and the file holds every byte the header promises
    (``safetensors.safe_open`` checks both); returns the tensor names."""
    regular_file(file, "safetensors file")
    try:
        with safe_open(file, "numpy") as f:
            return list(f.keys())
    except (SafetensorError, OSError, ValueError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        if "not fully covered" in reason or "incomplete" in reason:
            raise LoadError(f"{file}: truncated ({reason})") from None
        raise LoadError(f"{file}: not a safetensors file ({reason})") from None


def _weight_map(index_file: Path) -> dict[str, str]:
    regular_file(index_file)
    try:
        weight_map = json.loads(index_file.read_text())["weight_map"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
        raise LoadError(f"{index_file}: no weight_map") from None
    if not isinstance(weight_map, dict) or not all(
        isinstance(v, str) and "/" not in v and v not in ("", ".", "..")
        for v in weight_map.values()
    ):
        raise LoadError(f"{index_file}: weight_map is not a mapping of file names")
    return weight_map


def checked_shards(model_dir: Path, prefix: str = "") -> dict[Path, list[str]]:
    """The safetensors files holding the tensors named ``prefix*`` (where an
    index says which), each checked once, with the tensor names it holds."""
    index_file = model_dir / "model.safetensors.index.json"
    if index_file.is_file():
        weight_map = _weight_map(index_file)
        wanted = {f for k, f in weight_map.items() if k.startswith(prefix)}
        files = [model_dir / f for f in sorted(wanted)]
        for file in files:
            if not file.exists() and not file.is_symlink():
                raise LoadError(f"{index_file}: points at missing shard {file.name}")
    else:
        files = sorted(model_dir.glob("model*.safetensors"))
    return {file: check_safetensors(file) for file in files}


def check_weights(model_dir: Path) -> list[str]:
    """Every safetensors file is whole; returns the names of all tensors."""
    if not sorted(model_dir.glob("model*.safetensors")):
        raise LoadError(f"{model_dir}: no model*.safetensors files")
    return [name for names in checked_shards(model_dir).values() for name in names]


def check_config(model_dir: Path, config: dict, names: list[str]) -> None:
    """Values mlx-lm would choke on (a crash, a hang building 10^12 layers),
    named by their key before mlx-lm sees them."""
    where = model_dir / "config.json"
    quantization = config.get("quantization")
    if quantization is not None and not (
        isinstance(quantization, dict)
        and all(_is_int(quantization.get(k)) for k in ("bits", "group_size"))
    ):
        raise LoadError(f"{where}: quantization must map bits and group_size to ints")
    _, args_class = model_classes(config)
    problem = _args_problem(config, args_class)
    if problem:
        raise LoadError(f"{where}: {problem}")
    in_weights = {
        int(m) for m in re.findall(r"\.(?:layers|h|blocks)\.(\d+)\.", " ".join(names))
    }
    for key in LAYER_KEYS:
        count = config.get(key)
        if isinstance(count, int) and in_weights and count > max(in_weights) + 1:
            raise LoadError(
                f"{where}: {key} is {count}, but the weights hold "
                f"{max(in_weights) + 1} layers"
            )


LAYER_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")


LARGEST_INT = 2**31  # no real size, count or id is larger


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _args_problem(config: dict, args_class) -> str | None:
    """A missing field of mlx-lm's ModelArgs, or a number of the wrong type."""
    try:
        hints = typing.get_type_hints(args_class)
    except Exception:
        hints = {}
    for f in (
        dataclasses.fields(args_class) if dataclasses.is_dataclass(args_class) else []
    ):
        required = (
            f.default is dataclasses.MISSING
            and f.default_factory is dataclasses.MISSING
        )
        if f.name not in config:
            if required:
                return f"{f.name} is missing (mlx-lm's {config['model_type']} needs it)"
            continue
        value, hint = config[f.name], hints.get(f.name)
        if hint is int and not _is_int(value):
            return f"{f.name} must be an integer, got {value!r}"
        if hint is float and (
            isinstance(value, bool) or not isinstance(value, (int, float))
        ):
            return f"{f.name} must be a number, got {value!r}"
        if _is_int(value) and abs(value) >= LARGEST_INT:
            return f"{f.name} is {value}, larger than any real model's"
    return None
