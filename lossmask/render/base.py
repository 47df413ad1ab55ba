"""What every renderer produces: the full text plus labelled character spans.

Nothing downstream knows which format an episode came from: the mask only sees text and spans.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from enum import IntEnum
from typing import Protocol

from lossmask.episode import Episode, Source


class Label(IntEnum):
    """What a piece of text is; stored per token (uint8) so validate and inspect need no re-rendering."""

    PAD = 0
    TEMPLATE = 1  # headers, separators, glue written by the format itself
    SYSTEM = 2
    USER = 3
    CONTEXT = 4  # retrieved/injected context (user or assistant side), never trained
    ASSISTANT = 5
    THINK = 6
    CITE = 7
    TOOLCALL = 8
    TOOLRESULT = 9
    STOP = 10  # the token(s) that end an assistant turn: <|im_end|>, <|eot_id|>, END, ...
    TEXT = 11  # replay text and raw completions
    PROMPT = 12  # the untrained prompt of a raw text pair


# Labels that must never carry loss: validate checks this on every stored token.
NEVER_TRAINED: frozenset[Label] = frozenset(
    {Label.PAD, Label.SYSTEM, Label.USER, Label.CONTEXT, Label.TOOLRESULT, Label.PROMPT}
)


@dataclass(frozen=True)
class Span:
    """Characters ``text[start:end]`` with a label and a loss weight (0.0 = no loss)."""

    start: int
    end: int
    label: Label
    weight: float = 0.0


@dataclass
class Rendered:
    """One training sequence as text.

    ``spans`` are sorted, non-overlapping; characters outside every span are TEMPLATE with weight 0.
    ``turn_ends`` are character offsets where a trained assistant turn ends (after its stop token): the
    places a ``turn`` truncation may cut. ``trained_text`` lists, per trained span, the text the
    renderer means to train; the mask verifies the tokens decode back to it.
    """

    text: str
    spans: list[Span]
    source: Source
    turn_ends: list[int] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # per-episode observations for the summary

    @property
    def trained_spans(self) -> list[Span]:
        return [s for s in self.spans if s.weight > 0]


class Renderer(Protocol):
    """Turns an episode into one or more Rendered sequences (more than one when a conversation is split)."""

    name: str
    stop_strings: tuple[str, ...]

    def render(self, episode: Episode) -> list[Rendered]: ...
