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

Either also holds the source's other files and non-hidden sub-folders
(``adapters/``), copied byte for byte and counted in the room a save needs,
and a manifest of every file it wrote (``manifest``). It is written beside OUT,
opened again and compared with the model on a probe, and only then renamed
into place: a killed save leaves no OUT or the complete old one, a save that
would not reopen to the model's logits writes nothing, and nothing graphpatch
cannot prove it wrote is ever replaced.
"""

import contextlib
import json
import math
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten
from mlx_lm.utils import load_model

from graphpatch._version import __version__
from graphpatch.compare import compare, last_logits, probe_tokens
from graphpatch.layout import copies, kept_head, linked_folders, plain_weights
from graphpatch.loading import (
    EXTRA_WEIGHTS,
    write_failure,
    write_safetensors,
)
from graphpatch.manager import replaced
from graphpatch.manifest import write_manifest
from graphpatch.outdir import (
    MODEL_TYPE,
    SaveError,
    check_out,
    check_room,
    locked,
    recover,
    saved_format,
    write_atomically,
)
from graphpatch.plan import known
from graphpatch.report import printable

FORMATS = ("plain", "fused")
MAX_SHARD_BYTES = 5 << 30  # mlx-lm's own limit per safetensors file
NOT_COPIED = "not copying {name}: a link to a folder, not the model's own"
FUSED_SOURCE = (
    "{source} is already a saved patched model (a fused save): save from the "
    "model it was saved from"
)
REPLACED = (
    "{sites} replaced since apply: a save would write graphpatch's arrays over "
    "yours; refused (graphpatch.revert keeps your parts and undoes the rest: "
    "save after it)"
)
NOT_REOPENED = (
    "the save would not reopen as this model ({reason}): nothing was written; "
    "is the source the directory the model was loaded from, and was the model "
    "not changed (quantized, say) since?"
)
REOPENS_ELSEWHERE = (
    "the save reopens to other logits than the model's (max error {error:.3g}, "
    "tolerance {tolerance:.3g}): nothing was written; is the source the "
    "directory the model was loaded from?"
)


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
    for p in known():
        if sites := p.applied(model):
            options_in = p.saving.options_in
            options = {
                **p.settings.defaults,
                **(options_in(model) if options_in else {}),
            }
            record.append({"name": p.name, "options": options, "sites": sites})
    return record


def prepare(source_dir: str | Path, out: str | Path, force: bool) -> list[str]:
    """Recover what killed saves of ``out`` left, then check that ``out`` may
    be written, before any model is loaded; returns what was recovered and
    the source's linked folders a save will not copy.

    Raises:
        SaveError: ``out`` must not be written (see ``outdir.check_out``), the
            source is itself a fused save, or there is no room.
    """
    source_dir, out = Path(source_dir), Path(out)
    place = Path(os.path.abspath(out))
    try:
        return _prepare(source_dir, out, place, force)
    except OSError as e:  # a name too long for the system, a folder unreadable
        raise SaveError(f"cannot write {out}: {e.strerror or e}") from None


def _prepare(source_dir: Path, out: Path, place: Path, force: bool) -> list[str]:
    # The save writes through the absolute name: what the system cannot take
    # (PATH_MAX) must fail here, before anything is loaded.
    with contextlib.suppress(FileNotFoundError, NotADirectoryError):
        os.stat(place.parent)
        os.stat(place)
    done = []
    if place.parent.is_dir():
        with locked(place):
            try:
                done = recover(place)
            except OSError as e:
                raise SaveError(f"cannot tidy up beside {out}: {e}") from None
    try:
        if saved_format(source_dir) == "fused":
            raise SaveError(FUSED_SOURCE.format(source=source_dir))
        check_out(source_dir, out, force)
        weights = sum(f.stat().st_size for f in source_dir.glob("*.safetensors"))
        check_room(out, weights + sum(f.stat().st_size for f in copies(source_dir)))
    except SaveError as e:  # what was tidied is said all the same
        raise SaveError("; ".join([*done, str(e)]), argument=e.argument) from None
    return done + [NOT_COPIED.format(name=name) for name in linked_folders(source_dir)]


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

    The passes and options recorded are read from the model itself. Besides
    the weights and config.json, the save holds the source's other files and
    sub-folders (``adapters/``), copied byte for byte (hidden folders such as
    ``.git`` and ``.cache`` are not copied), a tied model's own ``lm_head.*``
    arrays from the checkpoint (kept apart, so that untied_head binds the
    same head on the save as on the source), and ``graphpatch-manifest.json``.

    Before the save is renamed into place it is opened again (lazily, with
    mlx-lm for a plain save) and its last-position logits on the probe tokens
    are compared with the model's: two probe forwards, with the saved arrays
    read once from the new files (memory peaks at about twice the model's
    weights while they are checked). The manifest hashes every file written
    (sha256: about 2 s per GB on a loaded 2-core machine).

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
        SaveError: ``out`` may not be written, the model is not one the save
            can hold (elided, a site replaced since apply, not the model of
            ``source_dir``), or writing failed. Then nothing was left behind
            and an old ``out`` is as it was.
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
    _check_model(model)
    write = _writer(model, source_dir, format, max_shard_bytes, progress)
    try:
        write_atomically(
            out, write, progress, lambda: check_out(source_dir, out, force)
        )
    except (OSError, RuntimeError) as e:
        raise SaveError(f"cannot write {out}: {write_failure(e)}") from None
    return out


def _check_model(model: nn.Module) -> None:
    for p in known():
        if p.saving.refused and p.applied(model):
            raise SaveError(p.saving.refused)
    sites = replaced(model)
    if sites:
        raise SaveError(REPLACED.format(sites=", ".join(printable(s) for s in sites)))


def _writer(
    model: nn.Module, source_dir: Path, format: str, max_shard_bytes: int, progress
) -> Callable[[Path], None]:
    """What fills the new directory: weights, config, copies, the reopen
    check and, last, the manifest."""
    config = json.loads((source_dir / "config.json").read_text())
    section: dict = {"version": __version__, "format": format}
    section["passes"] = _record(model)
    reopen = "fused"
    if format == "fused":
        weights, aliases = _weights(model)
        extra: dict[str, mx.array] = {}
        section |= {"model_type": config["model_type"], "aliases": aliases}
        config = {**config, "model_type": MODEL_TYPE}
    else:
        weights, extra, config, strays = plain_weights(model, config)
        extra |= kept_head(source_dir, {**weights, **extra})
        reopen = "graphpatch" if strays else "mlx_lm"

    def write(tmp: Path) -> None:
        write_safetensors(tmp, _shards(weights, max_shard_bytes), progress)
        if extra:
            mx.save_safetensors(str(tmp / EXTRA_WEIGHTS), extra, {"format": "mlx"})
        progress("writing config.json")
        saved = {**config, "graphpatch": section}
        (tmp / "config.json").write_text(json.dumps(saved, indent=2))
        for name in linked_folders(source_dir):
            progress(NOT_COPIED.format(name=name))
        for file in copies(source_dir):
            target = tmp / file.relative_to(source_dir)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(file, target)
        progress("checking that the save reopens to the model's logits")
        _check_reopens(model, tmp, reopen)
        progress("writing the manifest")
        write_manifest(tmp, section)

    return write


def _check_reopens(model: nn.Module, tmp: Path, how: str) -> None:
    """The save, opened again lazily, gives the model's last-position logits.

    Raises:
        SaveError: it does not open, or gives other logits.
    """
    tokens = probe_tokens(None)
    expected = last_logits(model, tokens)
    try:
        if how == "mlx_lm":
            reopened = load_model(tmp, lazy=True, strict=True)[0]
        elif how == "fused":
            from graphpatch.opening import build_fused  # opening imports saving

            reopened = build_fused(tmp, lazy=True)[0]
        else:
            from graphpatch.opening import load

            reopened = load(tmp, lazy=True, verify="never")[0]
        found = last_logits(reopened, tokens)
    except Exception as e:
        reason = printable(f"{type(e).__name__}: {e}".splitlines()[0])
        raise SaveError(NOT_REOPENED.format(reason=reason)) from None
    comparison = compare([expected], [found])
    if not comparison.ok:
        raise SaveError(
            REOPENS_ELSEWHERE.format(
                error=comparison.max_error, tolerance=comparison.tolerance
            )
        )


def check_format(format: str) -> None:
    if format not in FORMATS:
        raise SaveError(
            f"format is one of {', '.join(FORMATS)}, got {format}", argument="format"
        )


def max_shard_bytes(megabytes: float) -> int:
    """``--max-shard-mb`` as bytes; a finite size of at least one byte."""
    if not math.isfinite(megabytes) or megabytes * 2**20 < 1:
        raise SaveError(
            f"max_shard_mb must be a positive size, got {megabytes}",
            argument="max_shard_mb",
        )
    return int(megabytes * 2**20)
