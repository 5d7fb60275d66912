"""The Pass contract: what every pass in ``passes/`` provides to the manager.

A pass finds its sites by structure, says why it will not rewrite a site, and
rewrites and undoes one site at a time. The manager owns verification: it runs
the pass's probe on the site before and after the rewrite and compares.
"""

import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import mlx.core as mx
import mlx.nn as nn


class GraphpatchError(Exception):
    """Base class of every error graphpatch raises on purpose."""


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


@dataclass
class Site:
    """One place in the module tree a pass could rewrite.

    Attributes:
        path: the dotted module path (``model.layers.3.mlp``).
        kind: a short word for the report (``dense``, ``moe``, ``head``).
        note: what finding the site learned, for the report (which head).
        collective: the site exists on every rank of the distributed group
            and its probe runs collectives: the ranks agree on whether to
            rewrite it and on its check, so that none waits for another.
        changes_logits: the rewrite changes the model's logits by design
            (an untied head); the model check moves its reference on.
        detail: the pass's own numbers and names, never modules or arrays.
    """

    path: str
    kind: str
    note: str | None = None
    collective: bool = False
    changes_logits: bool = False
    detail: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Context:
    """What a pass may know besides the user's options, passed to every hook
    that takes options.

    Attributes:
        model_dir: the directory the model was loaded from, for passes that
            read the checkpoint (untied_head's lm_head.*, elide_head's
            release); None when there is none to read (a fused save re-makes
            its structure before its weights are loaded).
        unverified: nothing will evaluate what a rewrite builds (an
            unverified apply): it stays a graph until the model's first call,
            which may come on another thread.
    """

    model_dir: str | None = None
    unverified: bool = False


Probe = Callable[[], list[mx.array]]


@dataclass(frozen=True)
class Pass:
    """A rewrite pass. Each field is a plain function of the pass's module.

    Attributes:
        name: the user's flag (``fuse_glu``); env switch ``GRAPHPATCH_FUSE_GLU``.
        summary: one line for ``graphpatch list``.
        find: ``find(model, options, context) -> list[Site]``, every
            candidate site. ``options`` are the user's (with defaults);
            ``context`` is the rest a pass may know (``Context``).
        why_not: ``why_not(model, site, options, context) -> str | None``, the reason a
            site is left untouched, or None when it can be rewritten.
        rewrite: ``rewrite(model, site, options, context) -> str | None``, rewrites in
            place; returns a note for the report (what it did), or None.
        undo: ``undo(model, path) -> None``, restores one rewritten site
            exactly (bit for bit) from the rewritten state alone.
        applied: ``applied(model) -> list[str]``, paths this pass has rewritten.
        probe: ``probe(model, site, dtype, options, recorded, context) -> Probe``, a
            function that runs the site on the inputs the model really fed it
            (``recorded``, from the reference forward: see ``taps``), or on
            synthetic inputs of ``dtype`` where those cannot reach a path the
            rewrite touches; called once before and once after the rewrite.
        taps: optional ``taps(model, options, context) -> list[(path, method)]``: whose
            inputs to record during the reference forward, for the probes.
        options: the pass's options and their defaults (types come from them).
        requires: passes this one needs applied first (pulled in by the manager).
        tune: optional ``tune(model, site, dtype) -> (ratios, reason)``:
            times the rewritten site against the original, undoes it when
            slower and returns the reason (only with the ``tune`` option).
        warnings: optional ``warnings(model, options, context) -> list[str]``
            for the report.
        validate: optional ``validate(options, model=None) -> str | None``:
            what is wrong with the options (with a model: for that model, e.g.
            a size beyond its context), raised before anything is touched.
        confirm: optional ``confirm(model, site, options, context) -> str | None``:
            after a passed check, proof that the rewrite took effect, or the
            reason the site is restored.
        options_in: optional ``options_in(model) -> dict``: the options the
            model's rewritten sites carry, which save records (so a saved
            model reopens as it was patched, whatever defaults say).
        plain: optional ``plain(model, weights) -> weights``, what saving
            requires of a pass that adds, renames or fuses parameters: the
            patched model's ``{name: array}`` mapped back to the names the
            unpatched architecture loads from a checkpoint (a fused array
            split back into its halves, a tied head's names dropped).
        replaced: optional ``replaced(model, path) -> list[str]``: the parts
            of a rewritten site that the user has replaced since (``up_proj``
            after ``mlp.up_proj = ...``). ``undo`` and ``plain`` keep such a
            part as the user left it; a fused save cannot, and refuses.
        fuses: the fused child a rewrite adds and the children it stands for
            (``{"gate_up_proj": ("gate_proj", "up_proj")}``): a fused save
            quantizes those children as the fused arrays say.
    """

    name: str
    summary: str
    find: Callable[[nn.Module, dict, Context], list[Site]]
    why_not: Callable[[nn.Module, Site, dict, Context], str | None]
    rewrite: Callable[[nn.Module, Site, dict, Context], str | None]
    undo: Callable[[nn.Module, str], None]
    applied: Callable[[nn.Module], list[str]]
    probe: Callable[[nn.Module, Site, mx.Dtype, dict, dict, Context], Probe]
    options: dict[str, Any] = field(default_factory=dict)
    requires: tuple[str, ...] = ()
    tune: Callable[[nn.Module, Site, mx.Dtype], tuple] | None = None
    warnings: Callable[[nn.Module, dict, Context], list[str]] | None = None
    validate: Callable[..., str | None] | None = None
    confirm: Callable[[nn.Module, Site, dict, Context], str | None] | None = None
    options_in: Callable[[nn.Module], dict] | None = None
    taps: Callable[[nn.Module, dict, Context], list[tuple[str, str]]] | None = None
    plain: Callable[[nn.Module, dict], dict] | None = None
    replaced: Callable[[nn.Module, str], list[str]] | None = None
    fuses: dict[str, tuple[str, ...]] = field(default_factory=dict)

    @property
    def env(self) -> str:
        return f"GRAPHPATCH_{self.name.upper()}"


class TakenOver:
    """Marks a head one pass has taken over (elide_head's stand-in, and rank
    0's head it keeps): passes that wrap heads leave such a head alone, so
    that every rank of a group decides alike."""


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


def mark(module: nn.Module, marker: type, **settings) -> nn.Module:
    """The one way a pass changes what a module does: a copy of ``module``
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
    original = rebuilt(module, cls.original)  # type: ignore[attr-defined]
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

    def natural(item):
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
