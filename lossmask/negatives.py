"""Negatives from good SFT answers (``lossmask negatives``) and balanced pair sets (``lossmask pairs``).

``build_negatives`` reads SFT episodes (any input format sources.py reads) and, for every conversation
that ends with an assistant answer holding text, writes one negative per applicable kind: the same
episode in the native schema with that answer replaced. Each negative line carries in ``_meta``:
``negative_kind``, ``negative_of`` (``file``, ``line`` and ``episode_sha256`` of the SFT episode) and,
where it applies, ``omit_stop``, ``format_violation`` or ``corruption``. The kinds:

- ``refusal``: an unwarranted refusal from fixed English or German templates (the episode's
  ``language``, else ``_meta.language``, else a word-list guess; English by default).
- ``truncated``: the answer cut after 30-70 % of its words (a one-word answer after half its characters)
  with ``_meta.omit_stop: true``: the pair's rejected side is rendered without its stop (pairs.py), so
  the model learns that an answer ends with its stop, not mid-sentence.
- ``off_topic``: the answer of another episode (same language where there is one) to a different question.
- ``format``: a format violation, one of ``missing_stop`` (the whole answer without its stop/END/eot:
  ``omit_stop``), ``end_inline`` (``END`` written on the answer's line), ``continues`` (the answer runs
  on into a made-up ``User:`` turn) and ``foreign_tags`` (the answer wrapped in ``<answer>`` tags).
- ``factual``: one corruption: a number changed (±1, 2, 3, 5 or 10), Yes/No (Ja/Nein) flipped, or a
  capitalised word (an entity: not a sentence-starter stop word) swapped for another capitalised word of
  the corpus answers in the same language. Answers with none of these get no factual negative.

Negatives keep the answer's other fields (reasoning, citation) except refusals and off-topic answers,
which are whole messages; ``train``/``weight`` are dropped. Random choices draw from a generator seeded
by ``seed``, the input file's position, the line and the kind, so the output depends only on the inputs
and the seed. The whole input is held in memory (off-topic answers and entities come from the corpus).

``build_pairs`` joins negatives to their SFT episodes by ``episode_sha256`` (so files may move), makes
pair records (``system``, ``language``, ``tools``, ``prompt``, ``chosen``, ``rejected``, ``_meta`` with the
negative's labels and ``omit_stop``), drops exact duplicates and negatives equal to their answer, and
balances the kinds: every kind contributes the same number of pairs, the count of the scarcest kind
(capped by ``per_kind``), drawn at random per kind. The output is shuffled; written atomically.
"""
from __future__ import annotations

import hashlib
import json
import random
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from lossmask.episode import Conversation, Message
from lossmask.errors import InputProblem, LossmaskError
from lossmask.generate.format_lock import write_jsonl

KINDS = ("refusal", "truncated", "off_topic", "format", "factual")
FORMAT_VIOLATIONS = ("missing_stop", "end_inline", "continues", "foreign_tags")
ON_ERROR = ("fail", "skip")

