"""The pass manager: which passes run, in what order, verified how.

``apply`` resolves the passes (arguments or env), takes reference logits once,
runs each pass site by site with a site-local check, checks the whole model
after each pass, and rolls every rewrite of the call back on a failed check.
"""

import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn

from graphpatch.checks import LoadError
from graphpatch.compare import (
    compare,
    dtype_name,
    last_logits,
    probe_tokens,
    reordered,
    reordered_rule,
)
from graphpatch.contract import (
    Context,
    GraphpatchError,
    NotAModelError,
    Options,
    Pass,
    PassSpecError,
    Site,
    VerificationError,
)
from graphpatch.limits import check_tokens
from graphpatch.plan import Specs, known, named, resolve, undoable
from graphpatch.ranks import agree, anywhere, everywhere
from graphpatch.report import REWRITTEN, ModelCheck, Report
from graphpatch.sites import apply_site
from graphpatch.tapped import recording


def apply(
    model: nn.Module,
    passes: Specs | None = None,
    verify: bool = True,
    probe: mx.array | list | None = None,
    progress: Callable[[str], None] | None = None,
    model_dir: str | None = None,
) -> Report:
    """Rewrite ``model`` in place with the chosen passes and verify each.

    Args:
        model: a loaded mlx-lm model (any ``mlx.nn.Module`` returning logits).
        passes: pass specs (names with options, or ``Pass`` objects: a
            user's own pass runs like graphpatch's), or None to read
            ``GRAPHPATCH_PASSES`` and ``GRAPHPATCH_<NAME>`` from the
            environment. Nothing runs by default.
        verify: check every site and the model's last-position logits; with
            False nothing is evaluated (a lazily loaded model stays lazy).
        probe: token ids (B, S) for the model-level check.
        progress: called with a short line before each pass and site.
        model_dir: the directory the model was loaded from, for passes that
            read the checkpoint (untied_head reads its lm_head.* arrays).

    Returns:
        The report of every site found, rewritten or skipped with its reason.

    Raises:
        NotAModelError: ``model`` is not an ``mlx.nn.Module``.
        PassSpecError: a bad pass list; raised before anything is touched.
        VerificationError: a model-level check failed; every rewrite of this
            call was undone first.
    """
    if not isinstance(model, nn.Module):
        raise NotAModelError(f"expected an mlx.nn.Module, got {type(model).__name__}")
    if model_dir is not None and not Path(model_dir, "config.json").is_file():
        raise LoadError(
            f"model_dir {model_dir}: not a model directory (no config.json)"
        )
    start = time.perf_counter()
    plan, warnings = resolve(passes)
    for p, options in plan:
        validate = p.settings.validate
        if validate and (problem := validate(model, options)):
            raise PassSpecError(problem)
    agree(plan)
    context = Context(None if model_dir is None else str(model_dir), not verify)
    tokens = probe_tokens(probe)
    reference = None  # unverified, the model is not run, not even to build a graph
    if verify:
        check_tokens(model, tokens.tolist(), "probe")
        taps = [
            t for p, o in plan if p.proof.taps for t in p.proof.taps(model, o, context)
        ]
        reference, recorded = _reference(model, tokens, taps)
        # The dtype the model computes its logits in (sites report their own).
        context = replace(context, dtype=reference.dtype, recorded=recorded)
    report = Report(
        [p.name for p, _ in plan],
        dtype_name(context.dtype) if verify else "not computed",
        verify,
        warnings=warnings,
        model=None if model_dir is None else str(model_dir),
    )
    done: list[tuple[Pass, str]] = []
    progress = progress or (lambda line: None)
    try:
        for p, options in plan:
            if p.settings.warnings:
                report.warnings += p.settings.warnings(model, options, context)
            sites = p.find(model, options, context)
            for number, site in enumerate(sites, 1):
                progress(f"{p.name}: site {number} of {len(sites)} ({site.path})")
                result = apply_site(model, p, site, options, context)
                report.sites.append(result)
                if result.status == REWRITTEN:
                    done.append((p, site.path))
            # A rank that rewrote nothing still joins the others' check.
            if verify and anywhere(bool(report.rewritten(p.name))):
                progress(f"{p.name}: checking the model")
                reference = _check_model(model, p, tokens, reference, report, sites)
    except BaseException:
        _roll_back(model, done)
        report.rolled_back = True
        raise
    finally:
        report.seconds = time.perf_counter() - start
    return report


