"""Renderers: one per format, all producing text + labelled character spans (see base.py)."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from lossmask.errors import LossmaskError
from lossmask.render.base import Label, Rendered, Renderer, Span
from lossmask.tokenizer import TokenizerInfo

FORMATS = ("chat-template", "mypt", "instruction", "text")


@dataclass(frozen=True)
class RenderOptions:
    """Everything that chooses and configures a renderer (recorded in dataset_metadata.json)."""

    format: str | None = None  # None: chat-template when the tokenizer has one
    history: str = "auto"
    stop_tokens: tuple[str, ...] = ()
    template_kwargs: dict[str, Any] = field(default_factory=dict)
    chat_template: str | None = None  # template text overriding the tokenizer's own
    response_marker: str | None = None
    end_marker: str | None = None
    weighted_mask: bool = False
    weight_profile: dict[str, float] | None = None

    def to_dict(self) -> dict:
        d = asdict(self)
        d["stop_tokens"] = list(self.stop_tokens)
        if self.chat_template is not None:
            import hashlib

            d["chat_template"] = "sha256:" + hashlib.sha256(self.chat_template.encode()).hexdigest()
        return d


class TextRenderer:
    """``--format text``: raw-text episodes only (text with a response marker, pairs, replay)."""

    name = "text"

    def __init__(self, info: TokenizerInfo, response_marker: str | None, end_marker: str | None):
        self.info = info
        self.response_marker = response_marker
        self.end_marker = end_marker
        self.stop_strings = tuple(s for s in (end_marker, info.eos) if s)

    def render(self, episode) -> list[Rendered]:
        from lossmask.episode import Conversation
        from lossmask.errors import EpisodeError
        from lossmask.render.text import render_text_episode

        if isinstance(episode, Conversation):
            raise EpisodeError(
                "conversation_in_text_format",
                "--format text renders raw text only, but this line is a conversation",
                hint="use --format chat-template, mypt or instruction for conversations",
            )
        return render_text_episode(episode, self.info, self.response_marker, self.end_marker)


def make_renderer(tokenizer, info: TokenizerInfo, options: RenderOptions) -> Renderer:
    """The renderer for ``options.format`` (chat-template by default when the tokenizer ships one)."""
    fmt = options.format
    if fmt is None:
        if options.chat_template is None and not getattr(tokenizer, "chat_template", None):
            raise LossmaskError(
                f"tokenizer {tokenizer.name_or_path!r} has no chat template; choose --format "
                "mypt, instruction or text, or pass --chat-template FILE"
            )
        fmt = "chat-template"
    if fmt == "chat-template":
        from lossmask.render.chat_template import ChatTemplateRenderer

        return ChatTemplateRenderer(
            tokenizer, info, history=options.history, stop_strings=options.stop_tokens,
            template_kwargs=options.template_kwargs, chat_template=options.chat_template,
            response_marker=options.response_marker,
        )
    if fmt == "mypt":
        from lossmask.render.mypt import MyptRenderer

        return MyptRenderer(
            info, weighted=options.weighted_mask, weight_profile=options.weight_profile,
            response_marker=options.response_marker, end_marker=options.end_marker,
        )
    if fmt == "instruction":
        from lossmask.render.instruction import InstructionRenderer

        return InstructionRenderer(info, response_marker=options.response_marker)
    if fmt == "text":
        return TextRenderer(info, options.response_marker, options.end_marker)
    raise LossmaskError(f"unknown --format {fmt!r}; choose one of {', '.join(FORMATS)}")


__all__ = ["FORMATS", "Label", "Rendered", "RenderOptions", "Renderer", "Span", "make_renderer"]
