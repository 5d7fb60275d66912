"""What ``apply`` did and did not do: per pass, per site, with numbers.

A report holds paths, words and numbers only, never modules or arrays, so it
can be printed, written as JSON and kept after the model is gone.
"""

import json
from dataclasses import asdict, dataclass, field

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from graphpatch._version import __version__

REWRITTEN = "rewritten"
SKIPPED = "skipped"
SCHEMA = 2  # of to_dict(): bumped when keys come, change meaning or go away
LINE = 1000  # the longest text of one printed line, a path within it


def printable(text: object, limit: int = 200) -> str:
    """``text`` as one line that is safe to print: a string read from a file
    (a record's date, a section's value) can hold escape sequences that clear
    the screen or fake an ``error:`` line. Control characters are shown as
    escapes, and a long text is cut with an ellipsis."""
    shown = "".join(
        c if c.isprintable() else c.encode("unicode_escape").decode("ascii")
        for c in str(text)
    )
    return shown if len(shown) <= limit else shown[: limit - 1] + "…"


def stamped(entry: dict) -> dict:
    """``entry`` with the schema and graphpatch versions every JSON output
    carries (reports, errors, ``list --json``)."""
    return {"schema": SCHEMA, "graphpatch": __version__, **entry}


@dataclass
class SiteResult:
    pass_name: str
    path: str
    kind: str
    status: str
    reason: str | None = None
    max_error: float | None = None
    tolerance: float | None = None
    top1: float | None = None
    bytes_before: int = 0
    bytes_after: int = 0
    seconds: float = 0.0
    verified: bool = False
    speedup: dict[str, float] | None = None  # unfused/fused time per shape (tune)
    note: str | None = None  # what a rewritten site found (e.g. which head)
    dtype: str | None = None  # what the site computed in, on its real inputs


@dataclass
class ModelCheck:
    pass_name: str
    max_error: float
    tolerance: float
    top1: float
    ok: bool
    rebased: bool = False  # logits changed by design; the reference moved on
    rule: str | None = None  # the tolerance's rule when not the logits' dtype's


@dataclass
class RecordUse:
    """The verification record an apply used: ``trusted`` when its sites
    were taken from it, False when they were verified now and it was written."""

    path: str
    date: str
    trusted: bool


