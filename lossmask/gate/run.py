"""Running gates: one phase on a checkpoint (``run_gate``), or every phase up to one (``run_regression``).

Prompts are, in order of preference: the records passed in, a JSONL file, or held-out records generated on
the spot (``generate_phase(phase, n, seed, languages, held_out=True)``; ``DEFAULT_PROMPTS`` per phase).
Out-of-distribution prompts (``lossmask/data/ood/phase{KEY}.jsonl``: the phase's tasks in phrasings no
generator writes) are gated too when the file exists; checks below their thresholds there become
``warnings`` on the report, never failures.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from lossmask.errors import LossmaskError
from lossmask.gate.format_lock import GateResult, Tally, format_lock_gate
from lossmask.gate.phases import chat_gate, longctx_gate, multiturn_gate, operators_gate
from lossmask.gate.report import Check, GateReport, Sample
from lossmask.gate.tools import agentic_gate, toolcall_gate

PHASE_KEYS: tuple[str, ...] = ("1", "1b", "2", "3", "4", "5", "6")
CURRICULUM: tuple[str, ...] = ("1", "2", "3", "4", "1b", "5", "6")  # training order: 1b right before the tools
DEFAULT_PROMPTS: dict[str, int] = {"1": 100, "1b": 40, "2": 150, "3": 120, "4": 60, "5": 100, "6": 60}
FORMAT_LOCK_TOKENS = 20
OOD_DIR = Path(__file__).resolve().parent.parent / "data" / "ood"

Prompts = str | Path | list[dict] | None


def phase_key(phase: str | int) -> str:
    """"2", 2 or "phase2" → "2"; an unknown phase is an error listing the valid ones."""
    key = str(phase).strip().lower().removeprefix("phase")
    if key not in PHASE_KEYS:
        raise LossmaskError(f"unknown phase {phase!r}; the gates are for phases {', '.join(PHASE_KEYS)}")
    return key


def format_lock_report(result: GateResult, max_new_tokens: int = FORMAT_LOCK_TOKENS) -> GateReport:
    """The phase-1 gate's result in the shape every gate reports."""
    stops = Check(f"stops within {max_new_tokens} tokens, no runaway", 0.9, by_language=True, required=True,
                  passed=result.passed, total=result.total,
                  per_language={k: Tally(t.total, t.passed) for k, t in result.per_language.items()})
    exact = Check("exact match", None, passed=sum(t.exact for t in result.per_language.values()), total=result.total,
                  per_language={k: Tally(t.total, t.exact) for k, t in result.per_language.items()})
    samples = [Sample(s.language, s.prompt, s.expected, s.generation, s.passed, s.reason) for s in result.samples]
    return GateReport("1", "format lock", [stops, exact], result.total, samples, dict(result.failures))


def gate_phase(phase: str | int, model, tokenizer, records: list[dict], *, workspace: str | Path | None = None,
               batch_size: int = 32, max_new_tokens: int | None = None, n_samples: int = 8) -> GateReport:
    """Run one phase's gate on a loaded model and tokenizer."""
    key = phase_key(phase)
    if key == "1":
        tokens = max_new_tokens or FORMAT_LOCK_TOKENS
        return format_lock_report(format_lock_gate(model, tokenizer, records, tokens, batch_size, n_samples), tokens)
    kwargs: dict[str, Any] = {"batch_size": batch_size, "max_new_tokens": max_new_tokens, "n_samples": n_samples}
    if key in ("5", "6"):
        kwargs["workspace"] = workspace
    gate = {"1b": longctx_gate, "2": operators_gate, "3": chat_gate, "4": multiturn_gate, "5": toolcall_gate,
            "6": agentic_gate}[key]
    return gate(model, tokenizer, records, **kwargs)


def held_out_prompts(phase: str | int, n: int | None = None, seed: int = 0,
                     languages: tuple[str, ...] = ("en", "de")) -> list[dict]:
    """Held-out records of a phase, generated (never seen in training, whatever the training seed)."""
    from lossmask.generate import generate_phase

    key = phase_key(phase)
    records = generate_phase(key, n or DEFAULT_PROMPTS[key], seed, languages, held_out=True)
    return [r for r in records if not r.get("_replay")]


def load_prompts(path: str | Path) -> list[dict]:
    """The records of a JSONL prompt file (blank lines skipped; a bad line is an error naming it)."""
    from lossmask.errors import InputError
    from lossmask.mix import json_object, open_lines

    path = str(path)
    if not Path(path).is_file():
        raise LossmaskError(f"prompt file {path} does not exist (or is not a file)")
    records = []
    for line, raw in open_lines(path):
        if raw.isspace():
            continue
        try:
            records.append(json_object(raw, path, line))
        except InputError as exc:
            raise LossmaskError(str(exc.problem)) from None
    return records


