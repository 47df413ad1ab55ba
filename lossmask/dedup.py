"""Dropping duplicate episodes (``lossmask dedup``), keeping the first occurrence.

Kinds (``by``):

- ``exact``: the same record, whatever its key order and spacing: the canonical JSON of the line
  (keys sorted, compact separators, non-ASCII kept) is compared. ``1`` and ``1.0`` differ.
- ``user``: the same user side. The key is every user message of the episode, in order, each with its
  ``context`` (retrieved text: the same question over different documents is a different task),
  normalised: Unicode NFKC, casefolded, whitespace runs collapsed to one space, punctuation stripped
  from both ends. The system prompt, assistant and tool messages are not part of it, so two answers to
  the same question keep only the first. A text pair's key is its prompt; marked text and replay
  episodes have no user side: ``both`` compares them exactly, ``user`` keeps them all (counted).
  Episodes are parsed with ``lossmask.sources.parse_record`` (``input_format``), so every input
  schema is understood.
- ``both`` (default): a line is an ``exact`` duplicate if its record was seen, else a ``user``
  duplicate if its user side was seen. Counts in the report are per kind.

Lines: blank lines are dropped; a line that is not a JSON object (or, for ``user``/``both``, not an
episode) is an error naming file:line, or with ``on_error="skip"`` is dropped and counted. Kept lines
are written byte for byte (a byte-order mark dropped, a final newline added); several inputs are
deduplicated together, in the order given.

Memory: streaming, one line at a time; what grows is a Python set of 16-byte BLAKE2b digests per kind,
O(unique episodes). Each entry costs about 100 bytes in CPython (a 49-byte bytes object plus the set's
slot and spare room), so 10 million unique episodes take about 1 GB per kind. Two different records
share a digest with probability about n² / 2¹²⁹: nothing in practice.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import unicodedata
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

from rich.console import Console
from rich.table import Table

from lossmask.episode import Conversation, Source, TextPair
from lossmask.errors import InputError, InputProblem, LossmaskError
from lossmask.atomic import atomic_file
from lossmask.mix import MAX_PROBLEMS_KEPT, ON_ERROR, json_object, open_lines
from lossmask.sources import parse_record

BY: tuple[str, ...] = ("exact", "user", "both")
_SPACE = re.compile(r"\s+")
_BOM = b"\xef\xbb\xbf"
_MAX_EXAMPLES = 5  # duplicate lines listed per kind in a report


@dataclass
class DedupReport:
    output: str
    by: str
    read: int = 0  # non-blank lines read
    kept: int = 0
    duplicates: Counter = field(default_factory=Counter)  # kind -> lines dropped
    skipped: int = 0  # bad lines dropped (on_error="skip")
    no_user: int = 0  # episodes without a user side (compared exactly under "both", kept under "user")
    examples: dict[str, list[str]] = field(default_factory=dict)  # kind -> first duplicate lines, "file:line"
    problems: list[InputProblem] = field(default_factory=list)  # the first skipped lines


def dedup(
    inputs: str | os.PathLike | Sequence[str | os.PathLike],
    output: str | os.PathLike,
    *,
    by: str = "both",
    input_format: str = "auto",
    on_error: str = "fail",
) -> DedupReport:
    """Write the lines of ``inputs`` to ``output`` without duplicates (module docstring); return the counts."""
    if by not in BY:
        raise ValueError(f"by must be one of {BY}, got {by!r}")
    if on_error not in ON_ERROR:
        raise ValueError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")
    paths = [str(inputs)] if isinstance(inputs, (str, os.PathLike)) else [str(p) for p in inputs]
    if not paths:
        raise LossmaskError("dedup needs at least one input")
    report = DedupReport(str(output), by)
    seen: dict[str, set[bytes]] = {"exact": set(), "user": set()}
    with atomic_file(output) as out:
        for path in paths:
            for lineno, raw in open_lines(path):
                if raw.isspace():
                    continue
                report.read += 1
                try:
                    keys = _keys(raw, path, lineno, by, input_format)
                except InputError as exc:
                    if on_error == "fail":
                        raise
                    report.skipped += 1
                    if len(report.problems) < MAX_PROBLEMS_KEPT:
                        report.problems.append(exc.problem)
                    continue
                report.no_user += "user" in keys and keys["user"] is None
                kind = _first_seen(keys, seen)
                if kind is None:
                    out.write(raw.removeprefix(_BOM).rstrip(b"\n") + b"\n")
                    report.kept += 1
                    continue
                report.duplicates[kind] += 1
                examples = report.examples.setdefault(kind, [])
                if len(examples) < _MAX_EXAMPLES:
                    examples.append(f"{path}:{lineno}")
    return report


def normalize_user(text: str) -> str:
    """NFKC, casefold, whitespace runs → one space, punctuation and spaces stripped from both ends."""
    text = _SPACE.sub(" ", unicodedata.normalize("NFKC", text).casefold())
    start, end = 0, len(text)
    while start < end and _edge(text[start]):
        start += 1
    while end > start and _edge(text[end - 1]):
        end -= 1
    return text[start:end]


def user_key(episode) -> str | None:
    """The normalised user side of an episode (None when it has none): what ``by="user"`` compares."""
    if isinstance(episode, TextPair):
        return normalize_user(episode.prompt)
    if not isinstance(episode, Conversation):
        return None
    parts = [
        normalize_user(m.context or "") + "\x1f" + normalize_user(m.content)
        for m in episode.messages
        if m.role == "user"
    ]
    return "\x1e".join(parts) if parts else None


def print_dedup_report(report: DedupReport, console: Console | None = None) -> None:
    console = console or Console()
    console.print(f"[bold]lossmask dedup[/] (by {report.by}) → {report.output}")
    table = Table(show_header=False)
    table.add_column("what", style="bold")
    table.add_column("lines", justify="right")
    table.add_column("examples")
    table.add_row("read", f"{report.read:,}", "")
    for kind in ("exact", "user"):
        if kind in report.duplicates or report.by in (kind, "both"):
            examples = ", ".join(report.examples.get(kind, []))
            table.add_row(f"{kind} duplicates", f"{report.duplicates[kind]:,}", examples)
    if report.skipped:
        table.add_row("bad lines skipped", f"{report.skipped:,}", "")
    if report.no_user:
        note = "kept" if report.by == "user" else "compared exactly only"
        table.add_row("without a user side", f"{report.no_user:,}", note)
    table.add_row("kept", f"{report.kept:,}", "")
    console.print(table)
    for problem in report.problems[:10]:
        console.print(f"  [yellow]skipped[/] {problem}")


def _edge(char: str) -> bool:
    return char == " " or unicodedata.category(char).startswith("P")


def _digest(text: str) -> bytes:
    return hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16).digest()


def _keys(raw: bytes, path: str, lineno: int, by: str, input_format: str) -> dict[str, bytes | None]:
    """Digest per kind compared (None: this episode has no user side); raises InputError for a bad line."""
    obj = json_object(raw, path, lineno)
    keys: dict[str, bytes | None] = {}
    if by in ("exact", "both"):
        keys["exact"] = _digest(json.dumps(obj, sort_keys=True, ensure_ascii=False, separators=(",", ":")))
    if by in ("user", "both"):
        user = user_key(parse_record(obj, Source(path, lineno), input_format))
        keys["user"] = None if user is None else _digest(user)
    return keys


def _first_seen(keys: dict[str, bytes | None], seen: dict[str, set[bytes]]) -> str | None:
    """The first kind whose key was seen before (None: a new episode); records every key either way."""
    found = None
    for kind, key in keys.items():
        if key is None:
            continue
        if key in seen[kind]:
            found = found or kind
        else:
            seen[kind].add(key)
    return found


__all__ = ["BY", "DedupReport", "dedup", "normalize_user", "print_dedup_report", "user_key"]
