"""The LM head: where it is, how to build one from arrays, and whether the
model's forward really reaches it. Shared by untied_head, last_token and
elide_head.
"""

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

from graphpatch.contract import GraphpatchError, walk
from graphpatch.loading import read_arrays
from graphpatch.record import inputs
from graphpatch.verify import PROBE_TOKENS, dtype_name

HEADS = (nn.Linear, nn.QuantizedLinear)
EMBEDDINGS = (nn.Embedding, nn.QuantizedEmbedding)


class CheckpointHeadError(GraphpatchError):
    """The checkpoint's lm_head.* arrays are missing pieces or have wrong shapes."""


class StandIn:
    """Marks a module another pass put where a top-level head was (it holds
    no vocabulary weight, only ``vocab``)."""

    vocab: int


def _vocab_size(module: nn.Module) -> int | None:
    if isinstance(module, HEADS):
        return module.weight.shape[0]
    return module.vocab if isinstance(module, StandIn) else None


class Headed:
    """The marker untied_head puts on an embedding: its ``as_linear`` runs
    its explicit ``lm_head`` child."""

    def as_linear(self, x):
        return self.lm_head(x)


def logits_width(model: nn.Module) -> int | None:
    """The last dimension of the model's output, from the shapes of a forward
    that is built but never evaluated; None when the model cannot run."""
    try:
        return model(mx.array(PROBE_TOKENS)[:1, :2]).shape[-1]
    except Exception:
        return None


def find_embedding(model: nn.Module) -> tuple[str, nn.Module] | None:
    """The token embedding: the first embedding with one row per logit (a
    position embedding, like gpt2's wpe, has other rows)."""
    embeddings = [(p, m) for p, m in walk(model) if isinstance(m, EMBEDDINGS)]
    width = logits_width(model) if len(embeddings) > 1 else None
    for path, module in embeddings:
        if width in (None, module.weight.shape[0]):
            return path, module
    return embeddings[0] if embeddings else None


def _near_top(model: nn.Module):
    """Children of the model and of its direct sub-modules (``lm_head``,
    ``model.embed_out``), never inside layer lists."""
    for key, child in model.items():
        yield key, child
        if isinstance(child, nn.Module):
            for name, grandchild in child.items():
                yield f"{key}.{name}", grandchild


def head_path(
    model: nn.Module, embedding: tuple[str, nn.Module] | None = None
) -> str | None:
    """Where the explicit head is: a vocabulary linear at the top (or one
    level down), or the ``lm_head`` untied_head gave the embedding."""
    embedding = embedding or find_embedding(model)
    if embedding is None:
        return None
    path, module = embedding
    for key, child in _near_top(model):
        if _vocab_size(child) == module.weight.shape[0]:
            return key
    return f"{path}.lm_head" if isinstance(module, Headed) else None


def head_tap(model: nn.Module) -> tuple[str, str] | None:
    """Where the head's input can be recorded: a top-level vocabulary
    linear's ``__call__``, or the embedding's ``as_linear`` (a tied head,
    before and after untied_head gives it an explicit lm_head)."""
    embedding = find_embedding(model)
    if embedding is None:
        return None
    path, module = embedding
    for key, child in _near_top(model):
        if _vocab_size(child) == module.weight.shape[0]:
            return key, "__call__"
    return path, "as_linear"


def head_input(
    model: nn.Module, dtype: mx.Dtype, recorded: dict, positions: int
) -> mx.array:
    """The last ``positions`` of what the model fed its head in the reference
    forward (the head treats each position alike, and with a large vocabulary
    it is most of a forward); synthetic inputs of ``dtype`` only where nothing
    was recorded."""
    tap = head_tap(model)
    calls = inputs(recorded, tap) if tap else []
    if calls:
        return calls[0][0][..., -positions:, :]
    embedding = find_embedding(model)
    if embedding is None:
        raise ValueError("no token embedding to size a head's input by")
    dims = dims_of(embedding[1])
    shape = (2, positions, dims)
    return mx.random.normal(shape, key=mx.random.key(7)).astype(dtype)


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


def dims_of(embedding: nn.Module) -> int:
    if isinstance(embedding, nn.QuantizedEmbedding):
        return embedding.dims
    return embedding.weight.shape[1]


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


class _Reached(Exception):
    pass


class _Sentinel(nn.Module):
    def __call__(self, x):
        raise _Reached


def consults(model: nn.Module, parent: nn.Module, key: str) -> bool:
    """Whether the model's forward reaches ``parent[key]``: it is swapped for
    a sentinel that raises while the lazy graph is built (nothing evaluated)."""
    held = parent[key]
    parent[key] = _Sentinel()
    try:
        model(mx.array(PROBE_TOKENS)[:1, :4])
    except _Reached:
        return True
    finally:
        parent[key] = held
    return False


def is_tied(model: nn.Module, head: nn.Module) -> bool:
    """Whether the head's arrays are an embedding's (a tied head)."""
    arrays = {id(v) for _, v in tree_flatten(head.parameters())}
    return any(
        id(v) in arrays
        for path, m in walk(model)
        if isinstance(m, EMBEDDINGS)
        for _, v in tree_flatten(m.parameters())
        if not path.endswith("lm_head")
    )


def release_to_checkpoint(head: nn.Module, model_dir: str | None) -> bool:
    """Swap the head's arrays for unevaluated reads of the checkpoint's equal
    ``lm_head.*``, so they take no memory until undo puts the head back."""
    if not model_dir:
        return False
    held = dict(tree_flatten(head.parameters()))
    on_disk = {
        k.removeprefix("lm_head."): v
        for k, v in read_arrays(model_dir, "lm_head.").items()
    }
    if on_disk.keys() != held.keys() or not all(
        on_disk[k].shape == v.shape and mx.array_equal(on_disk[k], v).item()
        for k, v in held.items()
    ):
        return False
    lazy = read_arrays(model_dir, "lm_head.")  # fresh, never evaluated
    head.update(
        tree_unflatten([(k.removeprefix("lm_head."), v) for k, v in lazy.items()])
    )
    return True
