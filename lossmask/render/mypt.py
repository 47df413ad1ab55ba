"""The myPT tag format: conversations written with the 19 myPT special tokens (see ``mypt_tokens``).

Layout, with no newlines between tags (every tag is one special token, so newlines would only add
untrained tokens the runtime never writes)::

    [BOS]<myPT_system>S</myPT_system>
    <myPT_user>[<myPT_user_context>C</myPT_user_context>]Q</myPT_user>
    <myPT_assistant>[<myPT_assistant_context>X</myPT_assistant_context>][<myPT_think>T</myPT_think>]A
        [<myPT_cite>R</myPT_cite>][<myPT_toolcall>{"name": ..., "arguments": {...}}</myPT_toolcall>...]
    </myPT_assistant>[<myPT_eot>]
    <myPT_toolresult>OUT</myPT_toolresult>

- An assistant message directly followed by ``assistant_toolcall`` messages shares one assistant block;
  a tool call with no assistant message before it opens its own block.
- A tool call is ``json.dumps({"name": name, "arguments": arguments}, ensure_ascii=False,
  separators=(", ", ": "))``: ``name`` then ``arguments``, argument keys in their input order.
- ``<myPT_eot>`` follows a block that hands control back to the user (the next message is a user
  message, or the episode ends), never a block that ends with a tool call: the runtime stops at
  ``</myPT_assistant>`` and injects the tool result.
- ``think``/``cite``/``context`` blocks are written when the field is not None (an empty think block
  is kept: it teaches the model to skip reasoning).
- Conversation ``tools`` (schemas) have no slot in this format: they are not rendered and the episode
  gets the note ``tools_not_rendered``; put them in the system prompt if the model must see them.

Loss: everything the model writes inside ``<myPT_assistant>...</myPT_assistant>`` is trained (content,
think, cite and tool-call blocks with their tags, and the closing tag), plus ``<myPT_eot>``. The opening
``<myPT_assistant>``, system, user, contexts and tool results are not. Labels: ``THINK``/``CITE``/
``TOOLCALL`` for those blocks and their tags, ``ASSISTANT`` for content, ``STOP`` for
``</myPT_assistant>`` and ``<myPT_eot>``, ``SYSTEM``/``USER``/``CONTEXT``/``TOOLRESULT`` for injected
text. Tags of untrained blocks (and the opening ``<myPT_assistant>``) are template glue (no span).
Every tag is a span of its own, never merged with the content next to it.

Weights: a trained piece gets ``profile[key] * message.loss_weight`` (so ``train: false`` gives 0 and
``weight`` scales the profile). Unweighted, every profile value is 1.0. ``weighted=True`` uses
``DEFAULT_WEIGHT_PROFILE``; a ``weight_profile`` dict overrides some of its keys (and implies weighted).
The closing tag and ``<myPT_eot>`` take the weight of the block's last message.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

from lossmask.episode import Conversation, Episode, Message
from lossmask.errors import EpisodeError, LossmaskError
from lossmask.render.base import Label, Rendered
from lossmask.render.text import TextBuilder, render_text_episode
from lossmask.tokenizer import TokenizerInfo

DEFAULT_WEIGHT_PROFILE: dict[str, float] = {
    "assistant": 1.0,  # assistant content
    "assistant_close": 2.0,  # </myPT_assistant>
    "eot": 2.0,  # <myPT_eot>
    "think_tags": 1.5,  # <myPT_think> and </myPT_think>
    "think": 1.0,  # text inside the think block
    "cite_tags": 1.5,  # <myPT_cite> and </myPT_cite>
    "cite": 1.0,  # text inside the cite block
    "toolcall_tags": 2.0,  # <myPT_toolcall> and </myPT_toolcall>
    "toolcall": 1.0,  # the tool-call JSON
}
UNIFORM_PROFILE: dict[str, float] = {key: 1.0 for key in DEFAULT_WEIGHT_PROFILE}


def validate_weight_profile(profile: dict, where: str = "weight profile") -> dict[str, float]:
    """Check keys and values of a (partial) profile; return it merged over ``DEFAULT_WEIGHT_PROFILE``."""
    if not isinstance(profile, dict):
        raise LossmaskError(f"{where}: expected a JSON object of key -> weight, got {type(profile).__name__}")
    merged = dict(DEFAULT_WEIGHT_PROFILE)
    for key, value in profile.items():
        if key not in DEFAULT_WEIGHT_PROFILE:
            raise LossmaskError(
                f"{where}: unknown key {key!r}; valid keys are {', '.join(DEFAULT_WEIGHT_PROFILE)} "
                "(system, user, context and tool results are never trained)"
            )
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            raise LossmaskError(f"{where}: {key!r} must be a finite number >= 0, got {value!r}")
        merged[key] = float(value)
    return merged


def load_weight_profile(path: str | Path) -> dict[str, float]:
    """Read a JSON weight profile file (a partial object of profile keys) and validate it."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise LossmaskError(f"cannot read weight profile {path}: {exc}") from exc
    except json.JSONDecodeError as exc:
        raise LossmaskError(f"weight profile {path} is not valid JSON: {exc}") from exc
    return validate_weight_profile(data, where=str(path))


