"""Find a model (a directory or a Hugging Face repo id), read and write its
arrays, and load it through mlx-lm (config, sanitize, quantization, sharded
safetensors) once ``checks`` has passed it.
"""

import contextlib
import json
import re
import traceback
from collections.abc import Callable
from pathlib import Path

import huggingface_hub.constants
import mlx.core as mx
import mlx.nn as nn
from huggingface_hub import snapshot_download
from mlx_lm.utils import (
    DEFAULT_ALLOW_PATTERNS,
    hf_repo_to_path,
    load_model,
    load_tokenizer,
)
from mlx_lm.utils import load as mlx_lm_load

from graphpatch.checks import LoadError, checked_shards

# owner/name as the Hugging Face Hub spells repo ids (a path that exists wins).
REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")


@contextlib.contextmanager
def quiet_transformers():
    """transformers' warnings off (a model_type it does not know, a prompt
    longer than a tokenizer's nominal limit): graphpatch says what matters."""
    from transformers.utils import logging

    level = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        yield
    finally:
        logging.set_verbosity(level)


def model_path(name: str | Path) -> Path:
    """A local directory, or a Hugging Face repo id found as mlx-lm finds it:
    in the local Hugging Face cache first, else downloaded.

    Raises:
        LoadError: neither a directory nor a repo id that can be had.
    """
    path = Path(name)
    if path.exists() or not REPO_ID.fullmatch(str(name)):
        return path
    try:
        return hf_repo_to_path(str(name))  # the cache only
    except Exception:
        pass
    if huggingface_hub.constants.HF_HUB_OFFLINE:
        raise LoadError(
            f"{name}: no such directory, and not in the Hugging Face cache "
            "(HF_HUB_OFFLINE is set, so it was not downloaded)"
        )
    try:
        return Path(snapshot_download(str(name), allow_patterns=DEFAULT_ALLOW_PATTERNS))
    except Exception as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise LoadError(
            f"{name}: no such directory, and not downloadable as a Hugging Face "
            f"repo id ({reason})"
        ) from None


def write_failure(error: Exception) -> str:
    """Why a write failed, in one line: the OS's words for an OSError, the
    first line of what MLX raised (its save_safetensors raises RuntimeError)."""
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    return str(error).strip().splitlines()[0] if str(error).strip() else repr(error)


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


# What a plain save holds that its architecture does not load (an untied head
# of an always-tied architecture): mlx-lm reads only model*.safetensors, and
# untied_head reads this file too when graphpatch re-applies it.
EXTRA_WEIGHTS = "graphpatch-extra.safetensors"


def read_arrays(model_dir: str | Path, prefix: str) -> dict[str, mx.array]:
    """The checkpoint's arrays named ``prefix*``, lazily (read when evaluated).

    Raises:
        LoadError: a missing or malformed file, or an index that points at a
            missing shard.
    """
    model_dir = Path(model_dir)
    arrays = {}
    files = list(checked_shards(model_dir, prefix))
    if (model_dir / EXTRA_WEIGHTS).is_file():
        files.append(model_dir / EXTRA_WEIGHTS)
    for file in files:
        arrays.update(
            {k: v for k, v in mx.load(str(file)).items() if k.startswith(prefix)}
        )
    return arrays


def _why(error: Exception) -> str:
    """An exception's first line; for one without words (a bare assert in
    mlx-lm), where it was raised and the line that raised it."""
    words = str(error).strip()
    if words:
        return f"{type(error).__name__}: {words.splitlines()[0]}"
    frame = traceback.extract_tb(error.__traceback__)[-1]
    place = f"{Path(frame.filename).parent.name}/{Path(frame.filename).name}"
    return f"{type(error).__name__} at {place}:{frame.lineno}: {frame.line}"


def mlx_lm_load_checked(model_dir: Path, lazy: bool) -> tuple[nn.Module, object, dict]:
    """``mlx_lm.load``, its errors as one LoadError line; a tied model whose
    checkpoint holds a quantized head's scales and biases loads too."""
    try:
        return mlx_lm_load(str(model_dir), lazy=lazy, return_config=True)
    except ValueError as e:
        if not _only_head_left_over(e):
            raise LoadError(f"{model_dir}: mlx-lm could not load it: {e}") from None
    except Exception as e:  # what mlx-lm raises for a config it cannot build
        raise LoadError(f"{model_dir}: mlx-lm could not load it ({_why(e)})") from None
    # A tied architecture pops lm_head.weight but not a quantized head's scales
    # and biases; load the rest as exo does (strict=False): untied_head binds them.
    model, config = load_model(model_dir, lazy, strict=False)
    tokenizer = load_tokenizer(model_dir, eos_token_ids=config.get("eos_token_id"))
    return model, tokenizer, config


def _only_head_left_over(error: ValueError) -> bool:
    # mlx's load_weights says which names it did not expect only in its
    # message; no structured form exists to read instead.
    match = re.match(
        r"Received \d+ parameters not in model: \n(.*)\.$", str(error), re.S
    )
    return match is not None and all(
        name.startswith("lm_head.") for name in match.group(1).split(",\n")
    )
