"""What is in a data file (``lossmask stats``): counts, lengths and, with ``diversity``, how varied it is.

Every input format is read through ``lossmask.sources.read_episodes``; lines it rejects are counted by
reason, not fatal. Everything is streamed: memory does not grow with the number of episodes, except
where noted below for the diversity counters, which are bounded.

Counts:

- episodes by kind (conversation, text_pair, marked_text, replay) and rejected lines by reason;
- messages per role, with characters (total, mean, max): ``user``, ``assistant`` (its content; its
  reasoning is counted apart as ``think``), ``assistant_toolcall`` (name plus arguments as JSON),
  ``toolresult``, ``system`` (the system prompt), and for text episodes ``prompt``/``completion``
  (text pairs), ``text`` (marked text) and ``replay``;
- assistant turns per conversation: a turn is a run of messages between two user messages that holds
  an assistant message or tool call (a tool loop is one turn).

Diversity (``diversity=True``):

- distinct-n for n = 1, 2, 3 over all assistant text and over all user text: distinct n-grams / all
  n-grams, with words = whitespace-separated tokens of the lowercased text; n-grams do not cross
  message boundaries. n-grams are compared by a 64-bit hash; the count is exact (up to hash
  collisions, negligible below billions) while a counter holds at most ``exact_limit`` distinct n-grams
  (8 bytes each, up to twice that while merging), and past that a HyperLogLog estimate (16,384
  registers, about 1% error), marked ``≈``;
- the most repeated user templates: a user message with runs of digits replaced by ``#`` and quoted
  strings (``"…"``, ``'…'``, ``“…”``, ``„…“``, ``«…»``, backticks) by ``"…"``, whitespace collapsed, compared
  on the first 200 characters. Counted with the Misra-Gries summary of ``template_capacity`` entries:
  exact while there are no more distinct templates than that, else lower bounds (flagged);
- histograms of message length in characters (user, assistant), in power-of-two buckets.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
from array import array
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from itertools import repeat

import numpy as np
from rich.console import Console
from rich.table import Table

from lossmask.episode import Conversation, MarkedText, Replay, TextPair
from lossmask.errors import InputProblem
from lossmask.sources import read_episodes

ROLES: tuple[str, ...] = (
    "system", "user", "assistant", "think", "assistant_toolcall", "toolresult", "prompt", "completion", "text",
    "replay",
)
NGRAMS: tuple[int, ...] = (1, 2, 3)
TOP_TEMPLATES = 10
TEMPLATE_CHARS = 200
_HLL_BITS = 14
_BATCH_TOKENS = 1 << 14  # words hashed per batch
_MERGE_AT = 1 << 14  # pending hashes merged into the sorted array once there are this many, or as many as it holds
_MIX1, _MIX2, _PRIME = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB), np.uint64(0x100000001B3)
_QUOTED = re.compile(r'"[^"\n]*"|“[^”\n]*”|„[^“”\n]*[“”]|«[^»\n]*»|`[^`\n]*`|(?<!\w)\'[^\'\n]*\'(?!\w)')
_DIGITS = re.compile(r"\d+")
_SPACE = re.compile(r"\s+")


@dataclass
class Lengths:
    """Messages of one role: how many, their characters, and a power-of-two histogram of their lengths."""

    count: int = 0
    chars: int = 0
    max_chars: int = 0
    histogram: Counter = field(default_factory=Counter)  # bucket (see bucket_of) -> messages

    def add(self, chars: int) -> None:
        self.count += 1
        self.chars += chars
        self.max_chars = max(self.max_chars, chars)
        self.histogram[bucket_of(chars)] += 1

    @property
    def mean(self) -> float:
        return self.chars / self.count if self.count else 0.0


@dataclass
class Distinct:
    distinct: int
    total: int
    exact: bool

    @property
    def ratio(self) -> float:
        return self.distinct / self.total if self.total else 0.0


@dataclass
class Diversity:
    distinct: dict[str, dict[int, Distinct]]  # "assistant" / "user" -> n -> counts
    templates: list[tuple[str, int]]  # the most repeated user templates, most first
    templates_exact: bool
    user_messages: int


@dataclass
class Stats:
    inputs: list[str]
    episodes: int = 0
    kinds: Counter = field(default_factory=Counter)
    rejected: Counter = field(default_factory=Counter)  # reason -> lines
    first_problems: list[InputProblem] = field(default_factory=list)
    roles: dict[str, Lengths] = field(default_factory=dict)
    turns: Counter = field(default_factory=Counter)  # assistant turns -> conversations
    diversity: Diversity | None = None


def compute_stats(
    inputs: str | os.PathLike | Sequence[str | os.PathLike],
    *,
    diversity: bool = False,
    input_format: str = "auto",
    exact_limit: int = 1 << 22,
    template_capacity: int = 100_000,
) -> Stats:
    """Read every episode of ``inputs`` once and count (module docstring)."""
    paths = [str(inputs)] if isinstance(inputs, (str, os.PathLike)) else [str(p) for p in inputs]
    stats = Stats(paths)
    texts = {"assistant": TextDiversity(exact_limit), "user": TextDiversity(exact_limit)} if diversity else {}
    templates = TopCounter(template_capacity) if diversity else None
    for path in paths:
        for item in read_episodes(path, input_format):
            if isinstance(item, InputProblem):
                stats.rejected[item.reason] += 1
                if len(stats.first_problems) < 10:
                    stats.first_problems.append(item)
                continue
            stats.episodes += 1
            for role, text in _messages(item, stats):
                stats.roles.setdefault(role, Lengths()).add(len(text))
                if role in texts:
                    texts[role].add(text)
                if role == "user" and templates is not None:
                    templates.add(template_of(text))
    if diversity:
        stats.diversity = Diversity(
            {role: t.result() for role, t in texts.items()},
            templates.most_common(TOP_TEMPLATES),
            templates.exact,
            stats.roles.get("user", Lengths()).count,
        )
    return stats


def template_of(text: str) -> str:
    """A user message with the parts that vary between instances of a template replaced (module docstring)."""
    text = _DIGITS.sub("#", _QUOTED.sub('"…"', text))
    return _SPACE.sub(" ", text).strip()[:TEMPLATE_CHARS]


def bucket_of(chars: int) -> int:
    """Histogram bucket: 0 = empty, 1 = 1-15 characters, b >= 2 = 2**(b+2) to 2**(b+3)-1."""
    return 0 if chars == 0 else max(1, chars.bit_length() - 3)


def bucket_label(bucket: int) -> str:
    if bucket == 0:
        return "0"
    if bucket == 1:
        return "1-15"
    return f"{2 ** (bucket + 2):,}-{2 ** (bucket + 3) - 1:,}"


def assistant_turns(conversation: Conversation) -> int:
    """Runs of messages between user messages that hold an assistant message or tool call."""
    turns = 0
    answered = False
    for m in conversation.messages:
        if m.role == "user":
            answered = False
        elif m.role in ("assistant", "assistant_toolcall") and not answered:
            turns += 1
            answered = True
    return turns


class DistinctCounter:
    """Distinct 64-bit hashes: exact (a sorted array) up to ``exact_limit``, then a HyperLogLog estimate."""

    def __init__(self, exact_limit: int):
        self.exact_limit = exact_limit
        self.total = 0
        self._unique = np.empty(0, dtype=np.uint64)
        self._pending: list[np.ndarray] = []
        self._pending_size = 0
        self._registers: np.ndarray | None = None

    def add(self, hashes: np.ndarray) -> None:
        self.total += len(hashes)
        if self._registers is not None:
            _hll_add(self._registers, hashes)
            return
        batch = np.unique(hashes)
        self._pending.append(batch)
        self._pending_size += len(batch)
        if self._pending_size >= max(_MERGE_AT, len(self._unique)):
            self._merge()

    @property
    def exact(self) -> bool:
        self._merge()
        return self._registers is None

    def distinct(self) -> int:
        self._merge()
        return len(self._unique) if self._registers is None else _hll_estimate(self._registers)

    def _merge(self) -> None:
        if self._pending:
            self._unique = np.union1d(self._unique, np.concatenate(self._pending))
            self._pending, self._pending_size = [], 0
        if self._registers is None and len(self._unique) > self.exact_limit:
            self._registers = np.zeros(1 << _HLL_BITS, dtype=np.uint8)
            _hll_add(self._registers, self._unique)
            self._unique = np.empty(0, dtype=np.uint64)


class TextDiversity:
    """distinct-n counters of one kind of text, fed message by message and hashed in batches."""

    def __init__(self, exact_limit: int):
        self.counters = {n: DistinctCounter(exact_limit) for n in NGRAMS}
        self._hashes = array("Q")
        self._messages = array("q")  # message number of every buffered word
        self._message = 0

    def add(self, text: str) -> None:
        words = text.lower().split()
        self._hashes.extend(_word_hash(w) for w in words)
        self._messages.extend(repeat(self._message, len(words)))
        self._message += 1
        if len(self._hashes) >= _BATCH_TOKENS:
            self._flush()

    def result(self) -> dict[int, Distinct]:
        self._flush()
        return {n: Distinct(c.distinct(), c.total, c.exact) for n, c in self.counters.items()}

    def _flush(self) -> None:
        hashes = np.array(self._hashes, dtype=np.uint64)
        messages = np.array(self._messages, dtype=np.int64)
        self._hashes, self._messages = array("Q"), array("q")
        for n, counter in self.counters.items():
            if len(hashes) < n:
                continue
            width = len(hashes) - n + 1
            grams = hashes[:width].copy()
            for j in range(1, n):
                grams = _mix(grams * _PRIME + hashes[j : j + width])
            inside = messages[:width] == messages[n - 1 :]
            counter.add(grams[inside])


class TopCounter:
    """The Misra-Gries summary: counts of at most ``capacity`` keys; exact until more keys than that come."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.counts: dict[str, int] = {}
        self.exact = True

    def add(self, key: str) -> None:
        if key in self.counts:
            self.counts[key] += 1
        elif len(self.counts) < self.capacity:
            self.counts[key] = 1
        else:
            self.exact = False
            self.counts = {k: c - 1 for k, c in self.counts.items() if c > 1}

    def most_common(self, n: int) -> list[tuple[str, int]]:
        return sorted(self.counts.items(), key=lambda kv: (-kv[1], kv[0]))[:n]


