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
               skipped, as is a head kept as a bare array); checkpoint lm_head.*
               arrays of the embedding's shape.
Equivalence:   tied: every position, bit for bit. Untied: the head computes
               h @ W.T with the checkpoint's W; the logits change by design,
               and the report says by how much the two heads differ.
"""

from pathlib import Path

import mlx.core as mx
import mlx.nn as nn

from graphpatch.contract import (
    Context,
    Options,
    Pass,
    Probe,
    Proof,
    Saving,
    Site,
    Tap,
    Weights,
    mark_at,
    marked,
    module_at,
    replace_at,
    unmark_at,
)
from graphpatch.loading import read_arrays
from graphpatch.passes.heads import (
    Headed,
    bare_head,
    find_embedding,
    head_input,
    head_path,
    head_tap,
)
from graphpatch.passes.untied_head.checkpoint import (
    NO_HEAD,
    checkpoint_head,
    config_tie,
    consults,
    dense_matmul,
    max_difference,
    not_this_model,
    tied_head,
)

ALREADY_APPLIED = "already applied"
ALREADY_EXPLICIT = "already explicit: a top-level {cls} producing the vocabulary"
BARE_ARRAY = (
    "the head is a bare array ({path}) that the model's __call__ multiplies "
    "inline: no module to bind"
)
NOT_CONSULTED = (
    "the model's __call__ does not run its head through {path}.as_linear "
    "(it computes the head inline, e.g. h @ embed.weight.T)"
)
NOT_READ = "tied to the embedding; checkpoint not read (no model directory given)"
NO_CHECKPOINT_HEAD = "tied to the embedding; the checkpoint has no lm_head.*"
SAME_AS_EMBEDDING = "tied to the embedding; the checkpoint's lm_head.* equals it"
UNTIED = (
    "the checkpoint's own lm_head.* (config {tie}), which differs from the "
    "embedding by up to {diff:.3g}: logits change by design"
)


def find(model: nn.Module, options: Options, context: Context) -> list[Site]:
    embedding = find_embedding(model)
    if embedding is None:
        return [Site("", "none", skip=NO_HEAD)]
    path, module = embedding
    explicit = head_path(model, embedding)
    if explicit is not None and not isinstance(module, Headed):
        cls = type(module_at(model, explicit)).__name__
        return [Site(explicit, "linear", skip=ALREADY_EXPLICIT.format(cls=cls))]
    if (bare := bare_head(model, module)) is not None:
        return [Site(bare, "none", skip=BARE_ARRAY.format(path=bare))]
    if isinstance(module, Headed) or not context.model_dir:
        return [Site(path, "tied", note=NOT_READ)]
    arrays = read_arrays(context.model_dir, "lm_head.")
    if not arrays:
        return [Site(path, "tied", note=NO_CHECKPOINT_HEAD)]
    head = checkpoint_head(arrays, module)
    if (foreign := not_this_model(model, context.model_dir)) is not None:
        return [Site(path, "foreign", skip=foreign)]
    diff = max_difference(head, tied_head(module))
    if diff == 0:
        return [Site(path, "tied", note=SAME_AS_EMBEDDING)]
    tie = config_tie(Path(context.model_dir))
    note = UNTIED.format(tie=tie, diff=diff)
    return [Site(path, "untied", note=note, changes_logits=True)]


def why_not(
    model: nn.Module, site: Site, options: Options, context: Context
) -> str | None:
    if isinstance(module_at(model, site.path), Headed):
        return ALREADY_APPLIED
    return None


def _lm_head(context: Context) -> Weights:
    if context.model_dir is None:  # find makes an untied site only with one
        raise ValueError("an untied head needs the model directory")
    return read_arrays(context.model_dir, "lm_head.")


def rewrite(model: nn.Module, site: Site, options: Options, context: Context) -> None:
    embedding = module_at(model, site.path)
    if site.kind == "untied":
        head = checkpoint_head(_lm_head(context), embedding)
    else:
        head = tied_head(embedding)
    replace_at(mark_at(model, site.path, Headed), "lm_head", head)


def undo(model: nn.Module, path: str) -> None:
    replace_at(unmark_at(model, path), "lm_head", None)


def applied(model: nn.Module) -> list[str]:
    return marked(model, Headed)


def plain(model: nn.Module, weights: Weights) -> Weights:
    """A tied head's names dropped (the embedding's own arrays); an untied
    head's arrays under the checkpoint's names, ``lm_head.*``."""
    for path in applied(model):
        embedding = module_at(model, path)
        shared = {id(v) for v in embedding.values() if isinstance(v, mx.array)}
        prefix = f"{path}.lm_head."
        for name in [n for n in weights if n.startswith(prefix)]:
            array = weights.pop(name)
            if id(array) not in shared:
                weights[f"lm_head.{name[len(prefix) :]}"] = array
    return weights


def taps(model: nn.Module, options: Options, context: Context) -> list[Tap]:
    tap = head_tap(model)
    return [tap] if tap else []


def probe(model: nn.Module, site: Site, options: Options, context: Context) -> Probe:
    h = head_input(model, context.dtype, context.recorded, positions=1)
    expected = None
    if site.kind == "untied":
        checkpoint = checkpoint_head(_lm_head(context), module_at(model, site.path))
        # Independent of the module: dequantized weights and a plain matmul.
        expected = dense_matmul(h, checkpoint).astype(h.dtype)

    def run() -> list[mx.array]:
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
    proof=Proof(probe, taps=taps),
    saving=Saving(plain=plain),
)
