"""Any Hugging Face chat template, exactly as shipped, with exact assistant spans and no per-model code.

What an assistant turn trains is defined by inference: the model is given the conversation so far
rendered with ``add_generation_prompt=True`` and has to generate everything the template writes next,
up to and including the turn's stop token (``<|im_end|>``, ``<|eot_id|>``, ``<end_of_turn>``, ...).
The role header belongs to the prompt; the glue after the stop token (the ``\\n`` after ``<|im_end|>``)
is never generated, so it is never trained.

How spans are found without re-rendering every prefix (which is quadratic in turns):

1. The generation prompt header ``H`` is learnt once: ``render([u], gen=True)`` minus ``render([u])``.
2. Each assistant turn is rendered once as the *final* turn of a two-message conversation
   ``[u, a]``; ``render([u, a])`` minus ``render([u], gen=True)`` is what the model generates for it at
   inference: content as the template writes it (trimmed, with reasoning or tool calls), the stop token,
   then glue. The trained text is that, cut after the last stop token.
3. The whole conversation is rendered once; each turn's ``H + trained`` is found in order.

If a turn's inference form does not appear in the full render, the template renders history turns
differently from the final turn (Qwen3 drops the reasoning of earlier turns). Training those turns as
rendered would teach a format the model never produces at inference, so the ``history`` policy decides:

- ``auto`` (default): one example per conversation when every turn renders as at inference; otherwise
  split it, one example per assistant turn, each the exact prefix rendered as at inference.
- ``split``: always one example per assistant turn (exact prefix renders; cost grows with the output).
- ``last``: train only the final assistant turn of each conversation.
- ``as-rendered``: train every turn as the full render writes it (history differences included).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from lossmask.episode import Conversation, Episode, Message
from lossmask.errors import EpisodeError, LossmaskError
from lossmask.render.base import Label, Rendered, Span
from lossmask.render.text import render_text_episode
from lossmask.tokenizer import TokenizerInfo

HISTORY_POLICIES = ("auto", "split", "last", "as-rendered")
_DUMMY_USER = {"role": "user", "content": "x"}


@dataclass
class _Turn:
    """One assistant turn of a conversation, as template messages, with its loss weight."""

    index: int  # position in the template message list
    weight: float


@dataclass
class _Chat:
    messages: list[dict[str, Any]]
    turns: list[_Turn]
    labels: list[tuple[int, Label, str]] = field(default_factory=list)  # (msg index, label, text) to locate


def to_template_messages(conv: Conversation) -> _Chat:
    """Map a Conversation to OpenAI-style messages, the shape chat templates read.

    - ``system`` becomes a leading system message.
    - A user ``context`` is written before the question: ``context + "\\n\\n" + content``.
    - An assistant message and the ``assistant_toolcall`` messages right after it form one template message
      (``content``, ``reasoning_content`` from ``think``, ``tool_calls``); ``cite`` is appended to the
      content after a blank line, since templates have no field for it. The turn's weight is the weight of
      its first message.
    - An assistant-side ``context`` has no place in a chat template: it is an error to use it here.
    - ``toolresult`` becomes a ``tool`` message with ``name``.
    """
    out: list[dict[str, Any]] = []
    turns: list[_Turn] = []
    labels: list[tuple[int, Label, str]] = []
    if conv.system is not None:
        labels.append((len(out), Label.SYSTEM, conv.system))
        out.append({"role": "system", "content": conv.system})
    msgs = conv.messages
    i = 0
    while i < len(msgs):
        m = msgs[i]
        if m.role == "user":
            content = m.content if m.context is None else f"{m.context}\n\n{m.content}"
            if m.context is not None:
                labels.append((len(out), Label.CONTEXT, m.context))
            labels.append((len(out), Label.USER, m.content))
            out.append({"role": "user", "content": content})
            i += 1
        elif m.role == "toolresult":
            labels.append((len(out), Label.TOOLRESULT, m.content))
            out.append({"role": "tool", "name": m.name, "content": m.content})
            i += 1
        else:
            first = m
            msg: dict[str, Any] = {"role": "assistant", "content": ""}
            if m.role == "assistant":
                if m.context is not None:
                    raise EpisodeError(
                        "unsupported_field",
                        "an assistant 'context' cannot be expressed in a chat template",
                        field=f"messages[{i}].context",
                        hint="move the context into the user message, or use --format mypt",
                    )
                content = m.content if m.cite is None else f"{m.content}\n\n{m.cite}"
                msg["content"] = content
                if m.think is not None:  # both names templates read reasoning under, as transformers does
                    msg["reasoning_content"] = msg["thinking"] = m.think
                i += 1
            calls = []
            while i < len(msgs) and msgs[i].role == "assistant_toolcall":
                calls.append(_tool_call(msgs[i]))
                i += 1
            if calls:
                msg["tool_calls"] = calls
            turns.append(_Turn(len(out), first.loss_weight))
            out.append(msg)
    return _Chat(out, turns, labels)


def _tool_call(m: Message) -> dict[str, Any]:
    return {"type": "function", "function": {"name": m.name, "arguments": m.arguments or {}}}


class ChatTemplateRenderer:
    """Renders conversations with a tokenizer's own Jinja chat template (sandboxed, as transformers does)."""

    name = "chat-template"

    def __init__(
        self,
        tokenizer,
        info: TokenizerInfo,
        *,
        history: str = "auto",
        stop_strings: tuple[str, ...] = (),
        template_kwargs: dict[str, Any] | None = None,
        chat_template: str | None = None,
        response_marker: str | None = None,
    ):
        template = chat_template or tokenizer.chat_template
        if isinstance(template, dict):  # tokenizers with several named templates
            template = template.get("default") or next(iter(template.values()))
        if not template:
            raise LossmaskError(
                f"tokenizer {tokenizer.name_or_path!r} has no chat template: pass --chat-template FILE, "
                "or choose --format mypt / instruction / text"
            )
        if history not in HISTORY_POLICIES:
            raise LossmaskError(f"--history must be one of {HISTORY_POLICIES}, got {history!r}")
        from jinja2 import TemplateError
        from transformers.utils.chat_template_utils import _compile_jinja_template

        self.template = template
        try:
            self._compiled = _compile_jinja_template(template)
        except TemplateError as exc:  # a template from elsewhere may not even compile: name its line
            line = getattr(exc, "lineno", None)
            origin = "given with --chat-template" if chat_template else f"of the tokenizer {tokenizer.name_or_path!r}"
            raise LossmaskError(
                f"the chat template {origin} does not compile"
                + (f" (template line {line})" if line else "")
                + f": {exc.message or exc}; fix the template or pass --chat-template FILE"
            ) from None
        self.info = info
        self.history = history
        self.response_marker = response_marker
        self.kwargs = {
            "bos_token": tokenizer.bos_token or "",
            "eos_token": tokenizer.eos_token or "",
            "pad_token": tokenizer.pad_token or "",
            "unk_token": tokenizer.unk_token or "",
            **(template_kwargs or {}),
        }
        stops = tuple(dict.fromkeys(s for s in (*stop_strings, tokenizer.eos_token) if s))
        self.stop_candidates = stops
        self.stop_strings = stops  # what validate/generation treat as stops; extended as turns are seen
        self._headers: dict[str, tuple[str, str]] = {}

    # -- rendering -------------------------------------------------------------------------------
    def _render(self, messages: list[dict], tools, add_generation_prompt: bool = False) -> str:
        """Render with transformers' compiled, sandboxed template (compiled once, cached by transformers).

        Messages are built by ``to_template_messages`` from parsed JSON, so they are already the plain
        data ``apply_chat_template`` would convert them to; the compiled template is called directly.
        """
        try:
            return self._compiled.render(
                messages=messages,
                tools=list(tools) if tools else None,
                documents=None,
                add_generation_prompt=add_generation_prompt,
                **self.kwargs,
            )
        except Exception as exc:  # a template may raise anything; the user needs its own message
            raise EpisodeError(
                "template_error",
                f"the chat template raised: {exc}",
                hint="the conversation breaks a rule of this template (e.g. roles must alternate); "
                "fix the conversation or choose another --format",
            ) from exc

    def _generation_prompt(self, tools) -> tuple[str, str]:
        """(prompt with generation header for the dummy user, the header alone), cached per tool set."""
        key = json.dumps(tools, sort_keys=True) if tools else ""
        if key not in self._headers:
            plain = self._render([_DUMMY_USER], tools)
            prompt = self._render([_DUMMY_USER], tools, add_generation_prompt=True)
            header = prompt[len(plain):] if prompt.startswith(plain) else ""
            self._headers[key] = (prompt, header)
        return self._headers[key]

    def _split_stop(self, generated: str) -> tuple[str, str]:
        """Cut a turn's generated text after its stop token: (trained text, stop string)."""
        best = -1
        stop = ""
        for s in self.stop_candidates:
            at = generated.rfind(s)
            if at >= 0 and at + len(s) > best:
                best, stop = at + len(s), s
        if best < 0:
            for s in self.info.special_tokens:
                at = generated.rfind(s)
                if at >= 0 and at + len(s) > best:
                    best, stop = at + len(s), s
        if best < 0:
            raise EpisodeError(
                "no_stop_token",
                f"the chat template writes no stop token after the assistant turn ({generated[-40:]!r}); "
                f"looked for {list(self.stop_candidates)} and the tokenizer's special tokens",
                hint="pass --stop-token STRING naming the text that ends an assistant turn",
            )
        return generated[:best], stop

    def _inference_form(self, message: dict, tools) -> tuple[str, str]:
        """What the model generates for this assistant message at inference: (trained text, stop)."""
        prompt, _ = self._generation_prompt(tools)
        full = self._render([_DUMMY_USER, message], tools)
        if not full.startswith(prompt):
            raise _NotPrefixStable()
        return self._split_stop(full[len(prompt):])

    # -- spans -----------------------------------------------------------------------------------
    def render(self, episode: Episode) -> list[Rendered]:
        if not isinstance(episode, Conversation):
            return render_text_episode(episode, self.info, self.response_marker)
        chat = to_template_messages(episode)
        if not chat.turns:
            raise EpisodeError("no_assistant", "the conversation has no assistant turn to train")
        tools = episode.tools
        if self.history == "split":
            return self._render_split(episode, chat, tools, chat.turns)
        if self.history == "last":
            return self._render_split(episode, chat, tools, chat.turns[-1:])
        try:
            return [self._render_whole(episode, chat, tools)]
        except _HistoryDiffers as diff:
            if self.history == "as-rendered":
                raise EpisodeError(
                    "history_differs",
                    f"assistant turn {diff.turn + 1} does not appear in the full render as it would be "
                    "generated at inference",
                    hint="use --history auto (split) or last",
                ) from None
            rendered = self._render_split(episode, chat, tools, chat.turns)
            for r in rendered:
                r.notes.append("history_split")
            return rendered
        except _NotPrefixStable:
            return self._render_split(episode, chat, tools, chat.turns)

    def _render_whole(self, episode: Conversation, chat: _Chat, tools) -> Rendered:
        text = self._render(chat.messages, tools)
        _, header = self._generation_prompt(tools)
        spans: list[Span] = []
        turn_ends: list[int] = []
        cursor = 0
        located: dict[int, tuple[int, int]] = {}
        notes: list[str] = []
        prompts = iter(chat.labels)
        prompt = next(prompts, None)
        for n, turn in enumerate(chat.turns):
            # a turn starts after the text of the messages before it: a copy of it inside user content is not it
            while prompt is not None and prompt[0] < turn.index:
                cursor = _after_piece(text, prompt[2], cursor)
                prompt = next(prompts, None)
            message = chat.messages[turn.index]
            trained, stop = self._inference_form(message, tools)
            self._note_stop(stop)
            notes.extend(_dropped_parts(message, trained))
            at = text.find(header + trained, cursor)
            if at < 0:
                if self.history == "as-rendered":
                    at = self._find_as_rendered(text, header, trained, stop, cursor)
                    if at < 0:
                        raise _HistoryDiffers(n)
                    trained = text[at + len(header): text.index(stop, at + len(header)) + len(stop)]
                else:
                    raise _HistoryDiffers(n)
            start = at + len(header)
            end = start + len(trained)
            located[turn.index] = (start, end)
            if turn.weight > 0:
                spans.extend(_turn_spans(start, end, stop, turn.weight))
                turn_ends.append(end)
            cursor = end
        spans.extend(_locate_prompt_labels(text, chat, located))
        spans.sort(key=lambda s: s.start)
        return Rendered(text, spans, episode.source, turn_ends, sorted(set(notes)))

    @staticmethod
    def _find_as_rendered(text: str, header: str, trained: str, stop: str, cursor: int) -> int:
        """For ``as-rendered``: the next header whose turn ends with the stop token."""
        at = text.find(header, cursor) if header else cursor
        return at if at >= 0 and text.find(stop, at + len(header)) >= 0 else -1

    def _render_split(self, episode: Conversation, chat: _Chat, tools, turns: list[_Turn]) -> list[Rendered]:
        """One example per assistant turn, each exactly as at inference: prompt render, then the turn."""
        out = []
        for turn in turns:
            if turn.weight <= 0:
                continue
            history = chat.messages[: turn.index]
            prompt = self._render(history, tools, add_generation_prompt=True)
            full = self._render(chat.messages[: turn.index + 1], tools)
            if not full.startswith(prompt):
                raise EpisodeError(
                    "template_not_prefix_stable",
                    "the chat template renders the conversation so far differently once the assistant "
                    "turn is added, so the turn's start cannot be located exactly",
                    field=f"messages[{turn.index}]",
                    hint="report the template; use --format text with a --response-marker instead",
                )
            trained, stop = self._split_stop(full[len(prompt):])
            self._note_stop(stop)
            notes = _dropped_parts(chat.messages[turn.index], trained)
            start, end = len(prompt), len(prompt) + len(trained)
            sub = _Chat(chat.messages[: turn.index + 1], [turn], [lb for lb in chat.labels if lb[0] < turn.index])
            spans = _turn_spans(start, end, stop, turn.weight)
            spans.extend(_locate_prompt_labels(full, sub, {turn.index: (start, end)}))
            spans.sort(key=lambda s: s.start)
            out.append(Rendered(full, spans, episode.source, [end], notes))
        if not out:
            raise EpisodeError("zero_trained_tokens", "every assistant turn is marked train: false or weight 0")
        return out

    def _note_stop(self, stop: str) -> None:
        if stop not in self.stop_strings:
            self.stop_strings = (*self.stop_strings, stop)