REFUSALS: dict[str, tuple[str, ...]] = {
    "en": (
        "I'm sorry, but I can't help with that.",
        "I'm afraid I can't answer that question.",
        "As an AI assistant, I am not able to provide that information.",
        "Sorry, I cannot assist with this request.",
    ),
    "de": (
        "Es tut mir leid, aber dabei kann ich nicht helfen.",
        "Leider kann ich diese Frage nicht beantworten.",
        "Als KI-Assistent kann ich diese Information nicht bereitstellen.",
        "Entschuldigung, bei dieser Anfrage kann ich nicht helfen.",
    ),
}
# A pattern check, not a classifier: the phrasings refusals (ours and common model ones) start with.
REFUSAL_PATTERN = re.compile(
    r"\b(I'?m sorry|I am sorry|I(?: ?am|'m) (?:not able|unable|afraid)|I can(?:no|')t (?:help|answer|assist|provide)"
    r"|I cannot|as an AI|sorry, I|es tut mir leid|leider kann ich|als KI|entschuldigung"
    r"|kann ich (?:\w+ ){0,3}nicht (?:helfen|beantworten|bereitstellen))",
    re.IGNORECASE,
)
_GERMAN_WORDS = frozenset(
    "der die das und ist nicht ich du sie wir ein eine was wie wo warum welche welcher welches bitte antworte "
    "hauptstadt farbe ja nein mit für auf".split()
)
_POLARITY = {"Yes": "No", "No": "Yes", "yes": "no", "no": "yes", "Ja": "Nein", "Nein": "Ja", "ja": "nein", "nein": "ja"}
_POLARITY_RE = re.compile(r"\b(" + "|".join(_POLARITY) + r")\b")
_NUMBER_RE = re.compile(r"\d+")
_ENTITY_RE = re.compile(r"\b[A-ZÄÖÜ][A-Za-zÄÖÜäöüß]+(?:-[A-Za-zÄÖÜäöüß]+)*\b")
_STOP_WORDS = frozenset(
    "I A An The It Its This That These Those There Here He She We You They My Your Our Their What Which Who How "
    "When Where Why Yes No Not And But Or If So Also Sure Please Sorry Der Die Das Ein Eine Einen Es Er Sie Wir "
    "Ihr Ich Du Ja Nein Und Aber Oder Wenn Was Wer Wie Wo Warum Welche Dies Diese Dieser Hier Da Bitte".split()
)
_TAG_RE = re.compile(r"</?[A-Za-z_][\w.-]*>")


