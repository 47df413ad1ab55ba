"""A plain-text instruction format for models without a chat template (e.g. base SentencePiece models).

Layout (defaults: ``instruction="Instruction:"``, ``response="Response:"``, ``end="END"``,
``separator="\\n"``), one block per message in order::

    [BOS][{system}\\n]
    Instruction: [{context}\\n]{user}\\n        <- per user message
    Response: {assistant}\\nEND\\n              <- per assistant message

Loss: the assistant's text is trained from right after ``Response:``, so the space in front of the
content is trained with it: BPE and SentencePiece tokenizers glue that space to the first word, and a
prompt at inference must end with ``Response:`` (no trailing space) to match. ``\\nEND`` is trained as
``STOP`` (the model has to write the newline before END too); the newline after END, the markers, the
system line, the instruction and its context are not. Per-message ``train``/``weight``
(``Message.loss_weight``) give the weight of both the content and its ``\\nEND``.

The runtime stop string is ``\\nEND`` rather than ``END`` so that words such as "WEEKEND" do not stop
generation; assistant content containing ``\\nEND`` is rejected (``stop_string_in_content``) because
generation would stop there.

The format has no place for reasoning, citations, assistant-side context or tools: messages with
``think``/``cite``/assistant ``context`` and tool-call or tool-result messages raise
``EpisodeError("unsupported_message")`` rather than being dropped silently (use the mypt format or a
chat template). Conversation ``tools`` schemas are not rendered (note ``tools_not_rendered``).

Episodes that are not conversations go to ``render_text_episode`` with response marker
``"\\nResponse:"`` and end marker ``"\\nEND"`` unless another response marker is given.
"""
from __future__ import annotations

from lossmask.episode import Conversation, Episode, Message
from lossmask.errors import EpisodeError
from lossmask.render.base import Label, Rendered
from lossmask.render.text import TextBuilder, render_text_episode
from lossmask.tokenizer import TokenizerInfo

_HINT = "use --format mypt or a chat template that supports reasoning and tools"


class InstructionRenderer:
    """Renders episodes in the instruction/response/END text format (see the module docstring)."""

    name = "instruction"

    def __init__(
        self,
        info: TokenizerInfo,
        instruction: str = "Instruction:",
        response: str = "Response:",
        end: str = "END",
        separator: str = "\n",
        response_marker: str | None = None,
    ):
        self.info = info
        self.instruction = instruction
        self.response = response
        self.end = end
        self.separator = separator
        self.stop = separator + end
        self.stop_strings = (self.stop,)
        self.response_marker = response_marker if response_marker is not None else separator + response

    def render(self, episode: Episode) -> list[Rendered]:
        if not isinstance(episode, Conversation):
            return render_text_episode(episode, self.info, self.response_marker, self.stop)
        out = TextBuilder(self.info.bos)
        if episode.tools:
            out.notes.append("tools_not_rendered")
        if episode.system is not None:
            out.add(episode.system, Label.SYSTEM)
            out.add(self.separator)
        for index, message in enumerate(episode.messages):
            self._check(message, index)
            if message.role == "user":
                out.add(self.instruction + " ")
                if message.context is not None:
                    out.add(message.context, Label.CONTEXT)
                    out.add(self.separator)
                out.add(message.content, Label.USER)
                out.add(self.separator)
            else:
                weight = message.loss_weight
                out.add(self.response)
                out.add(" " + message.content if message.content else "", Label.ASSISTANT, weight)
                out.add(self.stop, Label.STOP, weight)
                if weight > 0:
                    out.end_turn()
                out.add(self.separator)
        return [out.build(episode.source)]

    def _check(self, message: Message, index: int) -> None:
        if message.role in ("assistant_toolcall", "toolresult"):
            raise EpisodeError(
                "unsupported_message",
                f"the instruction format cannot show {message.role} messages",
                field=f"messages[{index}].role",
                hint=_HINT,
            )
        if message.role != "assistant":
            return
        for name in ("think", "cite", "context"):
            if getattr(message, name) is not None:
                raise EpisodeError(
                    "unsupported_message",
                    f"the instruction format has no place for an assistant message's {name!r}",
                    field=f"messages[{index}].{name}",
                    hint=_HINT,
                )
        if self.stop in message.content:
            raise EpisodeError(
                "stop_string_in_content",
                f"assistant content contains the stop string {self.stop!r}; generation would stop there",
                field=f"messages[{index}].content",
                hint=f"remove or rephrase the line starting with {self.end!r}, or choose another end marker",
            )