def ood_prompts(phase: str | int) -> list[dict] | None:
    """The phase's out-of-distribution prompts, or None when none are shipped."""
    path = OOD_DIR / f"phase{phase_key(phase)}.jsonl"
    return load_prompts(path) if path.is_file() else None


def ood_warnings(ood: GateReport) -> list[str]:
    """A warning per thresholded check the out-of-distribution prompts fall short of."""
    return [
        f"out-of-distribution prompts: {c.name} at {c.rate:.1%} (the gate wants {c.threshold:.0%}); the model may "
        "depend on the training phrasings"
        for c in ood.checks
        if c.threshold is not None and c.total and not c.ok
    ]


def run_gate(
    phase: str | int,
    model_dir: str | Path | None = None,
    prompts: Prompts = None,
    *,
    model=None,
    tokenizer=None,
    n: int | None = None,
    seed: int = 0,
    languages: tuple[str, ...] = ("en", "de"),
    ood: bool = True,
    workspace: str | Path | None = None,
    batch_size: int = 32,
    max_new_tokens: int | None = None,
    n_samples: int = 8,
) -> GateReport:
    """Gate a checkpoint (``model_dir``, or an already loaded ``model`` and ``tokenizer``) on one phase."""
    key = phase_key(phase)
    if model is None or tokenizer is None:
        if model_dir is None:
            raise LossmaskError("run_gate needs a checkpoint directory (or a loaded model and tokenizer)")
        from lossmask.train.generate import load_for_inference

        model, tokenizer = load_for_inference(model_dir)
    if isinstance(prompts, list):
        records = prompts
    elif prompts is not None:
        records = load_prompts(prompts)
    else:
        records = held_out_prompts(key, n, seed, languages)
    options = {"workspace": workspace, "batch_size": batch_size, "max_new_tokens": max_new_tokens}
    report = gate_phase(key, model, tokenizer, records, n_samples=n_samples, **options)
    extra = ood_prompts(key) if ood else None
    if extra:
        report.ood = gate_phase(key, model, tokenizer, extra, n_samples=0, **options)
        report.warnings += ood_warnings(report.ood)
    return report


def regression_phases(up_to_phase: str | int) -> tuple[str, ...]:
    """The phases a checkpoint of ``up_to_phase`` must still pass: every phase up to it in ``CURRICULUM``."""
    key = phase_key(up_to_phase)
    return CURRICULUM[: CURRICULUM.index(key) + 1]


def run_regression(
    model_dir: str | Path | None = None,
    up_to_phase: str | int = "6",
    *,
    prompts: dict[str, Prompts] | None = None,
    model=None,
    tokenizer=None,
    **options: Any,
) -> list[GateReport]:
    """Every earlier phase's gate (and the phase's own) on one checkpoint, loaded once.

    ``prompts`` maps phase keys to that phase's prompts (records or a file); other phases get generated
    held-out prompts. ``options`` are ``run_gate``'s keyword options.
    """
    if model is None or tokenizer is None:
        if model_dir is None:
            raise LossmaskError("run_regression needs a checkpoint directory (or a loaded model and tokenizer)")
        from lossmask.train.generate import load_for_inference

        model, tokenizer = load_for_inference(model_dir)
    chosen = {phase_key(k): v for k, v in (prompts or {}).items()}
    return [
        run_gate(key, prompts=chosen.get(key), model=model, tokenizer=tokenizer, **options)
        for key in regression_phases(up_to_phase)
    ]


def gate_checkpoint(
    phase: str | int,
    model_dir: str | Path,
    prompts: Prompts = None,
    *,
    regression: bool = False,
    report: str | Path | None = None,
    console=None,
    **options: Any,
) -> list[GateReport]:
    """``lossmask gate``: one phase's gate (with ``regression``, every phase up to it) on a checkpoint,
    printed, and written to ``report`` as JSON when given. ``options`` are ``run_gate``'s."""
    from lossmask.gate.report import print_gate_report, write_reports

    if regression:
        reports = run_regression(model_dir, phase, prompts={phase: prompts} if prompts is not None else None,
                                 **options)
        print_regression(reports, console)
    else:
        reports = [run_gate(phase, model_dir, prompts, **options)]
        print_gate_report(reports[0], console)
    if report is not None:
        write_reports(reports, report)
    return reports


def print_regression(reports: list[GateReport], console=None) -> None:
    """Each phase's gate, then one line per phase."""
    from rich.console import Console
    from rich.table import Table

    from lossmask.gate.report import print_gate_report

    console = console or Console()
    for report in reports:
        print_gate_report(report, console)
    table = Table(title="regression")
    for column in ("phase", "gate", "result", "warnings"):
        table.add_column(column)
    for r in reports:
        table.add_row(r.phase, r.title, "[green]PASS[/]" if r.passed else "[red]FAIL[/]", str(len(r.warnings)))
    console.print(table)
