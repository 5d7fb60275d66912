"""What untied_head binds and how it proves it: the tied head (the
embedding's own arrays), the checkpoint's ``lm_head.*`` as a layer, the proof
that a checkpoint is this model's, and the head matmul computed apart from
any module."""

import json
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

from graphpatch.compare import PROBE_TOKENS, dtype_name
from graphpatch.contract import GraphpatchError, replace_at
from graphpatch.embedding import dims_of, find_embedding
from graphpatch.loading import read_arrays

NO_HEAD = "no LM head found: no vocabulary-sized top-level linear and no embedding"
NOT_PROVEN = (
    "left tied: cannot prove {dir} is this model's checkpoint (it holds no "
    "{name} to compare with the loaded model)"
)
NOT_THIS_MODEL = (
    "left tied: {dir} is not this model's checkpoint ({name} differs from the "
    "loaded model's); give the directory the model was loaded from"
)


def config_tie(model_dir: Path) -> str:
    config = json.loads((model_dir / "config.json").read_text())
    if "tie_word_embeddings" not in config:
        return "has no tie_word_embeddings"
    return f"tie_word_embeddings={str(config['tie_word_embeddings']).lower()}"


def not_this_model(model: nn.Module, model_dir: str) -> str | None:
    """Why the checkpoint cannot be proven to be the one ``model`` was loaded
    from, or None: its embedding and norms must equal the loaded ones."""
    found = find_embedding(model)
    if found is None:
        return NO_HEAD
    path, embedding = found
    mine = {f"{path}.{k}": v for k, v in tree_flatten(embedding.parameters())}
    mine |= {k: v for k, v in tree_flatten(model.parameters()) if v.ndim == 1}
    theirs = read_arrays(model_dir, "")
    if f"{path}.weight" not in theirs:
        return NOT_PROVEN.format(dir=model_dir, name=f"{path}.weight")
    for name, value in mine.items():
        other = theirs.get(name)
        if other is not None and not (
            other.shape == value.shape and mx.array_equal(other, value).item()
        ):
            return NOT_THIS_MODEL.format(dir=model_dir, name=name)
    return None


class _Reached(Exception):
    pass


class _Sentinel(nn.Module):
    def __call__(self, x: mx.array) -> mx.array:
        raise _Reached


class CheckpointHeadError(GraphpatchError):
    """The checkpoint's lm_head.* arrays are missing pieces or have wrong shapes."""


def tied_head(embedding: nn.Module) -> nn.Module:
    """A Linear / QuantizedLinear holding the embedding's own arrays."""
    vocab, dims = embedding.weight.shape[0], dims_of(embedding)
    if isinstance(embedding, nn.QuantizedEmbedding):
        head = nn.QuantizedLinear(
            dims, vocab, False, embedding.group_size, embedding.bits, embedding.mode
        )
    else:
        head = nn.Linear(dims, vocab, bias=False)
    # Lazy random init above is never evaluated: replaced before use.
    head.update({k: v for k, v in embedding.items() if k in head})
    return head


def checkpoint_head(arrays: dict[str, mx.array], embedding: nn.Module) -> nn.Module:
    """A head holding the checkpoint's lm_head.* arrays, checked against the
    shapes a head for this embedding must have."""
    vocab, dims = embedding.weight.shape[0], dims_of(embedding)
    given = {k.removeprefix("lm_head."): v for k, v in arrays.items()}
    if "scales" in given:
        if not isinstance(embedding, nn.QuantizedEmbedding):
            raise CheckpointHeadError(
                "lm_head.scales in the checkpoint, but the embedding is not "
                "quantized: cannot tell the head's bits and group size"
            )
        head = tied_head(embedding)
    else:
        head = nn.Linear(dims, vocab, bias="bias" in given)
    wanted = dict(tree_flatten(head.parameters()))
    if given.keys() != wanted.keys():
        raise CheckpointHeadError(
            f"checkpoint lm_head.* holds {sorted(given)}, a head for this "
            f"embedding needs {sorted(wanted)}"
        )
    for key, value in given.items():
        if value.shape != wanted[key].shape:
            raise CheckpointHeadError(
                f"checkpoint lm_head.{key} has shape {tuple(value.shape)}, "
                f"expected {tuple(wanted[key].shape)}"
            )
        if value.dtype != wanted[key].dtype and not (
            mx.issubdtype(value.dtype, mx.floating)
            and mx.issubdtype(wanted[key].dtype, mx.floating)
        ):
            raise CheckpointHeadError(
                f"checkpoint lm_head.{key} is {dtype_name(value.dtype)}, a head "
                f"needs {dtype_name(wanted[key].dtype)}"
            )
    head.update(tree_unflatten(list(given.items())))
    if not all_finite(head):
        raise CheckpointHeadError("checkpoint lm_head.* holds NaN or inf values")
    return head


def all_finite(head: nn.Module, chunk: int = 8192) -> bool:
    """Whether every weight of the head (dequantized) is finite."""
    return all(
        mx.isfinite(dense_weight(head, slice(start, start + chunk))).all().item()
        for start in range(0, head.weight.shape[0], chunk)
    )


def dense_weight(head: nn.Module, rows: slice = slice(None)) -> mx.array:
    """The head's weight rows as float32, dequantized when quantized."""
    if not isinstance(head, nn.QuantizedLinear):
        return head.weight[rows].astype(mx.float32)
    biases = head.get("biases")
    return mx.dequantize(
        head.weight[rows],
        head.scales[rows],
        None if biases is None else biases[rows],
        head.group_size,
        head.bits,
        mode=head.mode,
        dtype=mx.float32,
    )


def dense_matmul(h: mx.array, head: nn.Module, chunk: int = 8192) -> mx.array:
    """``h @ W.T`` in float32 with W dequantized a block of rows at a time,
    each evaluated before the next: never the whole float head at once."""
    parts = []
    for start in range(0, head.weight.shape[0], chunk):
        part = h.astype(mx.float32) @ dense_weight(head, slice(start, start + chunk)).T
        mx.eval(part)
        parts.append(part)
    return mx.concatenate(parts, axis=-1)


def max_difference(a: nn.Module, b: nn.Module, chunk: int = 8192) -> float:
    # Row chunks: a dequantized 150k-vocabulary head would be gigabytes at once.
    worst = 0.0
    for start in range(0, a.weight.shape[0], chunk):
        rows = slice(start, start + chunk)
        diff = mx.abs(dense_weight(a, rows) - dense_weight(b, rows)).max().item()
        worst = diff if not diff <= worst else worst  # NaN must not read as equal
    return worst


def consults(model: nn.Module, parent: nn.Module, key: str) -> bool:
    """Whether the model's forward reaches ``parent[key]``: it is swapped for
    a sentinel that raises while the lazy graph is built (nothing evaluated)."""
    held = replace_at(parent, key, _Sentinel())
    try:
        model(mx.array(PROBE_TOKENS)[:1, :4])
    except _Reached:
        return True
    finally:
        replace_at(parent, key, held)
    return False
