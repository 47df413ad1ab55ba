"""The format-lock gate: does a model answer held-out prompts in the myPT format and then stop?

Each held-out record is rendered by ``MyptRenderer`` without its final assistant message, followed by
the opening ``<myPT_assistant>`` tag: exactly the text the model saw before its answer in training.
The model generates greedily, up to ``max_new_tokens``, stopping at ``<myPT_eot>``.

A prompt passes when, within ``max_new_tokens`` generated tokens:

- the generation contains ``<myPT_eot>`` (else ``no_eot``),
- directly after ``</myPT_assistant>`` (else ``not_closed``),
- the answer holds no special token: no second ``<myPT_assistant>``, no ``<myPT_user>``, no other tag,
  no pad (else ``runaway``),
- nothing but padding follows ``<myPT_eot>`` (else ``after_eot``),
- and the answer before ``</myPT_assistant>`` is not blank (else ``empty_answer``: a model that closes
  every turn at once has not learnt to answer).

Exact match (the stripped answer equals the record's stripped answer) is a secondary metric, counted only
for passing prompts. ``passes`` requires the threshold overall and in every language, so one language
cannot carry another.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from lossmask.episode import Conversation, Source
from lossmask.errors import LossmaskError
from lossmask.gate.generation import (
    CLOSE,
    EOT,
    OPEN,
    generate_greedy,
    pad_id,
    special_ids,
    strip_padding,
    tag_ids,
)
from lossmask.render.mypt import MyptRenderer
from lossmask.sources import parse_record
from lossmask.tokenizer import TokenizerInfo


@dataclass
class Tally:
    """Counts for one language (or all prompts)."""

    total: int = 0
    passed: int = 0
    exact: int = 0

    @property
    def pass_rate(self) -> float:
        return self.passed / self.total if self.total else 0.0

    @property
    def exact_match_rate(self) -> float:
        return self.exact / self.total if self.total else 0.0


@dataclass(frozen=True)
class GateSample:
    """One prompt's outcome; ``generation`` is decoded with its special tokens, ``reason`` None on a pass."""

    language: str
    prompt: str
    expected: str
    generation: str
    passed: bool
    exact: bool
    reason: str | None


@dataclass
class GateResult:
    """The gate's outcome over all prompts; ``samples`` are the first prompts' rows, in prompt order."""

    pass_rate: float
    passed: int
    total: int
    per_language: dict[str, Tally]
    exact_match_rate: float
    samples: list[GateSample]
    failures: dict[str, int] = field(default_factory=dict)  # reason -> count


@dataclass(frozen=True)
class _Prompt:
    text: str
    question: str
    expected: str
    language: str


def render_prompt(conversation: Conversation, info: TokenizerInfo) -> str:
    """The myPT text before the assistant's answer: the rendered conversation plus ``<myPT_assistant>``.

    ``conversation`` must not contain the answer; the renderer writes every other part of the layout.
    """
    rendered = MyptRenderer(info).render(conversation)
    return rendered[0].text + OPEN


def format_lock_gate(
    model,
    tokenizer,
    prompts: list[dict],
    max_new_tokens: int = 20,
    batch_size: int = 32,
    n_samples: int = 8,
) -> GateResult:
    """Generate greedily for every prompt record and check the myPT turn ending (see module docstring)."""
    if not prompts:
        raise LossmaskError("the format-lock gate needs at least one held-out prompt")
    if max_new_tokens < 1 or batch_size < 1:
        raise LossmaskError(f"max_new_tokens and batch_size must be >= 1, got {max_new_tokens} and {batch_size}")
    info = TokenizerInfo.of(tokenizer)
    items = [_prompt(record, i, info) for i, record in enumerate(prompts)]
    ids = tag_ids(tokenizer)
    pad = pad_id(tokenizer)
    special = special_ids(tokenizer)
    encoded = [tokenizer(p.text, add_special_tokens=False)["input_ids"] for p in items]
    generated = generate_greedy(model, encoded, ids[EOT], pad, max_new_tokens, batch_size)
    overall = Tally()
    per_language: dict[str, Tally] = {}
    failures: dict[str, int] = {}
    samples = []
    for item, new in zip(items, generated):
        new = new[:max_new_tokens]
        reason, answer_ids = judge(new, ids[CLOSE], ids[EOT], pad, special)
        answer = tokenizer.decode(answer_ids).strip()
        if reason is None and not answer:
            reason = "empty_answer"
        exact = reason is None and answer == item.expected.strip()
        for tally in (overall, per_language.setdefault(item.language, Tally())):
            tally.total += 1
            tally.passed += reason is None
            tally.exact += exact
        if reason is not None:
            failures[reason] = failures.get(reason, 0) + 1
        if len(samples) < n_samples:
            generation = tokenizer.decode(strip_padding(new, pad, ids[EOT]), skip_special_tokens=False)
            passed = reason is None
            samples.append(GateSample(item.language, item.question, item.expected, generation, passed, exact, reason))
    return GateResult(
        pass_rate=overall.pass_rate,
        passed=overall.passed,
        total=overall.total,
        per_language=dict(sorted(per_language.items())),
        exact_match_rate=overall.exact_match_rate,
        samples=samples,
        failures=dict(sorted(failures.items())),
    )


