"""Records of verified applies, so that the next start of the same checkpoint
with the same passes and the same software need not verify again.

A record is keyed by what the apply saw (``trust_key.key``): the checkpoint (a hash of
config.json; each weight file's name, size, mtime, inode and ctime, and a hash
of its safetensors header and of sampled bytes), any adapter (the files of
``adapter_path``, and the LoRA layers in the model), the graphpatch, mlx and
mlx-lm versions, the source of graphpatch's core and of the applied passes,
and the resolved pass specs. It lives in the user's cache
(``$XDG_CACHE_HOME/graphpatch/verified``, a relative one ignored as the XDG
spec says), never in the model directory, and holds the sites each pass
rewrote: a cached apply whose sites differ from the record's verifies after
all. A record that cannot be read, or a cache that cannot be used, is one
warning, never an error: the apply verifies afresh. Modes: ``always``
verifies (and records), ``cached`` uses a matching record, ``never``
verifies nothing.
"""

import datetime
import json
import os
import stat
import threading
import time
from collections.abc import Callable
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn

from graphpatch.contract import PassSpecError, module_at
from graphpatch.manager import apply as apply_passes
from graphpatch.plan import resolve
from graphpatch.ranks import everywhere, same_everywhere
from graphpatch.report import RecordUse, Report, printable
from graphpatch.trust_key import key

MODES = ("always", "cached", "never")
CACHE_OFF = "verification records are off"
IGNORED = "ignored the verification record"
TRUSTING = "applying, trusted from the record {file} (not verified again)"
NOT_WRITTEN = "could not write the verification record"
RECORD_LIMIT = 16 << 20  # a record lists paths: a larger file is none


def cache_dir() -> Path:
    """Where records live: ``$XDG_CACHE_HOME/graphpatch/verified``, or under
    ``~/.cache`` when XDG_CACHE_HOME is unset, empty or relative.

    Raises:
        RuntimeError: no home directory can be found.
    """
    root = os.environ.get("XDG_CACHE_HOME", "")
    if not os.path.isabs(root):
        root = str(Path.home() / ".cache")
    return Path(root) / "graphpatch" / "verified"


def apply(
    model: nn.Module,
    passes: str | list[str] | None,
    model_dir: str | Path,
    mode: str = "always",
    progress: Callable[[str], None] | None = None,
    adapter_path: str | Path | None = None,
) -> Report:
    """``graphpatch.apply`` with a verification record for ``model_dir``.

    Args:
        mode: ``always``, ``cached`` or ``never`` (see the module docstring).
        adapter_path: the adapter directory the model was loaded with.

    Returns:
        The report; ``report.record`` names the record used or written in a
        line, ``report.record_used`` in fields (both None when none was, and
        a warning says why).
    """
    if mode not in MODES:
        raise PassSpecError(
            f"verify must be one of {', '.join(MODES)}", argument="verify"
        )
    model_dir = Path(model_dir)
    start = time.perf_counter()
    report = _applied(model, passes, model_dir, mode, progress, adapter_path)
    report.seconds = time.perf_counter() - start  # every try, and the record
    return report


def _applied(
    model: nn.Module,
    passes: str | list[str] | None,
    model_dir: Path,
    mode: str,
    progress: Callable[[str], None] | None,
    adapter_path: str | Path | None,
) -> Report:
    def apply_with(verify: bool, progress=progress) -> Report:
        return apply_passes(
            model, passes, verify=verify, progress=progress, model_dir=str(model_dir)
        )

    if mode == "never":
        return apply_with(False)
    file, problem = _record_file(model, passes, model_dir, adapter_path)
    record = None
    if mode == "cached" and file is not None:
        record, problem = _read(file)
    if mode == "cached" and not _everyone_holds(record, file):
        record = None  # every rank verifies, so their collectives pair
    if record is not None:
        if progress:
            progress(TRUSTING.format(file=file))
        report = apply_with(False, progress=None)
        if everywhere(record["sites"] == _sites(report)):
            report.record = f"verified on {printable(record['date'])}, record {file}"
            report.record_used = RecordUse(str(file), record["date"], trusted=True)
            settle(model, report)
            return report
        _undo(model, passes, report)  # only this apply's: load's passes stay
    report = apply_with(True)
    report.warnings += [problem] if problem else []
    # a cache that failed to read is not written to: one warning is enough
    if report.passes and file is not None and not (problem or "").startswith(CACHE_OFF):
        _write(file, model_dir, report)
    return report


def _everyone_holds(record: dict | None, file: Path | None) -> bool:
    """Whether every rank of the group has a record, of one and the same
    key: a rank that verifies runs collectives the trusting ones never join,
    and ranks that loaded other models must be checked, not trusted."""
    same = same_everywhere(str(file and file.name))
    return everywhere(record is not None) and same


