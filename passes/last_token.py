"""last_token: the LM head runs on the last ``keep`` positions only.

Rewrite:       head(h) -> head(h[:, -keep:, :]) at the model's head: a top-level
               Linear / QuantizedLinear producing the vocabulary (lm_head,
               output, ...) or the embedding's ``as_linear`` for tied heads.
               The head becomes a subclass copy of its own class (same arrays,
               same parameter paths); everything after it still runs.
Preconditions: one head found by structure and consulted by the model's
               ``__call__`` (the patched model must return keep positions).
Equivalence:   the last ``keep`` positions equal the unpatched model's;
               (B, keep, vocab) when S > keep, unchanged otherwise.
"""

import functools

import mlx.core as mx
import mlx.nn as nn

from graphpatch.contract import Pass, Site, module_at, parent_and_key, rebuilt, walk

HEADS = (nn.Linear, nn.QuantizedLinear)
EMBEDDINGS = (nn.Embedding, nn.QuantizedEmbedding)

ALREADY_APPLIED = "already applied"
NO_HEAD = "no LM head found: no vocabulary-sized top-level linear and no embedding"
NOT_CONSULTED = "the model's __call__ does not run its head through {path}"
SPECULATIVE = (
    "last_token keeps {keep} position(s): speculative decoding needs "
    "keep >= num_draft + 1"
)


class LastToken:
    """Marks the classes this pass makes; ``keep`` is set per instance and
    ``original`` names the class it was made from."""

    keep: int = 1
    original: type


def _last(x: mx.array, keep: int) -> mx.array:
    return x[..., -keep:, :] if x.ndim >= 3 and x.shape[-2] > keep else x


@functools.cache
def last_token_class(cls: type) -> type:
    if issubclass(cls, EMBEDDINGS):

        def as_linear(self, x):
            return cls.as_linear(self, _last(x, self.keep))

        body = {"as_linear": as_linear}
    else:

        def __call__(self, x):
            return cls.__call__(self, _last(x, self.keep))

        body = {"__call__": __call__}
    return type(f"LastToken{cls.__name__}", (LastToken, cls), {**body, "original": cls})


def _vocab(model: nn.Module) -> tuple[str, int] | None:
    for path, module in walk(model):
        if isinstance(module, EMBEDDINGS):
            return path, module.weight.shape[0]
    return None


def find(model: nn.Module) -> list[Site]:
    embedding = _vocab(model)
    if embedding is None:
        return [Site("", "none")]
    path, vocab = embedding
    for key, child in model.items():
        if isinstance(child, HEADS) and child.weight.shape[0] == vocab:
            return [Site(key, "linear")]
    return [Site(path, "tied")]


def why_not(model: nn.Module, site: Site, options: dict) -> str | None:
    if site.kind == "none":
        return NO_HEAD
    if isinstance(module_at(model, site.path), LastToken):
        return ALREADY_APPLIED
    return None


def rewrite(model: nn.Module, site: Site, options: dict) -> None:
    parent, key = parent_and_key(model, site.path)
    head = rebuilt(parent[key], last_token_class(type(parent[key])))
    head.keep = options["keep"]
    parent[key] = head


def undo(model: nn.Module, path: str) -> None:
    parent, key = parent_and_key(model, path)
    head = rebuilt(parent[key], type(parent[key]).original)
    del vars(head)["keep"]
    parent[key] = head


def applied(model: nn.Module) -> list[str]:
    return [p for p, m in walk(model) if isinstance(m, LastToken)]


def probe(model: nn.Module, site: Site, dtype, options: dict):
    # The site is where the model's output comes from: run the whole model.
    keep = options["keep"]
    tokens = mx.array([[3, 17, 42, 5, 60, 7, 11, 2, 33, 25] * (1 + keep // 10)] * 2)

    def run():
        out = model(tokens)
        if isinstance(module_at(model, site.path), LastToken) and out.shape[1] != keep:
            raise ValueError(NOT_CONSULTED.format(path=site.path))
        return [out[:, -keep:, :]]

    return run


def validate(options: dict) -> str | None:
    return None if options["keep"] >= 1 else "last_token:keep must be 1 or more"


def warnings(model: nn.Module, options: dict) -> list[str]:
    return [SPECULATIVE.format(keep=options["keep"])] if options["keep"] == 1 else []


PASS = Pass(
    name="last_token",
    summary="LM head on the last keep positions only: no (B, S, vocab) on prefill",
    find=find,
    why_not=why_not,
    rewrite=rewrite,
    undo=undo,
    applied=applied,
    probe=probe,
    options={"keep": 1},
    validate=validate,
    warnings=warnings,
)