class _HistoryDiffers(Exception):
    def __init__(self, turn: int):
        self.turn = turn


class _NotPrefixStable(Exception):
    pass


def _dropped_parts(message: dict, trained: str) -> list[str]:
    """Notes for what the template silently leaves out of a turn: the model would never learn to write it."""
    notes = []
    reasoning = (message.get("reasoning_content") or "").strip()
    if reasoning and reasoning not in trained:
        notes.append("template_drops_reasoning")
    for call in message.get("tool_calls") or ():
        if call["function"]["name"] not in trained:
            notes.append("template_drops_tool_calls")
            break
    return notes


def _after_piece(text: str, piece: str, cursor: int) -> int:
    """The end of the first copy of ``piece`` (as written, or trimmed) at or after ``cursor``; else ``cursor``."""
    for candidate in (piece, piece.strip()) if piece.strip() else ():
        at = text.find(candidate, cursor)
        if at >= 0:
            return at + len(candidate)
    return cursor


def _turn_spans(start: int, end: int, stop: str, weight: float) -> list[Span]:
    stop_at = end - len(stop)
    spans = []
    if stop_at > start:
        spans.append(Span(start, stop_at, Label.ASSISTANT, weight))
    spans.append(Span(stop_at, end, Label.STOP, weight))
    return spans


def _locate_prompt_labels(text: str, chat: _Chat, located: dict[int, tuple[int, int]]) -> list[Span]:
    """Label system, user, context and tool-result text where it appears verbatim (or trimmed).

    Labels only serve validation and display; text a template rewrites stays TEMPLATE (weight 0 either way).
    Labels and located turns are both in message order, so one forward walk finds them all.
    """
    spans: list[Span] = []
    turns = sorted(located.items())
    t = 0
    cursor = 0
    for index, label, piece in chat.labels:
        while t < len(turns) and turns[t][0] < index:
            cursor = max(cursor, turns[t][1][1])
            t += 1
        limit = turns[t][1][0] if t < len(turns) else len(text)
        if not piece.strip():
            continue
        for candidate in (piece, piece.strip()):
            at = text.find(candidate, cursor, limit)
            if at >= 0:
                spans.append(Span(at, at + len(candidate), label, 0.0))
                cursor = at + len(candidate)
                break
    return spans