def _record_file(model, passes, model_dir: Path, adapter_path) -> tuple:
    """(the record's path, None), or (None, why the cache cannot be used)."""
    try:
        name = key(model_dir, passes, model, adapter_path)
        return cache_dir() / f"{name}.json", None
    except (OSError, RuntimeError) as e:
        return None, f"{CACHE_OFF} ({_why(e)}); verified afresh"


def _why(e: Exception) -> str:
    if isinstance(e, OSError) and e.strerror:
        where = f"{printable(e.filename)}: " if e.filename else ""
        return f"{where}{e.strerror}"
    return printable(e)


class NotARecord(ValueError):
    """A file in a record's place that no record can be (a FIFO, a device)."""


def _record_bytes(file: Path) -> bytes:
    """A record's bytes, opened without blocking (a FIFO planted in the cache
    must not hang the program) and only from a small regular file (a link to
    /dev/zero must not fill the memory)."""
    fd = os.open(file, os.O_RDONLY | os.O_NONBLOCK)
    with os.fdopen(fd, "rb") as f:
        info = os.fstat(f.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise NotARecord("not a regular file")
        if info.st_size > RECORD_LIMIT:
            raise NotARecord(f"{info.st_size} bytes, larger than any record")
        return f.read(RECORD_LIMIT + 1)


def _read(file: Path) -> tuple[dict | None, str | None]:
    """(a well-formed record, None), (None, None) when there is none, or
    (None, why the file there is no record)."""
    try:
        record = json.loads(_record_bytes(file).decode("utf-8"))
    except (FileNotFoundError, NotADirectoryError):
        return None, None
    except OSError as e:
        return None, f"{CACHE_OFF} ({_why(e)}); verified afresh"
    except ValueError as e:  # JSON and UTF-8 errors alike, or not a record file
        why = e.args[0] if isinstance(e, NotARecord) else "not JSON"
        return None, f"{IGNORED} {file} ({why}); verified afresh"
    if not isinstance(record, dict) or not isinstance(record.get("date"), str):
        return None, f"{IGNORED} {file} (no date); verified afresh"
    sites = record.get("sites")
    if not isinstance(sites, dict) or not all(
        isinstance(paths, list) and all(isinstance(p, str) for p in paths)
        for paths in sites.values()
    ):
        return None, f"{IGNORED} {file} (no sites); verified afresh"
    return record, None


def _undo(model: nn.Module, passes, report: Report) -> None:
    """Undo the sites ``report`` rewrote, last first, and nothing else."""
    by_name = {p.name: p for p, _ in resolve(passes)[0]}
    for site in reversed(report.rewritten()):
        by_name[site.pass_name].undo(model, site.path)


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
    """Write the record and name it in the report, or warn when it cannot be
    written."""
    date = datetime.date.today().isoformat()
    problem = _written(file, model_dir, _sites(report), date)
    if problem:
        report.warnings.append(f"{NOT_WRITTEN} {file} ({problem})")
        return
    report.record = f"verified now, record {file}"
    report.record_used = RecordUse(str(file), date, trusted=False)


def _written(file: Path, model_dir: Path, sites: dict, date: str) -> str | None:
    """Write a record atomically; None, or why it could not be (and no
    temporary file is left)."""
    record = {"date": date, "checkpoint": str(model_dir.resolve()), "sites": sites}
    tmp = file.with_name(f".{file.name}.{os.getpid()}-{threading.get_ident()}")
    try:
        file.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(record, indent=2))
        os.replace(tmp, file)
    except OSError as e:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
        return _why(e)
    return None


def carry(save_dir: Path, specs: list[str], report: Report) -> str | None:
    """Give a plain save the record of the verification its model came from,
    so that its first run or serve trusts it at once; returns the record's
    path, or None when there is nothing to carry.

    Sound because the save holds the verified model's own arrays under the
    unpatched names (its reopen check compared the logits), so re-applying
    ``specs`` (the passes the save recorded) on it rewrites the same sites
    from the same arrays. The record is keyed to the save's own files, as any
    record is: an edit of the save, or another graphpatch, verifies afresh.
    Only the apply's own sites are carried: a source that was itself a save
    (passes the report does not cover) carries nothing.
    """
    if not specs or report.record_used is None or report.rolled_back:
        return None  # nothing recorded, verified, or kept
    plan, _ = resolve(specs)
    covered = _sites(report)
    if any(p.name not in covered for p, _ in plan):
        return None
    file, _ = _record_file(None, specs, save_dir, None)
    if file is None:
        return None
    sites = {p.name: covered[p.name] for p, _ in plan}
    date = report.record_used.date
    return None if _written(file, save_dir, sites, date) else str(file)
