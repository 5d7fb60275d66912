"""What ``apply`` did and did not do: per pass, per site, with numbers.

A report holds paths, words and numbers only, never modules or arrays, so it
can be printed, written as JSON and kept after the model is gone.
"""

import json
from dataclasses import asdict, dataclass, field

from rich.console import Console
from rich.table import Table

REWRITTEN = "rewritten"
SKIPPED = "skipped"


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


@dataclass
class Report:
    passes: list[str]
    dtype: str
    verified: bool
    sites: list[SiteResult] = field(default_factory=list)
    checks: list[ModelCheck] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    seconds: float = 0.0
    rolled_back: bool = False
    record: str | None = None  # the verification record used or written

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
        return asdict(self)

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

    def print(self, console: Console | None = None) -> None:
        console = console or Console()
        console.print(self.table())
        for check in self.checks:
            mark = "ok" if check.ok else "FAILED"
            if check.rebased:
                console.print(
                    f"model check after {check.pass_name}: logits moved by "
                    f"{check.max_error:.3g} by design (top-1 agreement "
                    f"{check.top1:.0%}); later passes are checked against them"
                )
                continue
            console.print(
                f"model check after {check.pass_name}: max error "
                f"{check.max_error:.3g} (tolerance {check.tolerance:.3g}), "
                f"top-1 agreement {check.top1:.0%}: {mark}"
            )
        if self.record:
            console.print(self.record, highlight=False)
        for warning in self.warnings:
            console.print(f"[yellow]warning:[/yellow] {warning}")
        delta = self.bytes_delta
        console.print(
            f"{_count(len(self.rewritten()), 'site')} rewritten, "
            f"{len(self.skipped())} skipped, "
            f"{_bytes(abs(delta))} {'added' if delta > 0 else 'freed'} net, "
            f"{self.seconds:.2f}s, dtype {self.dtype}"
            + (", rolled back" if self.rolled_back else "")
        )

    def table(self) -> Table:
        table = Table(title="graphpatch report", show_lines=False)
        table.add_column("pass", no_wrap=True)
        table.add_column("site", no_wrap=True)
        table.add_column("outcome", min_width=24)
        for column in ("max error", "top-1"):
            table.add_column(column, no_wrap=True, justify="right")
        for site in self.sites:
            outcome = site.status if site.status == REWRITTEN else site.reason
            if site.status == REWRITTEN and not site.verified and not self.record:
                outcome += " (unverified)"
            if site.note and site.status == REWRITTEN:
                outcome += f": {site.note}"
            if site.speedup and site.status == REWRITTEN:
                ratios = ", ".join(f"{k} {v:.3f}" for k, v in site.speedup.items())
                outcome += f" (unfused/fused {ratios})"
            table.add_row(
                site.pass_name,
                f"{site.path} ({site.kind})",
                outcome,
                "" if site.max_error is None else f"{site.max_error:.3g}",
                "" if site.top1 is None else f"{site.top1:.0%}",
            )
        return table


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def _bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"
