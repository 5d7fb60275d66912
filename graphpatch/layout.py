"""What a save writes besides the patched model's own arrays: for the plain
format, the names and config under which the unpatched architecture loads
them, and the checkpoint's own head; for both, the source's other files.
"""

import dataclasses
import os
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from graphpatch.loading import read_arrays
from graphpatch.manifest import MANIFEST, MARKER
from graphpatch.plan import known


def plain_weights(model: nn.Module, config: dict) -> tuple[dict, dict, dict, bool]:
    """The weights under the names the unpatched architecture loads, those it
    does not load (kept apart), the config that loads the rest, and whether
    any were kept apart."""
    weights = dict(tree_flatten(model.parameters()))
    for p in known():
        if p.saving.plain is not None and p.applied(model):
            weights = p.saving.plain(model, weights)
    stray = _not_loaded(model, weights)
    untied = _untied_config(model, config, stray)
    if untied is not None:
        return weights, {}, untied, False
    extra = {name: weights.pop(name) for name in stray}
    return weights, extra, config, bool(extra)


def kept_head(source_dir: Path, saved: dict) -> dict[str, mx.array]:
    """The checkpoint's own ``lm_head.*`` arrays when the save holds no head
    of its own: a tied architecture's loader drops them, untied_head reads
    them (from the extra weights file) on the save as on the source."""
    if any(name.startswith("lm_head.") for name in saved):
        return {}
    return read_arrays(source_dir, "lm_head.")


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


def copies(source_dir: Path) -> list[Path]:
    """The source's files a save copies byte for byte (rather than mlx-lm's
    tokenizer.save_pretrained, which writes them anew): every file but the
    weights and config, and every file of its sub-folders but hidden ones
    (``.git``, ``.cache``: a clone's or a download's own bookkeeping) and
    linked ones (``data -> /big/dir`` is not the model's; ``linked`` names
    them). A linked file is copied as the bytes it points to (a hub cache
    links every file to a blob)."""
    skip = {"config.json", "model.safetensors.index.json", MANIFEST, MARKER}
    if not source_dir.is_dir():
        return []  # loading it will say why
    found = [
        file
        for file in sorted(source_dir.iterdir())
        if file.is_file() and file.name not in skip and file.suffix != ".safetensors"
    ]
    for folder in sorted(source_dir.iterdir()):
        if folder.is_dir() and not folder.is_symlink() and folder.name[0] != ".":
            for root, dirs, names in os.walk(folder):
                dirs[:] = sorted(d for d in dirs if not d.startswith("."))
                found += [p for n in sorted(names) if (p := Path(root, n)).is_file()]
    return found


def linked_folders(source_dir: Path) -> list[str]:
    """The source's sub-folders that are links, which a save does not copy."""
    if not source_dir.is_dir():
        return []
    return [
        f"{p.name}/"
        for p in sorted(source_dir.iterdir())
        if p.is_symlink() and p.is_dir()
    ]