def _taps(p: Pass, model: nn.Module, options: Options, context: Context) -> list:
    return p.proof.taps(model, options, context) if p.proof.taps else []


def _reference(model: nn.Module, tokens: mx.array, taps: list) -> tuple:
    """The last position's logits, and what the taps recorded on the way."""
    try:
        logits, recorded = recording(model, taps, lambda: model(tokens)[:, -1:, :])
    except Exception as e:
        raise GraphpatchError(
            f"cannot run the model on probe tokens of shape {tuple(tokens.shape)} "
            f"to take reference logits: {e!r}"
        ) from e
    # -inf is a token the model masks out; NaN and +inf verify nothing
    if (mx.isnan(logits) | mx.isposinf(logits)).any().item():
        raise GraphpatchError(
            "the model's logits on the probe tokens are NaN or +inf: "
            "nothing can be verified against them"
        )
    return logits, recorded


def _check_model(
    model, p: Pass, tokens, reference, report: Report, sites: list[Site]
) -> mx.array:
    """Compare the model's logits with the reference and return the reference
    the next pass is checked against: a new one after a pass whose sites
    change the logits by design (each proven against its own site probe)."""
    rebase = any(s.changes_logits for s in sites)
    collective = any(s.collective for s in sites)
    results = report.for_pass(p.name)[-len(sites) :] if sites else []
    held_in = [
        s.reorders_sums
        for s, r in zip(sites, results, strict=True)
        if s.reorders_sums and s.collective and r.status == REWRITTEN
    ]
    try:
        logits = last_logits(model, tokens)
        cmp = reordered(compare([reference], [logits]), held_in)
    except Exception as e:
        if collective:
            everywhere(False)  # the others wait for this rank's word
        raise VerificationError(
            p.name, f"the model failed to run after it: {e!r}", report
        ) from e
    ok = cmp.ok or rebase
    rule = reordered_rule(held_in) if held_in else None
    report.checks.append(
        ModelCheck(p.name, cmp.max_error, cmp.tolerance, cmp.top1, ok, rebase, rule)
    )
    if collective and not everywhere(ok):
        raise VerificationError(
            p.name, "the model check failed on another rank; rolled back", report
        )
    if rebase:
        return logits
    if not cmp.ok:
        raise VerificationError(
            p.name,
            f"logits moved by {cmp.max_error:.3g} (tolerance {cmp.tolerance:.3g}"
            f"{'; ' + rule if rule else ''}, top-1 agreement {cmp.top1:.0%}); "
            "every rewrite was rolled back",
            report,
        )
    return reference


def _roll_back(model: nn.Module, done: list[tuple[Pass, str]]) -> None:
    for p, path in reversed(done):
        p.undo(model, path)


def replaced(model: nn.Module) -> list[str]:
    """``pass:path.part`` of each part of a rewritten site that the user has
    replaced since (``mlp.up_proj = ...`` after fuse_glu): ``revert`` keeps
    such a part as the user left it, and a save must not write graphpatch's
    arrays over it."""
    found = []
    for p in known():
        if (parts_replaced := p.replaced) is None:
            continue
        for path in p.applied(model):
            found += [f"{p.name}:{path}.{n}" for n in parts_replaced(model, path)]
    return found


def revert(model: nn.Module, passes: Specs | None = None) -> list[str]:
    """Undo every rewrite graphpatch made to ``model``, last pass first; with
    ``passes`` (names or ``Pass`` objects), only theirs.

    A part the user replaced after ``apply`` stays as the user left it (see
    ``replaced``); its site's entry says so.

    Returns:
        ``pass:path`` for each site restored.
    """
    restored = []
    for p in reversed(undoable() if passes is None else named(passes)):
        for path in p.applied(model):
            kept = p.replaced(model, path) if p.replaced else []
            p.undo(model, path)
            note = f" ({', '.join(kept)} kept: replaced after apply)" if kept else ""
            restored.append(f"{p.name}:{path}{note}")
    return restored