def print_stats(stats: Stats, console: Console | None = None) -> None:
    """Counts, per-role lengths, turns and (when computed) diversity, as rich tables."""
    console = console or Console()
    console.print(f"[bold]lossmask stats[/]: {', '.join(stats.inputs)}")
    table = Table(show_header=False)
    table.add_column("what", style="bold")
    table.add_column("count", justify="right")
    table.add_row("episodes", f"{stats.episodes:,}")
    for kind, n in sorted(stats.kinds.items()):
        table.add_row(f"  {kind}", f"{n:,}")
    table.add_row("rejected lines", f"{sum(stats.rejected.values()):,}")
    for reason, n in sorted(stats.rejected.items()):
        table.add_row(f"  {reason}", f"{n:,}")
    console.print(table)
    for problem in stats.first_problems[:5]:
        console.print(f"  [yellow]rejected[/] {problem}")
    roles = Table(title="messages", title_justify="left")
    for name in ("role", "messages", "chars", "mean chars", "max chars"):
        roles.add_column(name, justify="left" if name == "role" else "right")
    for role in ROLES:
        if role in stats.roles:
            r = stats.roles[role]
            roles.add_row(role, f"{r.count:,}", f"{r.chars:,}", f"{r.mean:,.1f}", f"{r.max_chars:,}")
    console.print(roles)
    if stats.turns:
        console.print(_bars("assistant turns per conversation", {str(k): v for k, v in sorted(stats.turns.items())}))
    if stats.diversity is not None:
        _print_diversity(stats, console)


