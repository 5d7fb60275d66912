"""The Pass contract: what a pass gives the manager, and the one way a pass
swaps a module into the tree and back (``replace_at``, ``mark_at``,
``unmark_at``).

A pass finds its sites by structure, says why it will not rewrite a site, and
rewrites and undoes one site at a time. The manager owns verification: it runs
the pass's probe on the site before and after the rewrite and compares. The
pass may be one of graphpatch's (``graphpatch.passes``) or a user's own.
"""

import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import mlx.core as mx
import mlx.nn as nn


class GraphpatchError(Exception):
    """Base class of every error graphpatch raises on purpose.

    ``argument`` names the argument at fault (``out``) when the message begins
    with it, so that a front end can name it its own way (the CLI: ``--save``).
    """

    def __init__(self, message: str = "", argument: str | None = None):
        super().__init__(message)
        self.argument = argument


class PassSpecError(GraphpatchError, ValueError):
    """An unknown pass name or option, or a value that does not parse."""


class NotAModelError(GraphpatchError, TypeError):
    """The object handed to ``apply`` is not an ``mlx.nn.Module``."""


class VerificationError(GraphpatchError):
    """A model-level check failed; the model was rolled back to its state before
    ``apply``. ``pass_name`` names the pass whose rewrites moved the logits."""

    def __init__(self, pass_name: str, message: str, report: Any = None):
        super().__init__(f"{pass_name}: {message}")
        self.pass_name = pass_name
        self.report = report


Options = dict[str, Any]
Weights = dict[str, mx.array]
Tap = tuple[str, str]  # (path, method): whose calls the reference forward records
Recorded = dict[
    Tap, list[tuple[tuple[Any, ...], dict[str, Any]]]
]  # each tap's (args, kwargs)
Probe = Callable[[], list[mx.array]]


@dataclass
class Site:
    """One place in the module tree a pass could rewrite.

    Attributes:
        path: the dotted module path (``model.layers.3.mlp``).
        kind: a short word for the report (``dense``, ``moe``, ``head``).
        skip: why the site stays as it is, when finding it already tells
            (a module that ships fused, an MLP with nothing to fuse): one of
            the pass's reason constants. The manager reports it without
            asking ``why_not``.
        note: what finding the site learned, for the report (which head).
        collective: the site exists on every rank of the distributed group
            and its probe runs collectives: the ranks agree on whether to
            rewrite it and on its check, so that none waits for another.
        changes_logits: the rewrite changes the model's logits by design
            (an untied head); the model check moves its reference on.
        reorders_sums: on a collective site, the dtype the result of a sum
            the rewrite splits (an all_sum of each rank's parts) is next held
            in: the hidden state the site's output is added to. Its outputs
            round otherwise, and the model check holds the pass to
            ``compare.reordered``'s rule: a pass's own claim, like
            ``changes_logits``, which a wrong pass can abuse.
        detail: the pass's own words for later hooks, never modules or arrays.
    """

    path: str
    kind: str
    skip: str | None = None
    note: str | None = None
    collective: bool = False
    changes_logits: bool = False
    reorders_sums: str | None = None
    detail: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Context:
    """What a pass may know besides the user's options.

    Attributes:
        model_dir: the directory the model was loaded from, for passes that
            read the checkpoint (untied_head's lm_head.*, elide_head's
            release); None when there is none to read (a fused save re-makes
            its structure before its weights are loaded).
        unverified: nothing will evaluate what a rewrite builds (an
            unverified apply): it stays a graph until the model's first call,
            which may come on another thread.
        dtype: the dtype the model computes its logits in (None unverified).
        recorded: what the taps saw in the reference forward (see ``Proof``).
    """

    model_dir: str | None = None
    unverified: bool = False
    dtype: mx.Dtype | None = None
    recorded: Recorded = field(default_factory=dict)


R = TypeVar("R")
# Every hook takes the model first; a site's hooks then the site.
ModelHook = Callable[[nn.Module, Options, Context], R]
SiteHook = Callable[[nn.Module, Site, Options, Context], R]


@dataclass
class Simulated:
    """One site of a pass checked over ranks simulated in one process."""

    path: str
    reason: str | None = None  # None: rewritten there, within tolerance
    max_error: float | None = None


