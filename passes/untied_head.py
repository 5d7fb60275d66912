"""untied_head: the LM head as one explicit module, bound to the right arrays.

Rewrite:       embed.as_linear(h) -> embed.lm_head(h), an explicit Linear /
               QuantizedLinear child of the embedding. Tied: it shares the
               embedding's arrays (no new bytes). Untied: it holds the
               checkpoint's own lm_head.* arrays, which mlx-lm's tied
               architectures drop on load, when they differ from the embedding.
               A top-level vocabulary Linear (lm_head, output) is already
               explicit and left as it is.
Preconditions: the model's __call__ runs its head through the embedding's
               as_linear (a head computed inline, h @ embed.weight.T, is
               skipped); checkpoint lm_head.* arrays of the embedding's shape.
Equivalence:   tied: every position, bit for bit. Untied: the head computes
               h @ W.T with the checkpoint's W; the logits change by design,
               and the report says by how much the two heads differ.
"""

import functools
import json
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

from graphpatch.contract import (
    GraphpatchError,
    Pass,
    Site,
    module_at,
    parent_and_key,
    rebuilt,
    walk,
)
from graphpatch.loading import read_arrays
from graphpatch.verify import PROBE_TOKENS

HEADS = (nn.Linear, nn.QuantizedLinear)
EMBEDDINGS = (nn.Embedding, nn.QuantizedEmbedding)

ALREADY_APPLIED = "already applied"
ALREADY_EXPLICIT = "already explicit: a top-level {cls} producing the vocabulary"
NO_HEAD = "no LM head found: no vocabulary-sized top-level linear and no embedding"
NOT_CONSULTED = "the model's __call__ does not run its head through {path}"
NOT_READ = "tied to the embedding; checkpoint not read (no model directory given)"
NO_CHECKPOINT_HEAD = "tied to the embedding; the checkpoint has no lm_head.*"
SAME_AS_EMBEDDING = "tied to the embedding; the checkpoint's lm_head.* equals it"
UNTIED = (
    "the checkpoint's own lm_head.* (config {tie}), which differs from the "
    "embedding by up to {diff:.3g}: logits change by design"
)


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
    """Marks the embedding classes this pass makes; ``original`` names the
    class each was made from."""

    original: type


@functools.cache
def headed_class(cls: type) -> type:
    def as_linear(self, x):
        return self.lm_head(x)

    body = {"as_linear": as_linear, "original": cls}
    return type(f"Headed{cls.__name__}", (Headed, cls), body)


def _embedding(model: nn.Module) -> tuple[str, nn.Module] | None:
    for path, module in walk(model):
        if isinstance(module, EMBEDDINGS):
            return path, module
    return None


def head_path(model: nn.Module) -> str | None:
    """Where the explicit head is: a top-level vocabulary linear, or the
    ``lm_head`` this pass gave the embedding; None when there is none."""
    embedding = _embedding(model)
    if embedding is None:
        return None
    path, module = embedding
    for key, child in model.items():
        if _vocab_size(child) == module.weight.shape[0]:
            return key
    return f"{path}.lm_head" if isinstance(module, Headed) else None


def find(model: nn.Module, options: dict) -> list[Site]:
    embedding = _embedding(model)
    if embedding is None:
        return [Site("", "none")]
    path, module = embedding
    explicit = head_path(model)
    if explicit is not None and not explicit.endswith(".lm_head"):
        return [Site(explicit, "linear")]
    if isinstance(module, Headed) or not options.get("model_dir"):
        return [Site(path, "tied", {"note": NOT_READ})]
    arrays = read_arrays(options["model_dir"], "lm_head.")
    if not arrays:
        return [Site(path, "tied", {"note": NO_CHECKPOINT_HEAD})]
    diff = _max_difference(_checkpoint_head(arrays, module), _tied_head(module))
    if diff == 0:
        return [Site(path, "tied", {"note": SAME_AS_EMBEDDING})]
    tie = _config_tie(Path(options["model_dir"]))
    note = UNTIED.format(tie=tie, diff=diff)
    return [Site(path, "untied", {"note": note, "changes_logits": True})]


def _config_tie(model_dir: Path) -> str:
    config = json.loads((model_dir / "config.json").read_text())
    if "tie_word_embeddings" not in config:
        return "has no tie_word_embeddings"
    return f"tie_word_embeddings={str(config['tie_word_embeddings']).lower()}"


