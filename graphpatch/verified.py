"""Records of verified applies, so that the next start of the same checkpoint
with the same passes and the same software need not verify again.

A record is keyed by the checkpoint (a hash of config.json, and each weight
file's name, size and mtime), the graphpatch, mlx and mlx-lm versions and the
resolved pass specs. It lives in the user's cache
(``$XDG_CACHE_HOME/graphpatch/verified``), never in the model directory, and
holds the sites each pass rewrote: a cached apply whose sites differ from the
record's verifies after all. Modes: ``always`` verifies (and records),
``cached`` uses a matching record, ``never`` verifies nothing.
"""

import datetime
import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx_lm

import graphpatch
from graphpatch._version import __version__
from graphpatch.contract import module_at
from graphpatch.manager import apply as apply_passes
from graphpatch.plan import resolve
from graphpatch.report import Report

MODES = ("always", "cached", "never")


def cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "graphpatch" / "verified"


def key(model_dir: Path, specs: list[str]) -> str:
    """What a record must match: checkpoint, software and passes."""
    files = sorted(model_dir.glob("*.safetensors"))
    parts = {
        "config": hashlib.sha256((model_dir / "config.json").read_bytes()).hexdigest(),
        "weights": [(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files],
        "versions": [__version__, mx.__version__, mlx_lm.__version__],
        "passes": specs,
    }
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:32]


def _specs(passes: str | list[str] | None) -> list[str]:
    plan, _ = resolve(passes)
    return [f"{p.name}{sorted(o.items())}" for p, o in plan]


def apply(
    model: nn.Module,
    passes: str | list[str] | None,
    model_dir: str | Path,
    mode: str = "always",
    progress: Callable[[str], None] | None = None,
) -> Report:
    """``graphpatch.apply`` with a verification record for ``model_dir``.

    Args:
        mode: ``always``, ``cached`` or ``never`` (see the module docstring).

    Returns:
        The report; ``report.record`` names the record used or written.
    """
    if mode not in MODES:
        raise graphpatch.PassSpecError(f"--verify must be one of {', '.join(MODES)}")
    model_dir = Path(model_dir)

    def apply_with(verify: bool) -> Report:
        return apply_passes(
            model, passes, verify=verify, progress=progress, model_dir=str(model_dir)
        )

    if mode == "never":
        return apply_with(False)
    file = cache_dir() / f"{key(model_dir, _specs(passes))}.json"
    if mode == "cached" and file.is_file():
        report = apply_with(False)
        record = json.loads(file.read_text())
        if record.get("sites") == _sites(report):
            report.record = f"verified on {record['date']}, record {file}"
            settle(model, report)
            return report
        graphpatch.revert(model)  # another structure than recorded: verify
    report = apply_with(True)
    if not report.passes:
        return report  # nothing to record
    _write(file, model_dir, report)
    report.record = f"verified now, record {file}"
    return report


def settle(model: nn.Module, report: Report) -> None:
    """Evaluate the rewritten sites' arrays here, as a verified apply does: a
    program may run the model on another thread, where MLX cannot evaluate
    arrays built on this one (mlx-lm's server: "no Stream(cpu, 0) in current
    thread")."""
    mx.eval([module_at(model, s.path).parameters() for s in report.rewritten()])


def _sites(report: Report) -> dict[str, list[str]]:
    sites: dict[str, list[str]] = {name: [] for name in report.passes}
    for site in report.rewritten():
        sites[site.pass_name].append(site.path)
    return sites


def _write(file: Path, model_dir: Path, report: Report) -> None:
    record = {
        "date": datetime.date.today().isoformat(),
        "checkpoint": str(model_dir.resolve()),
        "sites": _sites(report),
    }
    try:
        file.parent.mkdir(parents=True, exist_ok=True)
        tmp = file.with_name(f".{file.name}.{os.getpid()}")
        tmp.write_text(json.dumps(record, indent=2))
        os.replace(tmp, file)
    except OSError:
        report.warnings.append(f"could not write the verification record {file}")
