"""Checks on generated text: the assistant block's structure, and the pattern checks the gates apply to it.

``parse_block`` reads one generated assistant block (the text after ``<myPT_assistant>``) in the order the
myPT renderer writes it: ``[<myPT_think>T</myPT_think>] A [<myPT_cite>R</myPT_cite>]
[<myPT_toolcall>J</myPT_toolcall>]... </myPT_assistant>``, followed by ``<myPT_eot>`` when the block hands
back to the user (no tool call). A block that ends with a tool call ends at ``</myPT_assistant>``: the
runtime stops there and injects the tool result, so whatever follows is not the model's answer and is
ignored. Failure reasons:

- ``no_close``: no ``</myPT_assistant>`` within the budget (the turn never ends);
- ``no_eot``: an answer block closed without ``<myPT_eot>`` right after (the model does not hand back);
- ``not_closed``: ``<myPT_eot>`` without ``</myPT_assistant>`` before it;
- ``unclosed_tag``: a think, cite or tool-call block not closed before the next tag;
- ``misplaced_tag``: a think, cite or tool-call tag out of the renderer's order (a cite before the answer);
- ``runaway``: a tag that belongs to another turn inside the block (``<myPT_user>``, a second
  ``<myPT_assistant>``, ``<myPT_toolresult>``, padding, EOS): bleed-through into the next turn;
- ``after_eot``: text after ``<myPT_eot>``;
- ``empty_answer``: an answer block (no tool call) whose content is blank.

The pattern checks are deliberately simple and named as such in the reports: ``answer_language`` counts
English and German stop words; ``names_docs`` and ``contains_fact`` look for strings. ``check_dual_stream``
checks the ``<think>``/``<proof>``/``<answer>`` layout of dual-stream (Gemma) turns.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import lru_cache

from lossmask.gate.generation import CLOSE, EOT

THINK = ("<myPT_think>", "</myPT_think>")
CITE = ("<myPT_cite>", "</myPT_cite>")
TOOLCALL = ("<myPT_toolcall>", "</myPT_toolcall>")
BLOCK_TAGS = frozenset(THINK + CITE + TOOLCALL)
DUAL_STREAM_TAGS: tuple[str, ...] = ("think", "proof", "answer")

# Stop words unique to one language (words both languages use, like "was", "in", "will", are left out).
_EN_WORDS = frozenset(
    "the and is are of to it that this you with for not be have has on as what which there they from by at or "
    "can your my yes no a do does how".split()
)
_DE_WORDS = frozenset(
    "der die das und ist sind nicht ein eine einen ich du sie es mit zu von den dem des im auf für auch wie wir "
    "ja nein oder aber bei nach wird kann hat dass sich noch nur mein dein gibt".split()
)
_WORD = re.compile(r"[^\W\d_]+", re.UNICODE)


@dataclass(frozen=True)
class Block:
    """What one generated assistant block holds (``calls`` are the raw tool-call texts, in order)."""

    content: str = ""
    think: str | None = None
    cite: str | None = None
    calls: tuple[str, ...] = ()
    text: str = ""  # the block as generated, up to and including its end (or all of it when it never ended)


@dataclass(frozen=True)
class Judged:
    """A block and the reason it fails (None: well formed)."""

    reason: str | None
    block: Block = field(default_factory=Block)


def parse_block(generation: str, specials: set[str] | frozenset[str]) -> Judged:
    """Parse a generated assistant block (see the module docstring); ``specials`` are the special token texts."""
    tags = frozenset(specials) | BLOCK_TAGS | {CLOSE, EOT}
    parser = _Parser(_split(generation, tags), tags)
    reason, think = parser.inner(THINK)
    if reason:
        return Judged(reason, parser.block(think=think))
    content = parser.text()
    reason, cite = parser.inner(CITE)
    if reason:
        return Judged(reason, parser.block(content, think, cite))
    calls: list[str] = []
    while parser.peek() == TOOLCALL[0]:
        reason, body = parser.inner(TOOLCALL)
        calls.append(body or "")
        if reason:
            return Judged(reason, parser.block(content, think, cite, calls))
    nxt = parser.peek()
    if nxt is None:
        return Judged("no_close", parser.block(content, think, cite, calls))
    if nxt != CLOSE:
        reason = "not_closed" if nxt == EOT else "misplaced_tag" if nxt in BLOCK_TAGS else "runaway"
        return Judged(reason, parser.block(content, think, cite, calls))
    parser.take()
    if calls:
        return Judged(None, parser.block(content, think, cite, calls))
    if parser.peek() != EOT:
        return Judged("no_eot", parser.block(content, think, cite))
    parser.take()
    rest = parser.rest()
    block = parser.block(content, think, cite)
    if rest.strip():
        return Judged("after_eot", block)
    if not content.strip():
        return Judged("empty_answer", block)
    return Judged(None, block)


class _Parser:
    """A cursor over the pieces of a generation (tags and the text between them)."""

    def __init__(self, pieces: list[str], tags: frozenset[str]):
        self.pieces, self.tags, self.i = pieces, tags, 0

    def peek(self) -> str | None:
        return self.pieces[self.i] if self.i < len(self.pieces) else None

    def take(self) -> str:
        self.i += 1
        return self.pieces[self.i - 1]

    def text(self) -> str:
        nxt = self.peek()
        return self.take() if nxt is not None and nxt not in self.tags else ""

    def inner(self, tags: tuple[str, str]) -> tuple[str | None, str | None]:
        """(reason, body) of an optional ``open body close`` block; (None, None) when it is absent."""
        if self.peek() != tags[0]:
            return None, None
        self.take()
        body = self.text()
        if self.peek() == tags[1]:
            self.take()
            return None, body
        return ("no_close" if self.peek() is None else "unclosed_tag"), body

    def rest(self) -> str:
        return "".join(self.pieces[self.i :])

    def block(self, content: str = "", think: str | None = None, cite: str | None = None,
              calls: list[str] | None = None) -> Block:
        return Block(content, think, cite, tuple(calls or ()), "".join(self.pieces[: self.i]) or self.rest())


def _split(text: str, tags: frozenset[str]) -> list[str]:
    """The text cut into tags and the (non-empty) text between them."""
    return [p for p in _tag_pattern(tags).split(text) if p]


@lru_cache(maxsize=16)
def _tag_pattern(tags: frozenset[str]) -> re.Pattern:
    alternatives = "|".join(re.escape(t) for t in sorted(tags, key=len, reverse=True))
    return re.compile(f"({alternatives})")


def answer_language(text: str) -> str | None:
    """``en``, ``de`` or None (undecided): a stop-word pattern check, not a language model.

    Counts words found only in the English or only in the German list (plus words with ä, ö, ü or ß for
    German); decides when there are at least two such words and one language has more of them.
    """
    words = [w.lower() for w in _WORD.findall(text)]
    en = sum(w in _EN_WORDS for w in words)
    de = sum(w in _DE_WORDS or any(c in w for c in "äöüß") for w in words)
    if en + de < 2 or en == de:
        return None
    return "en" if en > de else "de"


def names_docs(text: str | None, doc_ids: list[str]) -> bool:
    """Whether ``text`` (a cite block) names every one of ``doc_ids``; no text names nothing."""
    if not text or not text.strip():
        return False
    return all(doc in text for doc in doc_ids)


def normalize(text: str) -> str:
    """Case-folded, with runs of whitespace as one space: how the pattern checks compare text."""
    return " ".join(text.casefold().split())


def contains_fact(text: str, facts: list[str]) -> bool:
    """Whether ``text`` contains one of ``facts`` (case and whitespace ignored): a pattern check."""
    haystack = normalize(text)
    return any(normalize(f) in haystack for f in facts if f.strip())


def check_dual_stream(text: str) -> str | None:
    """The reason a dual-stream turn is malformed, or None.

    ``<think>``, ``<proof>`` and ``<answer>`` must each appear exactly once, opened then closed, in that
    order and without nesting, and the answer must not be blank. Reasons: ``missing_<tag>``,
    ``repeated_<tag>``, ``unclosed_<tag>``, ``out_of_order``, ``empty_answer``.
    """
    end_of_previous = 0
    for tag in DUAL_STREAM_TAGS:
        opening, closing = f"<{tag}>", f"</{tag}>"
        opens, closes = text.count(opening), text.count(closing)
        if opens == 0:
            return f"missing_{tag}"
        if opens > 1 or closes > 1:
            return f"repeated_{tag}"
        start = text.index(opening)
        if closes == 0 or text.index(closing) < start:
            return f"unclosed_{tag}"
        if start < end_of_previous:
            return "out_of_order"
        end = text.index(closing)
        if tag == "answer" and not text[start + len(opening) : end].strip():
            return "empty_answer"
        end_of_previous = end + len(closing)
    return None