def _tied_head(embedding: nn.Module) -> nn.Module:
    """A Linear / QuantizedLinear holding the embedding's own arrays."""
    vocab, dims = embedding.weight.shape[0], _dims(embedding)
    if isinstance(embedding, nn.QuantizedEmbedding):
        head = nn.QuantizedLinear(
            dims, vocab, False, embedding.group_size, embedding.bits, embedding.mode
        )
    else:
        head = nn.Linear(dims, vocab, bias=False)
    # Lazy random init above is never evaluated: replaced before use.
    head.update({k: v for k, v in embedding.items() if k in head})
    return head


def _dims(embedding: nn.Module) -> int:
    if isinstance(embedding, nn.QuantizedEmbedding):
        return embedding.dims
    return embedding.weight.shape[1]


def _checkpoint_head(arrays: dict[str, mx.array], embedding: nn.Module) -> nn.Module:
    """A head holding the checkpoint's lm_head.* arrays, checked against the
    shapes a head for this embedding must have."""
    vocab, dims = embedding.weight.shape[0], _dims(embedding)
    given = {k.removeprefix("lm_head."): v for k, v in arrays.items()}
    if "scales" in given:
        if not isinstance(embedding, nn.QuantizedEmbedding):
            raise CheckpointHeadError(
                "lm_head.scales in the checkpoint, but the embedding is not "
                "quantized: cannot tell the head's bits and group size"
            )
        head = _tied_head(embedding)
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
    head.update(tree_unflatten(list(given.items())))
    return head


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


def _max_difference(a: nn.Module, b: nn.Module, chunk: int = 8192) -> float:
    # Row chunks: a dequantized 150k-vocabulary head would be gigabytes at once.
    worst = 0.0
    for start in range(0, a.weight.shape[0], chunk):
        rows = slice(start, start + chunk)
        diff = mx.abs(dense_weight(a, rows) - dense_weight(b, rows)).max()
        worst = max(worst, diff.item())
    return worst


def why_not(model: nn.Module, site: Site, options: dict) -> str | None:
    if site.kind == "none":
        return NO_HEAD
    if site.kind == "linear":
        head = module_at(model, site.path)
        return ALREADY_EXPLICIT.format(cls=type(head).__name__)
    if isinstance(module_at(model, site.path), Headed):
        return ALREADY_APPLIED
    return None


def rewrite(model: nn.Module, site: Site, options: dict) -> None:
    parent, key = parent_and_key(model, site.path)
    embedding = parent[key]
    if site.kind == "untied":
        arrays = read_arrays(options["model_dir"], "lm_head.")
        head = _checkpoint_head(arrays, embedding)
    else:
        head = _tied_head(embedding)
    new = rebuilt(embedding, headed_class(type(embedding)))
    new.lm_head = head
    parent[key] = new


def undo(model: nn.Module, path: str) -> None:
    parent, key = parent_and_key(model, path)
    embedding = rebuilt(parent[key], type(parent[key]).original)
    del embedding["lm_head"]
    parent[key] = embedding


def applied(model: nn.Module) -> list[str]:
    return [p for p, m in walk(model) if isinstance(m, Headed)]


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


def probe(model: nn.Module, site: Site, dtype, options: dict):
    dims = _dims(module_at(model, site.path))
    h = mx.random.normal((2, 5, dims), key=mx.random.key(7)).astype(dtype)
    expected = None
    if site.kind == "untied":
        arrays = read_arrays(options["model_dir"], "lm_head.")
        checkpoint = _checkpoint_head(arrays, module_at(model, site.path))
        # Independent of the module: dequantized weights and a plain matmul.
        expected = (h.astype(mx.float32) @ dense_weight(checkpoint).T).astype(dtype)

    def run():
        embedding = module_at(model, site.path)
        if isinstance(embedding, Headed):
            if not consults(model, embedding, "lm_head"):
                raise ValueError(NOT_CONSULTED.format(path=site.path))
            return [embedding.as_linear(h)]
        return [embedding.as_linear(h) if expected is None else expected]

    return run


PASS = Pass(
    name="untied_head",
    summary="the LM head as one explicit module: tied shares, untied reads lm_head.*",
    find=find,
    why_not=why_not,
    rewrite=rewrite,
    undo=undo,
    applied=applied,
    probe=probe,
)