def judge(new: list[int], close_id: int, eot_id: int, pad: int, special: set[int]) -> tuple[str | None, list[int]]:
    """(reason the generation fails or None, the answer's token ids) for one generation's new tokens.

    The format only: a blank answer is judged by the caller, which decodes it.
    """
    if eot_id not in new:
        return "no_eot", new
    end = new.index(eot_id)
    if end == 0 or new[end - 1] != close_id:
        return "not_closed", new[:end]
    answer = new[: end - 1]
    if any(t in special for t in answer):
        return "runaway", answer
    if any(t != pad for t in new[end + 1 :]):
        return "after_eot", answer
    return None, answer


def _prompt(record: dict, index: int, info: TokenizerInfo) -> _Prompt:
    """Parse a held-out record and split off its final assistant message (the expected answer)."""
    episode = parse_record(record, Source("held-out prompts", index + 1))
    if not isinstance(episode, Conversation) or episode.messages[-1].role != "assistant":
        raise LossmaskError(
            f"held-out prompt {index + 1}: expected a conversation ending with the assistant's answer "
            "(native schema: system, messages [user, assistant]); the gate compares against that answer"
        )
    *before, answer = episode.messages
    if not before or before[-1].role != "user":
        raise LossmaskError(f"held-out prompt {index + 1}: the answer must follow a user message")
    meta = episode.meta.get("_meta")
    language = episode.language or (meta.get("language") if isinstance(meta, dict) else None) or "unknown"
    prompt = Conversation(tuple(before), episode.source, episode.system, episode.language)
    return _Prompt(render_prompt(prompt, info), before[-1].content, answer.content, language)


def passes(result: GateResult, threshold: float = 0.9) -> bool:
    """Whether the gate is passed: ``threshold`` reached overall and in every language."""
    if result.total == 0:
        return False
    return result.pass_rate >= threshold and all(t.pass_rate >= threshold for t in result.per_language.values())


def print_gate(result: GateResult, console=None) -> None:
    """The gate's outcome as rich tables: per language, then the first samples."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    table = Table(title="format-lock gate")
    for column in ("language", "passed", "total", "pass rate", "exact match"):
        table.add_column(column, justify="left" if column == "language" else "right")
    rows = [(lang, t.passed, t.total, t.pass_rate, t.exact_match_rate) for lang, t in result.per_language.items()]
    rows.append(("all", result.passed, result.total, result.pass_rate, result.exact_match_rate))
    for name, passed, total, rate, exact in rows:
        style = "bold" if name == "all" else None
        table.add_row(name, str(passed), str(total), f"{rate:.1%}", f"{exact:.1%}", style=style)
    console.print(table)
    print_failures_and_samples(
        console, result.failures, result.samples,
        lambda s: ("[green]pass[/]" + (" (exact)" if s.exact else "")) if s.passed else f"[red]{s.reason}[/]",
    )


def print_failures_and_samples(
    console: Any, failures: dict[str, int], samples: Sequence[Any], verdict: Callable[[Any], str]
) -> None:
    """The failure counts and the samples table printed under a gate's table (every gate shows them alike).

    ``samples`` have ``language``, ``prompt``, ``expected`` and ``generation``; ``verdict`` writes a sample's
    result cell (rich markup).
    """
    from rich.markup import escape
    from rich.table import Table

    if failures:
        console.print("failures: " + ", ".join(f"{reason} {count}" for reason, count in failures.items()))
    if samples:
        table = Table(title="samples")
        for column in ("lang", "prompt", "expected", "generation", "result"):
            table.add_column(column, overflow="fold")
        for s in samples:
            table.add_row(s.language, escape(s.prompt), escape(s.expected), escape(s.generation), verdict(s))
        console.print(table)