# (model, ranks, token ids) -> every site, checked over simulated ranks
Simulate = Callable[[nn.Module, int, list[list[int]]], list[Simulated]]


@dataclass(frozen=True)
class Proof:
    """How the manager proves a site (``sites.apply_site``).

    Attributes:
        probe: runs the site on the inputs the model really fed it
            (``context.recorded``), or on synthetic ones of ``context.dtype``
            where those cannot reach a path the rewrite touches; the manager
            calls it once before the rewrite and once after, and compares.
        taps: whose calls the reference forward records for the probes.
        confirm: after a passed check, the reason the site is restored
            after all (the rewrite did not take effect), or None.
        tune: with the ``tune`` option, times the rewritten site against the
            original, undoes it when slower, and returns (ratios, reason).
        simulate: a pass that needs ranks (``Pass.tensor_parallel``) checked
            without them: every site over ``n`` ranks in one process, each
            rank's rewrite built here and run on the inputs a forward of the
            tokens feeds the site, their outputs combined as the collective
            would combine them. The model is left as it was. Tooling that
            cannot start ranks uses it (``graphpatch coverage``).
    """

    probe: SiteHook[Probe]
    taps: ModelHook[list[Tap]] | None = None
    confirm: SiteHook[str | None] | None = None
    tune: SiteHook[tuple[dict[str, float], str | None]] | None = None
    simulate: Simulate | None = None


@dataclass(frozen=True)
class Saving:
    """What a save needs from a pass that adds, renames or fuses parameters.

    Attributes:
        plain: the patched model's ``{name: array}`` mapped back to the names
            the unpatched architecture loads (a fused array split back into
            its parts, a tied head's names dropped).
        fuses: the fused child a rewrite adds and the children it stands for
            (``{"gate_up_proj": ("gate_proj", "up_proj")}``): a fused save
            quantizes those children as the fused arrays say.
        options_in: the options the model's rewritten sites carry, which the
            save records, so that it reopens as it was patched.
        refused: why a model this pass rewrote cannot be saved (one rank's
            view of a pipeline), or None.
    """

    plain: Callable[[nn.Module, Weights], Weights] | None = None
    fuses: dict[str, tuple[str, ...]] = field(default_factory=dict)
    options_in: Callable[[nn.Module], Options] | None = None
    refused: str | None = None


@dataclass(frozen=True)
class Settings:
    """The pass's options: their defaults (types come from them) and checks.

    Attributes:
        defaults: option name -> default value.
        validate: what is wrong with the options, raised before anything is
            touched; with a model (else None), for that model (a size beyond
            its context).
        warnings: lines for the report about the options chosen.
        needs_caller: what a program must do for these options that one run
            unchanged (``graphpatch run``, ``serve``) does not, or None.
    """

    defaults: Options = field(default_factory=dict)
    validate: Callable[[nn.Module | None, Options], str | None] | None = None
    warnings: ModelHook[list[str]] | None = None
    needs_caller: Callable[[Options], str | None] | None = None


@dataclass(frozen=True)
class Pass:
    """A rewrite pass: a few plain functions of its module, the optional ones
    grouped by purpose.

    Attributes:
        name: the user's flag (``fuse_glu``); env switch ``GRAPHPATCH_FUSE_GLU``.
        summary: one line for ``graphpatch list``.
        find: every candidate site, found by structure.
        why_not: the reason a site is left untouched now, or None.
        rewrite: rewrites one site in place; returns a note for the report.
        undo: restores one rewritten site (by path) exactly, bit for bit,
            from the rewritten state alone.
        applied: the paths this pass has rewritten, in reading order.
        proof: how each site is proven (``Proof``).
        saving: what a save needs (``Saving``).
        settings: options and their checks (``Settings``).
        requires: passes this one needs applied first (pulled in by the manager).
        replaced: the parts of a rewritten site the user has replaced since
            (``up_proj`` after ``mlp.up_proj = ...``). ``undo`` and ``plain``
            keep such a part as the user left it; a save refuses.
        tensor_parallel: the pass itself splits the model over the world
            group, so ``graphpatch run`` hands mlx-lm's ``sharded_load`` the
            model unsharded (every architecture), not to mlx-lm's ``shard()``.
    """

    name: str
    summary: str
    find: ModelHook[list[Site]]
    why_not: SiteHook[str | None]
    rewrite: SiteHook[str | None]
    undo: Callable[[nn.Module, str], None]
    applied: Callable[[nn.Module], list[str]]
    proof: Proof
    saving: Saving = Saving()
    settings: Settings = Settings()
    requires: tuple[str, ...] = ()
    replaced: Callable[[nn.Module, str], list[str]] | None = None
    tensor_parallel: bool = False

    @property
    def env(self) -> str:
        return f"GRAPHPATCH_{self.name.upper()}"


