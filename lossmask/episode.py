"""Typed episodes: what every input format is parsed into and every renderer reads.

A conversation is a list of messages with a small fixed set of roles; three text-only kinds cover
inputs that are not conversations (prompt/completion pairs, text with a response marker, replay text).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Union

Role = Literal["user", "assistant", "assistant_toolcall", "toolresult"]
ROLES: tuple[str, ...] = ("user", "assistant", "assistant_toolcall", "toolresult")
TRAINED_BY_DEFAULT: frozenset[str] = frozenset({"assistant", "assistant_toolcall"})


@dataclass(frozen=True)
class Source:
    """Where an episode came from: reported in every error and stored per episode."""

    file: str
    line: int


@dataclass(frozen=True)
class Message:
    """One message of a conversation.

    - ``assistant_toolcall`` carries ``name`` and ``arguments`` (a JSON object) and no content.
    - ``toolresult`` carries ``name`` and ``content`` (the tool's output as text).
    - ``context`` on a user message is retrieved text shown with the question (never trained); on an
      assistant message it is text the system injects inside the assistant turn (never trained).
    - ``think`` (reasoning) and ``cite`` (sources) belong to assistant messages and are trained with it.
    - ``train``/``weight`` override the role's default (assistant turns trained with weight 1.0).
    """

    role: Role
    content: str = ""
    name: str | None = None
    arguments: dict[str, Any] | None = None
    context: str | None = None
    think: str | None = None
    cite: str | None = None
    train: bool | None = None
    weight: float | None = None

    @property
    def loss_weight(self) -> float:
        """The weight this message's trained text gets: 0 for untrained roles and ``train: false``."""
        if self.role not in TRAINED_BY_DEFAULT:
            return 0.0
        if self.train is False:
            return 0.0
        return 1.0 if self.weight is None else float(self.weight)


@dataclass(frozen=True)
class Conversation:
    """A chat episode: optional system prompt, messages, optional tool schemas for templates."""

    messages: tuple[Message, ...]
    source: Source
    system: str | None = None
    language: str | None = None
    tools: tuple[dict[str, Any], ...] | None = None
    meta: dict[str, Any] = field(default_factory=dict, compare=False)


@dataclass(frozen=True)
class TextPair:
    """A raw-text prompt and its completion (``prompt``/``completion``, ``input_text``/``full_text``).

    The prompt is never trained; the completion is trained, followed by the tokenizer's EOS.
    """

    prompt: str
    completion: str
    source: Source
    meta: dict[str, Any] = field(default_factory=dict, compare=False)


@dataclass(frozen=True)
class MarkedText:
    """Plain text whose trained part starts after a response marker, found in the characters."""

    text: str
    source: Source
    meta: dict[str, Any] = field(default_factory=dict, compare=False)


@dataclass(frozen=True)
class Replay:
    """Pre-training replay text (``{"_replay": true, "text": ...}``): every token trained."""

    text: str
    source: Source
    meta: dict[str, Any] = field(default_factory=dict, compare=False)


Episode = Union[Conversation, TextPair, MarkedText, Replay]