def language_of(episode: Conversation) -> str:
    """``en`` or ``de``: the episode's language, its ``_meta.language``, else a guess from German function words."""
    meta = episode.meta.get("_meta")
    for value in (episode.language, meta.get("language") if isinstance(meta, dict) else None):
        if isinstance(value, str) and value.lower()[:2] in REFUSALS:
            return value.lower()[:2]
    words = re.findall(r"[a-zäöüß]+", " ".join(m.content for m in episode.messages).lower())
    german = sum(w in _GERMAN_WORDS for w in words) + 3 * sum(ch in "äöüß" for w in words for ch in w)
    return "de" if german >= max(1, len(words) // 6) else "en"


def looks_like_refusal(text: str) -> bool:
    """Pattern check: does the text contain a common refusal phrase (English or German)?"""
    return REFUSAL_PATTERN.search(text) is not None


def message_record(m: Message) -> dict[str, Any]:
    """A message in the native JSONL schema (the inverse of sources.py for native messages)."""
    record: dict[str, Any] = {"role": m.role}
    if m.role != "assistant_toolcall":
        record["content"] = m.content
    for name in ("name", "arguments", "context", "think", "cite", "train", "weight"):
        value = getattr(m, name)
        if value is not None:
            record[name] = value
    return record


def _conversation_fields(episode: Conversation) -> dict[str, Any]:
    """The episode's ``system``, ``language`` and ``tools`` as the native schema writes them (those it has).

    Episode records and pair records carry them the same way, in this order.
    """
    record: dict[str, Any] = {}
    if episode.system is not None:
        record["system"] = episode.system
    if episode.language is not None:
        record["language"] = episode.language
    if episode.tools:
        record["tools"] = list(episode.tools)
    return record


def episode_record(episode: Conversation, messages: list[dict] | None = None, meta: dict | None = None) -> dict:
    """A conversation in the native schema (``messages`` and ``_meta`` replaced when given)."""
    record: dict[str, Any] = {k: v for k, v in episode.meta.items() if k != "_meta"}
    record.update(_conversation_fields(episode))
    record["messages"] = messages if messages is not None else [message_record(m) for m in episode.messages]
    old = episode.meta.get("_meta")
    merged = {**(old if isinstance(old, dict) else {}), **(meta or {})}
    if merged:
        record["_meta"] = merged
    return record


def episode_sha256(episode: Conversation) -> str:
    """A fingerprint of an episode's content (system, messages, tools), for joining negatives to it."""
    content = {"system": episode.system, "tools": episode.tools,
               "messages": [message_record(m) for m in episode.messages]}
    return hashlib.sha256(json.dumps(content, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


# -- reading SFT episodes ------------------------------------------------------------------------------------
@dataclass
class _Answered:
    """An SFT conversation ending with an assistant answer that has text: the material of negatives."""

    episode: Conversation
    file_index: int
    language: str
    sha: str

    @property
    def answer(self) -> Message:
        return self.episode.messages[-1]

    @property
    def question(self) -> str:
        users = [m.content for m in self.episode.messages if m.role == "user"]
        return users[-1] if users else ""


def _read_answered(inputs: list[str], on_error: str, report: NegativesReport) -> list[_Answered]:
    from lossmask.sources import read_episodes

    if on_error not in ON_ERROR:
        raise LossmaskError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")
    out = []
    for fi, path in enumerate(inputs):
        if not Path(path).is_file():
            raise LossmaskError(f"input file {path} does not exist (or is not a file)")
        for item in read_episodes(path):
            report.episodes += 1
            if isinstance(item, InputProblem):
                if on_error == "fail":
                    raise LossmaskError(f"{item}\nNothing was written. Fix the line, or pass --on-error skip.")
                report.rejected[item.reason] += 1
                continue
            last = item.messages[-1] if isinstance(item, Conversation) else None
            if last is None or last.role != "assistant" or not last.content.strip() or last.loss_weight <= 0:
                report.skipped += 1  # not a conversation that ends with a trained answer holding text
                continue
            out.append(_Answered(item, fi, language_of(item), episode_sha256(item)))
    return out


# -- the five kinds -----------------------------------------------------------------------------------------
class _Corpus:
    """What negatives draw from across episodes: answers and capitalised words of the answers, by language."""

    def __init__(self, answered: list[_Answered]):
        self.answered = answered
        self.by_language: dict[str, list[int]] = {}
        for i, a in enumerate(answered):
            self.by_language.setdefault(a.language, []).append(i)
        entities: dict[str, set[str]] = {}
        for a in answered:
            entities.setdefault(a.language, set()).update(_ENTITY_RE.findall(a.answer.content))
        self.entities = {lang: sorted(words - _STOP_WORDS) for lang, words in entities.items()}


def _negative(kind: str, a: _Answered, corpus: _Corpus, rng: random.Random) -> tuple[dict, dict] | None:
    """(final message, extra _meta) of one negative, or None where the kind does not apply to this answer."""
    own = _plain(a.answer)
    content = a.answer.content
    if kind == "refusal":
        return {"role": "assistant", "content": rng.choice(REFUSALS[a.language])}, {}
    if kind == "truncated":
        cut = _truncate(content, rng)
        return (own | {"content": cut}, {"omit_stop": True}) if cut else None
    if kind == "off_topic":
        other = _other(a, corpus, rng)
        return None if other is None else (_plain(other.answer), {})
    if kind == "format":
        variant = rng.choice(FORMAT_VIOLATIONS)
        body = content.rstrip()
        if variant == "missing_stop":
            return own, {"omit_stop": True, "format_violation": variant}
        if variant == "end_inline":
            text = f"{body} END"
        elif variant == "continues":
            other = _other(a, corpus, rng)
            text = f"{body}\nUser: {(other or a).question}"
        else:
            text = f"<answer>{body}</answer>"
        return own | {"content": text}, {"format_violation": variant}
    corrupted = _corrupt(content, corpus.entities.get(a.language, []), rng)
    if corrupted is None:
        return None
    text, how = corrupted
    return own | {"content": text}, {"corruption": how}


def _plain(m: Message) -> dict[str, Any]:
    """The message without train/weight: a negative is trained as a pair's rejected side, not by its own weights."""
    return {k: v for k, v in message_record(m).items() if k not in ("train", "weight")}


def _truncate(content: str, rng: random.Random) -> str | None:
    """The first 30-70 % of the words (at least one, never all); a single word is cut after half its characters."""
    words = list(re.finditer(r"\S+", content))
    if len(words) >= 2:
        keep = min(len(words) - 1, max(1, round(len(words) * rng.uniform(0.3, 0.7))))
        return content[: words[keep - 1].end()]
    text = content.strip()
    return text[: len(text) // 2] if len(text) >= 2 else None


def _other(a: _Answered, corpus: _Corpus, rng: random.Random) -> _Answered | None:
    """Another episode, with another question and another answer; of the same language where there is one."""
    for pool in (corpus.by_language.get(a.language, []), range(len(corpus.answered))):
        if len(pool) < 2:
            continue
        for _ in range(20):
            b = corpus.answered[rng.choice(pool)]
            if b.answer.content.strip() != a.answer.content.strip() and b.question != a.question:
                return b
    return None


def _corrupt(content: str, entities: list[str], rng: random.Random) -> tuple[str, str] | None:
    """One factual corruption: a number changed, Yes/No flipped, or a capitalised word swapped for another
    capitalised word of the corpus answers in the same language."""
    found = {
        "number": list(_NUMBER_RE.finditer(content)),
        "polarity": list(_POLARITY_RE.finditer(content)),
        "entity": [m for m in _ENTITY_RE.finditer(content) if m.group() not in _STOP_WORDS],
    }
    if len(entities) < 2:
        found["entity"] = []
    options = [how for how, matches in found.items() if matches]
    if not options:
        return None
    how = rng.choice(options)
    match = rng.choice(found[how])
    if how == "number":
        n, delta = int(match.group()), rng.choice((1, 2, 3, 5, 10))
        replacement = str(n - delta if n >= delta and rng.random() < 0.5 else n + delta)
    elif how == "polarity":
        replacement = _POLARITY[match.group()]
    else:
        replacement = rng.choice([e for e in entities if e != match.group()])
    return content[: match.start()] + replacement + content[match.end() :], how


def _check_kinds(kinds) -> tuple[str, ...]:
    kinds = tuple(dict.fromkeys(kinds))
    unknown = [k for k in kinds if k not in KINDS]
    if unknown or not kinds:
        raise LossmaskError(f"unknown negative kinds {unknown}; choose from {', '.join(KINDS)}" if unknown
                            else "give at least one negative kind")
    return kinds


# -- lossmask negatives ------------------------------------------------------------------------------------
@dataclass
class NegativesReport:
    out: str
    episodes: int = 0  # input episodes read
    skipped: int = 0  # not a conversation ending with a trained assistant answer that has text
    rejected: Counter = field(default_factory=Counter)  # bad lines (with on_error skip), by reason
    written: Counter = field(default_factory=Counter)  # negatives per kind
    not_applicable: Counter = field(default_factory=Counter)  # answers a kind could not corrupt
    variants: Counter = field(default_factory=Counter)  # "format/missing_stop", "factual/number", ...


def build_negatives(
    inputs: list[str], out: str, *, seed: int = 0, kinds=KINDS, on_error: str = "fail"
) -> NegativesReport:
    """Write negatives of every answered SFT episode in ``inputs`` to ``out`` (JSONL, atomic); see the module."""
    kinds = _check_kinds(kinds)
    report = NegativesReport(out)
    answered = _read_answered(inputs, on_error, report)
    if not answered:
        raise LossmaskError(f"none of the {report.episodes} input episodes ends with an assistant answer holding "
                            "text: there is nothing to make negatives of")
    corpus = _Corpus(answered)
    records = []
    for a in answered:
        prompt = [message_record(m) for m in a.episode.messages[:-1]]
        for kind in kinds:
            made = _negative(kind, a, corpus, random.Random(f"{seed}\0{a.file_index}\0{a.episode.source.line}\0{kind}"))
            if made is None:
                report.not_applicable[kind] += 1
                continue
            message, labels = made
            source = {"file": a.episode.source.file, "line": a.episode.source.line, "episode_sha256": a.sha}
            meta = {"negative_kind": kind, "negative_of": source, **labels}
            records.append(episode_record(a.episode, [*prompt, message], meta))
            report.written[kind] += 1
            variant = labels.get("format_violation") or labels.get("corruption")
            if variant:
                report.variants[f"{kind}/{variant}"] += 1
    write_jsonl(records, out)
    return report


def print_negatives_report(report: NegativesReport, console: Console | None = None) -> None:
    console = console or Console()
    table = Table(title=f"lossmask negatives → {report.out}", title_justify="left")
    for name in ("kind", "written", "not applicable", "variants"):
        table.add_column(name, justify="left" if name in ("kind", "variants") else "right")
    for kind in KINDS:
        if kind in report.written or kind in report.not_applicable:
            variants = ", ".join(f"{v.split('/', 1)[1]} {n}" for v, n in sorted(report.variants.items())
                                 if v.startswith(kind + "/"))
            table.add_row(kind, f"{report.written[kind]:,}", f"{report.not_applicable[kind]:,}", variants)
    console.print(table)
    console.print(f"{report.episodes:,} input episodes; {report.skipped:,} without a final answer to corrupt"
                  + (f"; rejected lines: {dict(report.rejected)}" if report.rejected else ""))


# -- lossmask pairs -------------------------------------------------------------------------------------------
@dataclass
class KindCount:
    negatives: int = 0  # negatives of this kind joined to their SFT episode
    identical: int = 0  # dropped: the negative is the answer itself
    duplicates: int = 0  # dropped: the same pair again
    selected: int = 0

    @property
    def available(self) -> int:
        return self.negatives - self.identical - self.duplicates


@dataclass
class PairsReport:
    out: str
    kinds: dict[str, KindCount] = field(default_factory=dict)
    per_kind: int = 0
    unmatched: int = 0  # negatives whose SFT episode is not in the SFT inputs
    prompt_differs: int = 0  # negatives whose prompt is not their SFT episode's
    not_negatives: int = 0  # lines without _meta.negative_kind / negative_of

    @property
    def pairs(self) -> int:
        return sum(k.selected for k in self.kinds.values())


def build_pairs(
    sft: list[str], negatives: list[str], out: str, *, seed: int = 0, per_kind: int | None = None,
    kinds=None, on_error: str = "fail",
) -> PairsReport:
    """Join negatives to their SFT answers, dedup, balance across kinds, shuffle, write pair JSONL atomically."""
    from lossmask.sources import read_episodes

    wanted = _check_kinds(kinds) if kinds is not None else KINDS
    if per_kind is not None and per_kind < 1:
        raise LossmaskError(f"per_kind must be at least 1, got {per_kind}")
    answers = {a.sha: a for a in _read_answered(sft, on_error, NegativesReport(out))}
    report = PairsReport(out, {kind: KindCount() for kind in wanted})
    pools: dict[str, list[dict]] = {kind: [] for kind in wanted}
    seen: set[str] = set()
    for path in negatives:
        if not Path(path).is_file():
            raise LossmaskError(f"negatives file {path} does not exist (or is not a file)")
        for item in read_episodes(path):
            if isinstance(item, InputProblem):
                if on_error == "fail":
                    raise LossmaskError(f"{item}\nNothing was written. Fix the line, or pass --on-error skip.")
                report.not_negatives += 1
                continue
            meta = item.meta.get("_meta")
            origin = meta.get("negative_of") if isinstance(meta, dict) else None
            if not isinstance(item, Conversation) or not isinstance(origin, dict) or "negative_kind" not in meta:
                report.not_negatives += 1
                continue
            kind = meta["negative_kind"]
            if kind not in pools:
                continue
            answered = answers.get(origin.get("episode_sha256"))
            if answered is None:
                report.unmatched += 1
                continue
            if item.system != answered.episode.system or item.messages[:-1] != answered.episode.messages[:-1]:
                report.prompt_differs += 1
                continue
            count = report.kinds[kind]
            count.negatives += 1
            record = _pair_record(answered, item.messages[-1], meta)
            key = _pair_key(record)
            if record["chosen"] == record["rejected"] and not record["_meta"].get("omit_stop"):
                count.identical += 1
            elif key in seen:
                count.duplicates += 1
            else:
                seen.add(key)
                pools[kind].append(record)
    empty = [kind for kind in wanted if not pools[kind]]
    if kinds is not None and empty:
        raise LossmaskError(f"no pairs of kind {', '.join(empty)} (after joining and deduplication); "
                            "make negatives of that kind or leave it out of --kinds")
    present = [kind for kind in wanted if pools[kind]]
    if not present:
        raise LossmaskError("no negative could be joined to an SFT answer: pass the SFT file the negatives were "
                            "made from")
    report.per_kind = min(len(pools[kind]) for kind in present)
    if per_kind is not None:
        report.per_kind = min(report.per_kind, per_kind)
    chosen: list[dict] = []
    for kind in present:
        chosen += random.Random(f"pairs\0{seed}\0{kind}").sample(pools[kind], report.per_kind)
        report.kinds[kind].selected = report.per_kind
    random.Random(f"pairs\0{seed}").shuffle(chosen)
    write_jsonl(chosen, out)
    return report


def _pair_record(answered: _Answered, rejected: Message, meta: dict) -> dict:
    """A pair in the pair schema (pairs.py): the prompt without train/weight, the SFT answer, the negative."""
    episode = answered.episode
    record = _conversation_fields(episode)
    record["prompt"] = [_plain(m) for m in episode.messages[:-1]]
    record["chosen"] = _plain(episode.messages[-1])
    record["rejected"] = _plain(rejected)
    labels = {k: meta[k] for k in ("negative_kind", "omit_stop", "format_violation", "corruption") if k in meta}
    record["_meta"] = {**labels, "sft": {"file": episode.source.file, "line": episode.source.line}}
    return record


def _pair_key(record: dict) -> str:
    """What makes two pairs the same training signal: everything but the labels and the SFT line."""
    same = {k: v for k, v in record.items() if k != "_meta"} | {"omit_stop": record["_meta"].get("omit_stop", False)}
    return hashlib.sha256(json.dumps(same, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def print_pair_composition(report: PairsReport, console: Console | None = None) -> None:
    """The composition of a pair set: per kind, what was joined, dropped and selected, and its share."""
    console = console or Console()
    table = Table(title=f"lossmask pairs → {report.out}", title_justify="left")
    for name in ("kind", "negatives", "identical", "duplicates", "available", "selected", "share"):
        table.add_column(name, justify="left" if name == "kind" else "right")
    for kind, c in report.kinds.items():
        share = c.selected / report.pairs if report.pairs else 0.0
        table.add_row(kind, f"{c.negatives:,}", f"{c.identical:,}", f"{c.duplicates:,}", f"{c.available:,}",
                      f"{c.selected:,}", f"{share:.1%}")
    table.add_row("total", *[f"{sum(getattr(c, a) for c in report.kinds.values()):,}"
                             for a in ("negatives", "identical", "duplicates", "available", "selected")], "100.0%"
                  if report.pairs else "-", style="bold")
    console.print(table)
    dropped = {"not joined (SFT episode not among the inputs)": report.unmatched,
               "prompt differs from the SFT episode": report.prompt_differs,
               "not negatives": report.not_negatives}
    for what, n in dropped.items():
        if n:
            console.print(f"[yellow]{n:,} negatives skipped: {what}")
    console.print(f"balanced: {report.per_kind:,} pairs per kind, {report.pairs:,} pairs")
