"""What a gate reports: thresholded checks (overall and per language), samples, failure counts, warnings."""
from __future__ import annotations

from dataclasses import dataclass, field

from lossmask.gate.format_lock import Tally, print_failures_and_samples


@dataclass
class Check:
    """One rate of a gate. ``threshold`` None: reported only. ``by_language``: the threshold also holds in
    every language, so one language cannot carry another. ``required``: a check with no item fails (the
    gate's main check); an optional check with no item (no echo prompt drawn, say) is not judged."""

    name: str
    threshold: float | None
    by_language: bool = False
    required: bool = False
    passed: int = 0
    total: int = 0
    per_language: dict[str, Tally] = field(default_factory=dict)

    def add(self, language: str, ok: bool) -> None:
        for tally in (self, self.per_language.setdefault(language, Tally())):
            tally.total += 1
            tally.passed += bool(ok)

    @property
    def rate(self) -> float:
        return self.passed / self.total if self.total else 0.0

    @property
    def ok(self) -> bool:
        if self.threshold is None:
            return True
        if self.total == 0:
            return not self.required
        if self.rate < self.threshold:
            return False
        return not self.by_language or all(t.pass_rate >= self.threshold for t in self.per_language.values())

    def to_dict(self) -> dict:
        return {
            "name": self.name, "threshold": self.threshold, "by_language": self.by_language, "ok": self.ok,
            "passed": self.passed, "total": self.total, "rate": self.rate,
            "per_language": {k: {"passed": t.passed, "total": t.total} for k, t in sorted(self.per_language.items())},
        }


@dataclass(frozen=True)
class Sample:
    """One generation as the report shows it; ``reason`` None on a pass."""

    language: str
    prompt: str
    expected: str
    generation: str
    passed: bool
    reason: str | None


@dataclass
class GateReport:
    """A phase gate's outcome. ``passed`` when every thresholded check is ok; ``ood`` is the same gate on
    the held-out out-of-distribution prompts, whose shortfalls are ``warnings``, never failures."""

    phase: str
    title: str
    checks: list[Check]
    prompts: int
    samples: list[Sample] = field(default_factory=list)
    failures: dict[str, int] = field(default_factory=dict)  # reason -> count
    warnings: list[str] = field(default_factory=list)
    ood: GateReport | None = None

    @property
    def passed(self) -> bool:
        return all(c.ok for c in self.checks)

    def check(self, name: str) -> Check:
        for c in self.checks:
            if c.name == name:
                return c
        raise KeyError(name)

    def fail(self, reason: str) -> None:
        self.failures[reason] = self.failures.get(reason, 0) + 1

    def to_dict(self) -> dict:
        return {
            "phase": self.phase, "title": self.title, "passed": self.passed, "prompts": self.prompts,
            "checks": [c.to_dict() for c in self.checks], "failures": dict(sorted(self.failures.items())),
            "warnings": list(self.warnings),
            "samples": [s.__dict__ for s in self.samples],
            "ood": self.ood.to_dict() if self.ood else None,
        }


def write_reports(reports: list[GateReport], path) -> None:
    """The reports as JSON, ``{"passed": all passed, "reports": [...]}``, written atomically."""
    import json

    from lossmask.mix import atomic_file

    body = {"passed": all(r.passed for r in reports), "reports": [r.to_dict() for r in reports]}
    with atomic_file(path) as f:
        f.write((json.dumps(body, indent=2, ensure_ascii=False) + "\n").encode("utf-8"))


def print_gate_report(report: GateReport, console=None) -> None:
    """The gate as rich tables: checks with overall and per-language rates and verdicts, then samples."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    console = console or Console()
    verdict = "[green]PASS[/]" if report.passed else "[red]FAIL[/]"
    languages = sorted({lang for c in report.checks for lang in c.per_language})
    table = Table(title=f"phase {report.phase} gate: {report.title} ({report.prompts} prompts) {verdict}")
    table.add_column("check")
    for column in ("passed", "total", "rate", *languages, "threshold", "result"):
        table.add_column(column, justify="right")
    for c in report.checks:
        per_language = [
            f"{c.per_language[lang].pass_rate:.1%}" if lang in c.per_language else "-" for lang in languages
        ]
        if c.threshold is None:
            threshold, result = "-", "info"
        else:
            threshold = f"≥ {c.threshold:.0%}" + (" each" if c.by_language else "")
            result = ("[green]ok[/]" if c.ok else "[red]fail[/]") if c.total or c.required else "not judged"
        rate = f"{c.rate:.1%}" if c.total else "-"
        table.add_row(escape(c.name), str(c.passed), str(c.total), rate, *per_language, threshold, result)
    console.print(table)
    print_failures_and_samples(
        console, report.failures, report.samples,
        lambda s: "[green]pass[/]" if s.passed else f"[red]{escape(s.reason or 'fail')}[/]",
    )
    if report.ood is not None:
        console.print(f"[bold]out-of-distribution prompts[/] (novel phrasings; warnings only, never a failure): "
                      f"{report.ood.prompts} prompts")
        for c in report.ood.checks:
            if c.total:
                console.print(f"  {escape(c.name)}: {c.rate:.1%} ({c.passed}/{c.total})")
    for warning in report.warnings:
        console.print(f"[yellow]warning:[/] {escape(warning)}")