def _print_diversity(stats: Stats, console: Console) -> None:
    div = stats.diversity
    table = Table(title="distinct-n (distinct / all n-grams of lowercased words)", title_justify="left")
    table.add_column("text")
    for n in NGRAMS:
        table.add_column(f"distinct-{n}", justify="right")
    for role, by_n in div.distinct.items():
        cells = [f"{'' if d.exact else '≈'}{d.ratio:.3f} ({d.distinct:,}/{d.total:,})" for d in by_n.values()]
        table.add_row(role, *cells)
    console.print(table)
    if div.templates:
        title = "most repeated user templates" + ("" if div.templates_exact else " (counts are lower bounds)")
        templates = Table(title=title, title_justify="left")
        templates.add_column("count", justify="right")
        templates.add_column("share", justify="right")
        templates.add_column("template", overflow="fold")
        for text, n in div.templates:
            templates.add_row(f"{n:,}", f"{n / div.user_messages:.1%}", text)
        console.print(templates)
    for role in ("user", "assistant"):
        hist = stats.roles[role].histogram if role in stats.roles else {}
        if hist:
            console.print(_bars(f"{role} message length (chars)", {bucket_label(b): hist[b] for b in sorted(hist)}))


def _bars(title: str, rows: dict[str, int], width: int = 40) -> Table:
    table = Table(title=title, title_justify="left", show_header=False)
    table.add_column("bucket", justify="right")
    table.add_column("count", justify="right")
    table.add_column("bar")
    top = max(rows.values(), default=0)
    for label, n in rows.items():
        table.add_row(label, f"{n:,}", "█" * (math.ceil(width * n / top) if top else 0))
    return table


