"""Episodes that are not conversations (text pairs, marked text, replay), rendered the same by every format.

Policies:

- BOS: written once at the start (untrained glue) when the tokenizer adds BOS by default
  (``TokenizerInfo.bos``), because all text is tokenized with ``add_special_tokens=False``.
- ``Replay``: every character trained (``TEXT``, weight 1). No EOS is appended: replay chunks are often
  slices of longer documents, and an EOS at every chunk edge would teach the model to stop mid-document.
  Its only turn end is the end of the text.
- ``TextPair``: prompt untrained (``PROMPT``), completion trained (``TEXT``), then the tokenizer's EOS
  trained (``STOP``) unless the completion already ends with it. Prompt and completion are joined as
  given: the data owns its whitespace.
- ``MarkedText``: the first occurrence of the response marker in the characters splits the text; the
  marker and everything before it are untrained (``PROMPT``), everything after it is trained
  (``ASSISTANT``). With an ``end_marker``, a text whose trained part ends with it (trailing whitespace
  aside) gets that marker labelled ``STOP`` and the trailing whitespace left untrained, since generation
  stops at the marker; a text without it is trained to its end and gets the note ``no_end_marker``.
"""
from __future__ import annotations

from lossmask.episode import MarkedText, Replay, Source, TextPair
from lossmask.errors import EpisodeError
from lossmask.render.base import Label, Rendered, Span
from lossmask.tokenizer import TokenizerInfo


class TextBuilder:
    """Appends text pieces and records their spans as it goes, so offsets are right by construction.

    A piece with no label is template glue (no span, weight 0); empty pieces leave no span.
    """

    def __init__(self, prefix: str | None = None):
        self._parts: list[str] = []
        self._length = 0
        self.spans: list[Span] = []
        self.turn_ends: list[int] = []
        self.notes: list[str] = []
        if prefix:
            self.add(prefix)

    def add(self, text: str, label: Label | None = None, weight: float = 0.0) -> None:
        if not text:
            return
        if label is not None:
            self.spans.append(Span(self._length, self._length + len(text), label, float(weight)))
        self._parts.append(text)
        self._length += len(text)

    def end_turn(self) -> None:
        """Mark the current end of text as a place a trained turn ends (after its stop)."""
        self.turn_ends.append(self._length)

    def build(self, source: Source) -> Rendered:
        return Rendered("".join(self._parts), list(self.spans), source, list(self.turn_ends), list(self.notes))


def render_text_episode(
    episode: TextPair | MarkedText | Replay,
    info: TokenizerInfo,
    response_marker: str | None,
    end_marker: str | None = None,
) -> list[Rendered]:
    """Render a non-conversation episode as one sequence (see the module docstring for the policies)."""
    out = TextBuilder(info.bos)
    if isinstance(episode, Replay):
        out.add(episode.text, Label.TEXT, 1.0)
        out.end_turn()
    elif isinstance(episode, TextPair):
        _text_pair(out, episode, info.eos)
    elif isinstance(episode, MarkedText):
        _marked_text(out, episode.text, response_marker, end_marker)
    else:
        raise TypeError(f"render_text_episode got {type(episode).__name__}, not a text episode")
    return [out.build(episode.source)]


def _text_pair(out: TextBuilder, pair: TextPair, eos: str | None) -> None:
    out.add(pair.prompt, Label.PROMPT)
    completion = pair.completion
    if eos and completion.endswith(eos):
        completion = completion[: -len(eos)]
    out.add(completion, Label.TEXT, 1.0)
    if eos:
        out.add(eos, Label.STOP, 1.0)
    out.end_turn()


def _marked_text(out: TextBuilder, text: str, marker: str | None, end_marker: str | None) -> None:
    if not marker:
        raise EpisodeError(
            "missing_marker",
            "a text record needs a response marker to know where the trained part starts",
            field="text",
            hint="pass --response-marker with the string that precedes the response, e.g. '\\nResponse:'",
        )
    at = text.find(marker)
    if at < 0:
        raise EpisodeError(
            "missing_marker",
            f"the response marker {marker!r} does not occur in the text",
            field="text",
            hint=f"every text record must contain {marker!r} before its response; fix the record or "
            "pass the right --response-marker",
        )
    split = at + len(marker)
    out.add(text[:split], Label.PROMPT)
    response = text[split:]
    body = response.rstrip()
    if end_marker and body.endswith(end_marker):
        out.add(body[: -len(end_marker)], Label.ASSISTANT, 1.0)
        out.add(end_marker, Label.STOP, 1.0)
        out.end_turn()
        out.add(response[len(body):])
        return
    out.add(response, Label.ASSISTANT, 1.0)
    out.end_turn()
    if end_marker:
        out.notes.append("no_end_marker")