@dataclass
class Report:
    passes: list[str]
    dtype: str
    verified: bool
    sites: list[SiteResult] = field(default_factory=list)
    checks: list[ModelCheck] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    seconds: float = 0.0  # applying, verifying, reading or writing the record
    load_seconds: float | None = None  # loading the model, when this report knows
    rolled_back: bool = False
    record: str | None = None  # the verification record used or written, a line
    record_used: RecordUse | None = None  # the same, as fields
    model: str | None = None  # the model directory or repo id, when known
    rank: int | None = None  # in a distributed group, this process's rank

    def for_pass(self, name: str) -> list[SiteResult]:
        return [s for s in self.sites if s.pass_name == name]

    def rewritten(self, name: str | None = None) -> list[SiteResult]:
        return [
            s
            for s in self.sites
            if s.status == REWRITTEN and name in (None, s.pass_name)
        ]

    def skipped(self, name: str | None = None) -> list[SiteResult]:
        return [
            s for s in self.sites if s.status == SKIPPED and name in (None, s.pass_name)
        ]

    @property
    def bytes_delta(self) -> int:
        return sum(s.bytes_after - s.bytes_before for s in self.rewritten())

    def to_dict(self) -> dict:
        return stamped(asdict(self))

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def summary_lines(self) -> list[str]:
        """One line per pass: what a log or stderr wants."""
        lines = []
        for name in self.passes:
            done, left = self.rewritten(name), self.skipped(name)
            errors = [s.max_error for s in done if s.max_error is not None]
            worst = f", max error {max(errors):.3g}" if errors else ""
            lines.append(
                f"{name}: {len(done)} rewritten, {len(left)} skipped{worst}"
                + ("" if self.verified or self.record else " (unverified)")
            )
        return lines

    def skipped_lines(self) -> list[str]:
        """One line per pass and reason: ``fuse_qkv model.layers.{0..1}.self_attn
        (2 sites): q and v differ in bits (4 vs 6)``."""
        skipped = [group for group in self._groups() if group[0].status == SKIPPED]
        return [
            f"{group[0].pass_name} {path_pattern([s.path for s in group])}"
            + (f" ({len(group)} sites)" if len(group) > 1 else "")
            + f": {printable(group[0].reason, LINE)}"
            for group in skipped
        ]

    def print(self, console: Console | None = None, verbose: bool = False) -> None:
        console = console or Console()
        console.print(self.table(verbose, console.width))
        for check in self.checks:
            mark = "ok" if check.ok else "FAILED"
            if check.rebased:
                console.print(
                    f"model check after {check.pass_name}: logits moved by "
                    f"{check.max_error:.3g} by design (top-1 agreement "
                    f"{check.top1:.0%}); later passes are checked against them"
                )
                continue
            rule = f"; {check.rule}" if check.rule else ""
            console.print(
                f"model check after {check.pass_name}: max error "
                f"{check.max_error:.3g} (tolerance {check.tolerance:.3g}{rule}), "
                f"top-1 agreement {check.top1:.0%}: {mark}"
            )
        if self.record:  # a path and a date read from the record
            shown = printable(self.record, LINE)
            console.print(shown, highlight=False, soft_wrap=True, markup=False)
        for warning in self.warnings:
            shown = escape(printable(warning, LINE))
            console.print(f"[yellow]warning:[/yellow] {shown}", highlight=False)
        delta = self.bytes_delta
        console.print(
            f"{_count(len(self.rewritten()), 'site')} rewritten, "
            f"{len(self.skipped())} skipped, "
            f"{_bytes(abs(delta))} {'added' if delta > 0 else 'freed'} net, "
            f"dtype {self.dtype}; {self.took()}"
            + (", rolled back" if self.rolled_back else "")
        )

    def took(self) -> str:
        """The time, naming what it counts: ``1.20s to load, 0.04s to apply
        and verify``."""
        what = "to apply and verify" if self.verified else "to apply"
        took = f"{self.seconds:.2f}s {what}"
        if self.load_seconds is None:
            return took
        return f"{self.load_seconds:.2f}s to load, {took}"

    def table(self, verbose: bool = False, width: int = 80) -> Table:
        """One row per group of sites with the same outcome (``--verbose``:
        per site), every column kept whole down to 80 columns."""
        names = max([len("pass"), *(len(s.pass_name) for s in self.sites)])
        # 16: borders and padding of five columns; 9 and 5: the numbers'.
        room = max(width - names - 9 - 5 - 16, 30)
        table = Table(title="graphpatch report", show_lines=False)
        table.add_column("pass", no_wrap=True)
        table.add_column("sites", overflow="fold", max_width=max(room // 2, 24))
        table.add_column("outcome", max_width=room - max(room // 2, 24))
        table.add_column("max error", justify="right", no_wrap=True)
        table.add_column("top-1", justify="right", no_wrap=True)
        rows = [[site] for site in self.sites] if verbose else self._groups()
        for group in rows:
            errors = [s.max_error for s in group if s.max_error is not None]
            top1 = [s.top1 for s in group if s.top1 is not None]
            table.add_row(
                group[0].pass_name,
                _sites(group),
                escape(printable(self._outcome(group[0]), LINE)),
                f"{max(errors):.3g}" if errors else "",
                f"{min(top1):.0%}" if top1 else "",
            )
        return table

    def _groups(self) -> list[list[SiteResult]]:
        def same(site: SiteResult) -> tuple:
            return site.pass_name, site.kind, self._outcome(site)

        groups: dict[tuple, list[SiteResult]] = {}
        for site in self.sites:
            groups.setdefault(same(site), []).append(site)
        return list(groups.values())

    def _outcome(self, site: SiteResult) -> str:
        if site.status != REWRITTEN:
            return site.reason or SKIPPED
        outcome = site.status
        if not site.verified and not self.record:
            outcome += " (unverified)"
        if site.note:
            outcome += f": {site.note}"
        if site.speedup:
            ratios = ", ".join(f"{k} {v:.3f}" for k, v in site.speedup.items())
            outcome += f" (unfused/fused {ratios})"
        return outcome


def _sites(group: list[SiteResult]) -> str:
    """``model.layers.{0..29}.mlp (dense) · 30 sites``"""
    kind = "" if group[0].kind == "none" else f"({group[0].kind})"
    if len(group) > 1:
        kind = f"{kind} · {len(group)} sites"
    sep = "\n" if len(group) > 1 else " "
    return f"{path_pattern([s.path for s in group])}{sep}{kind}".strip()


def path_pattern(paths: list[str]) -> str:
    """Paths that differ in one numeric part as one: ``model.layers.{0..29}.mlp``."""
    if len(paths) == 1:
        return paths[0] or "(the model)"
    parts = [path.split(".") for path in paths]
    differ = [i for i in range(len(parts[0])) if len({p[i] for p in parts}) > 1]
    if len({len(p) for p in parts}) > 1 or len(differ) != 1:
        return f"{paths[0]} and {len(paths) - 1} more"
    (i,) = differ
    if not all(p[i].isdigit() for p in parts):
        return f"{paths[0]} and {len(paths) - 1} more"
    numbers = sorted(int(p[i]) for p in parts)
    return ".".join([*parts[0][:i], "{" + _runs(numbers) + "}", *parts[0][i + 1 :]])


def _runs(numbers: list[int]) -> str:
    """``0..3,5,7..9``"""
    runs: list[list[int]] = []
    for n in numbers:
        if runs and n == runs[-1][-1] + 1:
            runs[-1].append(n)
        else:
            runs.append([n])
    return ",".join(f"{r[0]}..{r[-1]}" if len(r) > 1 else str(r[0]) for r in runs)


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def _bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB"):
        if size < 1024:
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GiB"