def _messages(episode, stats: Stats):
    """(role, text) of every message of an episode; also counts its kind and turns."""
    if isinstance(episode, Conversation):
        stats.kinds["conversation"] += 1
        stats.turns[assistant_turns(episode)] += 1
        if episode.system is not None:
            yield "system", episode.system
        for m in episode.messages:
            if m.role == "assistant_toolcall":
                yield m.role, (m.name or "") + json.dumps(m.arguments, ensure_ascii=False)
                continue
            yield m.role, m.content
            if m.think is not None:
                yield "think", m.think
    elif isinstance(episode, TextPair):
        stats.kinds["text_pair"] += 1
        yield "prompt", episode.prompt
        yield "completion", episode.completion
    elif isinstance(episode, MarkedText):
        stats.kinds["marked_text"] += 1
        yield "text", episode.text
    elif isinstance(episode, Replay):
        stats.kinds["replay"] += 1
        yield "replay", episode.text


@lru_cache(maxsize=1 << 18)
def _word_hash(word: str) -> int:
    return int.from_bytes(hashlib.blake2b(word.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "little")


def _mix(x: np.ndarray) -> np.ndarray:
    """The splitmix64 finalizer: spreads the bits of combined word hashes (wrapping uint64 arithmetic)."""
    x = x ^ (x >> np.uint64(30))
    x = x * _MIX1
    x = x ^ (x >> np.uint64(27))
    x = x * _MIX2
    return x ^ (x >> np.uint64(31))


def _hll_add(registers: np.ndarray, hashes: np.ndarray) -> None:
    """Register = max rank (position of the first 1 bit after the index bits) of the hashes it indexes."""
    index = (hashes >> np.uint64(64 - _HLL_BITS)).astype(np.int64)
    rest = hashes << np.uint64(_HLL_BITS)
    top = np.zeros(len(rest), dtype=np.int64)  # index of the highest set bit (float log2, corrected below)
    nonzero = rest != 0
    top[nonzero] = np.floor(np.log2(rest[nonzero].astype(np.float64))).astype(np.int64)
    top[nonzero] -= (rest[nonzero] >> top[nonzero].astype(np.uint64)) == 0  # log2 rounded up to a power of 2
    rank = np.where(nonzero, 64 - top, 64 - _HLL_BITS + 1).astype(np.uint8)
    np.maximum.at(registers, index, rank)


def _hll_estimate(registers: np.ndarray) -> int:
    m = len(registers)
    alpha = 0.7213 / (1 + 1.079 / m)
    estimate = alpha * m * m / float(np.sum(np.ldexp(1.0, -registers.astype(np.int64))))
    zeros = int(np.count_nonzero(registers == 0))
    if estimate <= 2.5 * m and zeros:
        estimate = m * math.log(m / zeros)
    return int(round(estimate))


__all__ = [
    "NGRAMS", "ROLES", "Distinct", "DistinctCounter", "Diversity", "Lengths", "Stats", "TextDiversity", "TopCounter",
    "assistant_turns", "bucket_label", "bucket_of", "compute_stats", "print_stats", "template_of",
]