def toolcall_json(message: Message, index: int) -> str:
    """The tool-call text the model learns to write (fixed key order and separators)."""
    if not message.name:
        raise EpisodeError(
            "missing_field",
            "a tool call needs the name of the tool it calls",
            field=f"messages[{index}].name",
            hint='give every assistant_toolcall message a "name"',
        )
    call = {"name": message.name, "arguments": message.arguments or {}}
    return json.dumps(call, ensure_ascii=False, separators=(", ", ": "))


class MyptRenderer:
    """Renders episodes in the myPT tag format (layout and loss rule in the module docstring)."""

    name = "mypt"
    stop_strings = ("</myPT_assistant>", "<myPT_eot>")

    def __init__(
        self,
        info: TokenizerInfo,
        weighted: bool = False,
        weight_profile: dict | None = None,
        response_marker: str | None = None,
        end_marker: str | None = None,
    ):
        self.info = info
        if weight_profile is not None:
            self.profile = validate_weight_profile(weight_profile)
        elif weighted:
            self.profile = dict(DEFAULT_WEIGHT_PROFILE)
        else:
            self.profile = dict(UNIFORM_PROFILE)
        self.response_marker = response_marker
        self.end_marker = end_marker

    def render(self, episode: Episode) -> list[Rendered]:
        if not isinstance(episode, Conversation):
            return render_text_episode(episode, self.info, self.response_marker, self.end_marker)
        out = TextBuilder(self.info.bos)
        if episode.tools:
            out.notes.append("tools_not_rendered")
        if episode.system is not None:
            self._wrap(out, "system", episode.system, Label.SYSTEM)
        messages = episode.messages
        i = 0
        while i < len(messages):
            message = messages[i]
            if message.role == "user":
                out.add("<myPT_user>")
                if message.context is not None:
                    self._wrap(out, "user_context", message.context, Label.CONTEXT)
                out.add(message.content, Label.USER)
                out.add("</myPT_user>")
                i += 1
            elif message.role == "toolresult":
                self._wrap(out, "toolresult", message.content, Label.TOOLRESULT)
                i += 1
            else:
                i = self._assistant_block(out, messages, i)
        return [out.build(episode.source)]

    def _wrap(self, out: TextBuilder, tag: str, text: str, label: Label) -> None:
        """An untrained block: tags are glue, the text carries the label."""
        out.add(f"<myPT_{tag}>")
        out.add(text, label)
        out.add(f"</myPT_{tag}>")

    def _trained_block(self, out: TextBuilder, tag: str, text: str, label: Label, weight: float) -> None:
        tag_weight = weight * self.profile[f"{tag}_tags"]
        out.add(f"<myPT_{tag}>", label, tag_weight)
        out.add(text, label, weight * self.profile[tag])
        out.add(f"</myPT_{tag}>", label, tag_weight)

    def _assistant_block(self, out: TextBuilder, messages: tuple[Message, ...], start: int) -> int:
        """Write one assistant block from ``messages[start]``; return the index after it."""
        out.add("<myPT_assistant>")
        i = start
        last = messages[start]
        if last.role == "assistant":
            w = last.loss_weight
            if last.context is not None:
                self._wrap(out, "assistant_context", last.context, Label.CONTEXT)
            if last.think is not None:
                self._trained_block(out, "think", last.think, Label.THINK, w)
            out.add(last.content, Label.ASSISTANT, w * self.profile["assistant"])
            if last.cite is not None:
                self._trained_block(out, "cite", last.cite, Label.CITE, w)
            i += 1
        while i < len(messages) and messages[i].role == "assistant_toolcall":
            last = messages[i]
            self._trained_block(out, "toolcall", toolcall_json(last, i), Label.TOOLCALL, last.loss_weight)
            i += 1
        w = last.loss_weight
        out.add("</myPT_assistant>", Label.STOP, w * self.profile["assistant_close"])
        hands_back = i == len(messages) or messages[i].role == "user"
        if last.role == "assistant" and hands_back:
            out.add("<myPT_eot>", Label.STOP, w * self.profile["eot"])
        if w > 0:
            out.end_turn()
        return i
