"""One site at a time: why not, probe, rewrite, probe again and compare; a
site whose check fails is restored exactly from the originals held for it.
"""

import time

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from graphpatch.compare import compare
from graphpatch.contract import Context, Options, Pass, Site, module_at, replace_at
from graphpatch.ranks import everywhere
from graphpatch.report import REWRITTEN, SKIPPED, SiteResult

ANOTHER_RANK = "skipped: another rank of the group could not rewrite this site"


def nbytes(module: nn.Module) -> int:
    """Bytes of the module's arrays, each counted once (a tied head shares)."""
    arrays = {id(v): v for _, v in tree_flatten(module.parameters())}
    return sum(v.nbytes for v in arrays.values())


def apply_site(
    model: nn.Module, p: Pass, site: Site, options: Options, context: Context
) -> SiteResult:
    """Rewrite one site, checked first unless ``context.unverified``."""
    start = time.perf_counter()
    result = SiteResult(p.name, site.path, site.kind, SKIPPED)
    result.reason = site.skip or p.why_not(model, site, options, context)
    if site.collective and not everywhere(result.reason is None):
        result.reason = result.reason or ANOTHER_RANK
    if result.reason:
        return result
    result.bytes_before = nbytes(module_at(model, site.path))
    if not context.unverified:
        result.reason = _rewrite_verified(model, p, site, options, context, result)
    else:
        held = _hold(model, site.path)
        result.reason = _rewrite(model, p, site, options, context, result, False)
        if result.reason:
            _restore(held)
    if result.reason:
        return result
    tune = p.proof.tune
    if not context.unverified and options.get("tune") and tune:
        result.speedup, result.reason = tune(model, site, options, context)
        if result.reason:
            return result
    result.status = REWRITTEN
    result.note = result.note or site.note
    result.bytes_after = nbytes(module_at(model, site.path))
    result.seconds = time.perf_counter() - start
    return result


def _rewrite_verified(
    model: nn.Module,
    p: Pass,
    site: Site,
    options: Options,
    context: Context,
    result: SiteResult,
) -> str | None:
    """Probe, rewrite, probe again and compare; on a failure restore the held
    originals and return the reason the site stays as it was. The ranks of a
    collective site agree that every one probed and rewrote before any runs
    the rewritten site, whose probe may run collectives (shard's all_sum): a
    rank that failed first would leave the others waiting in them."""
    held, reference = None, []
    reason: str | None = None
    try:
        run = p.proof.probe(model, site, options, context)
        reference = run()
        mx.eval(reference)
    except Exception as e:
        reason = f"cannot run the site on a probe: {e}"
    else:
        held = _hold(model, site.path)
        reason = _rewrite(model, p, site, options, context, result, True)
    if site.collective and not everywhere(reason is None):
        reason = reason or ANOTHER_RANK
    if reason:
        if held:
            _restore(held)
        return reason
    assert held is not None  # the rewrite ran
    cmp = None
    try:
        cmp = compare(reference, run())
    except Exception as e:
        reason = f"rewritten site failed on the probe, restored: {e}"
    ok = cmp is not None and cmp.ok
    if site.collective:
        ok = everywhere(ok)  # every rank joins, whatever failed where
    if cmp is not None:
        result.max_error, result.tolerance = cmp.max_error, cmp.tolerance
        result.top1, result.dtype = cmp.top1, cmp.dtype
    if not ok:
        _restore(held)
        if reason or cmp is None:
            return reason or ANOTHER_RANK
        if cmp.ok:
            return ANOTHER_RANK
        return (
            f"rewrite off by {cmp.max_error:.3g} (tolerance {cmp.tolerance:.3g}), "
            "restored"
        )
    try:
        confirm = p.proof.confirm
        reason = confirm(model, site, options, context) if confirm else None
    except Exception as e:
        reason = f"its confirmation raised {type(e).__name__}: {e}; restored"
    if site.collective and not everywhere(reason is None):
        reason = reason or ANOTHER_RANK  # the ranks keep one model
    if reason:
        _restore(held)
        return reason
    result.verified = True
    return None


def _rewrite(
    model: nn.Module,
    p: Pass,
    site: Site,
    options: Options,
    context: Context,
    result: SiteResult,
    evaluate: bool,
) -> str | None:
    """Rewrite (and evaluate what it built); the reason when it raised, and
    the caller restores the held originals: a rewrite that failed half-way
    must not stay half-done."""
    try:
        result.note = p.rewrite(model, site, options, context)
        if evaluate:
            mx.eval(module_at(model, site.path).parameters())
    except Exception as e:
        return f"the rewrite raised {type(e).__name__}: {e}; restored"
    return None


def _hold(model: nn.Module, path: str) -> tuple:
    """What a failed site check restores: the site module's own object, its
    children and attributes. A wrong rewrite cannot be trusted to undo itself,
    so the originals are held (one site's worth) until the check has passed."""
    module = module_at(model, path)
    return model, path, module, dict(module), dict(vars(module))


def _restore(held: tuple) -> None:
    model, path, module, children, attributes = held
    dict.clear(module)
    dict.update(module, children)  # nn.Module.update means parameters
    vars(module).clear()
    vars(module).update(attributes)
    replace_at(model, path, module)