def rebuilt(module: nn.Module, cls: type[nn.Module] | None = None) -> nn.Module:
    """A new instance of ``cls`` (default: the module's own class) holding the
    same arrays, children and settings, built without ``__init__``."""
    cls = cls or type(module)
    new = nn.Module.__new__(cls)
    dict.update(new, module)
    vars(new).update(vars(module))
    new._no_grad = set(module._no_grad)  # not shared with the original
    return new


@functools.cache
def _marked_class(cls: type, marker: type) -> type:
    return type(f"{marker.__name__}{cls.__name__}", (marker, cls), {"original": cls})


def mark(module: nn.Module, marker: type, **settings: Any) -> nn.Module:
    """A copy of ``module``
    (same arrays, children and settings) whose class puts ``marker`` in front
    of its own, so the marker's methods run first and reach the module's own
    through ``super()``; ``settings`` become the copy's attributes (the
    marker declares them, with defaults, as class attributes)."""
    new = rebuilt(module, _marked_class(module.__class__, marker))
    for name, value in settings.items():
        setattr(new, name, value)
    return new


def unmark(module: nn.Module) -> nn.Module:
    """The module as it was before ``mark``, its marker's settings dropped."""
    cls = type(module)
    original = rebuilt(module, cls.original)
    marker = cls.__bases__[0]
    for base in marker.__mro__[:-1]:  # a marker's own bases declare settings too
        for name in vars(base):
            vars(original).pop(name, None)
    return original


def marked(model: nn.Module, marker: type) -> list[str]:
    """The paths of the modules ``mark`` gave ``marker``, in reading order."""
    return [path for path, module in walk(model) if isinstance(module, marker)]


def walk(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``named_modules()`` in reading order (layer 2 before layer 10)."""

    def natural(item: tuple[str, nn.Module]) -> list[int | str]:
        return [int(k) if k.isdigit() else k for k in item[0].split(".")]

    return sorted(model.named_modules(), key=natural)


def module_at(model: nn.Module, path: str) -> nn.Module:
    """The sub-module at a dotted path (list indices as numbers)."""
    node = model
    for key in path.split(".") if path else []:
        node = node[int(key)] if isinstance(node, list) else node[key]
    return node


def parent_and_key(model: nn.Module, path: str) -> tuple[Any, str | int]:
    """The container holding ``path`` and the key it is stored under."""
    head, _, last = path.rpartition(".")
    parent = module_at(model, head)
    return parent, int(last) if isinstance(parent, list) else last


def replace_at(root: nn.Module, path: str, new: nn.Module | None) -> nn.Module | None:
    """The one way a pass swaps a module: put ``new`` at ``path`` (a child
    added when there is none; with None, the child removed) and return what
    stood there. Undo puts the returned module back the same way."""
    parent, key = parent_and_key(root, path)
    old = parent[key] if isinstance(key, int) or key in parent else None
    if new is None:
        del parent[key]
    else:
        parent[key] = new
    return old


def mark_at(root: nn.Module, path: str, marker: type, **settings: Any) -> nn.Module:
    """Change what the module at ``path`` does: ``mark`` it in place."""
    new = mark(module_at(root, path), marker, **settings)
    replace_at(root, path, new)
    return new


def unmark_at(root: nn.Module, path: str) -> nn.Module:
    """Undo ``mark_at``: the module at ``path`` as it was before."""
    original = unmark(module_at(root, path))
    replace_at(root, path, original)
    return original
