"""Save a patched model as a model directory (``opening`` opens it again).

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

from graphpatch._version import __version__
from graphpatch.loading import EXTRA_WEIGHTS, write_failure, write_safetensors
from graphpatch.outdir import (
    MODEL_TYPE,
    SaveError,
    check_out,
    check_room,
    format_of,
    recover,
    write_atomically,
)
from graphpatch.passes import PASSES

FORMATS = ("plain", "fused")
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
    if format_of(config) == "fused":
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
