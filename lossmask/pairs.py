"""Preference pairs: the pair schema, and ``prepare --pairs`` on the same render → mask → store path as SFT.

Schema, one pair a JSONL line (other keys, ``_meta`` and ``id`` included, are kept in ``Pair.meta``):

- ``{"prompt": [messages...], "chosen": {assistant message}, "rejected": {assistant message}}`` with the
  optional top-level ``system`` (and ``language``, ``tools``) of SFT episodes. Messages are native or
  openai, read by sources.py with its checks and errors.
- TRL's conversational form: ``chosen``/``rejected`` are lists holding the response's assistant messages.
- TRL's implicit prompt: no ``prompt``; ``chosen``/``rejected`` are whole conversations that differ only in
  their last message, which is the response.
- ``prompt``, ``chosen`` and ``rejected`` all strings: raw text, as ``prompt``/``completion`` (the prompt
  untrained, the response trained and followed by the tokenizer's EOS). Otherwise a string prompt is one
  user message and a string response one assistant message.

Policies:

- The prompt is never trained: assistant messages inside it get weight 0 (one that asks for training with
  ``train``/``weight`` is an error). The response is trained as an assistant turn: what the format writes
  for it (content, reasoning, tool calls) and its stop token.
- Each side is rendered as one whole conversation, prompt + response, through the SAME renderer and Masker
  (never a separate tokenization of the prompt). A pair is kept only when the token ids before the first
  trained token are identical on both sides (same count, same ids); else it is rejected (``prompt_mismatch``).
  Each side must render as exactly one example.
- ``_meta.omit_stop: true`` marks a negative whose rejected response has no stop (a truncated answer, a
  missing END): the rejected side is rendered without the final stop token(s) of its turn and whatever the
  format writes after them (``<|im_end|>\\n``, ``</myPT_assistant><myPT_eot>``, ``\\nEND\\n``, EOS), and
  stored with the truncated flag, which is what lets ``validate`` accept a turn without its stop. The
  chosen side always keeps its stop.
- Storage (store.py): splits ``train.chosen``/``train.rejected`` (and ``val.*``), aligned by index; the
  val split is drawn per pair, so both sides are always in the same split; metadata ``kind: pairs``.
  ``open_dataset(DIR)`` yields ``{"chosen": item, "rejected": item, "source": (file, line)}``.
"""
from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from lossmask.episode import TRAINED_BY_DEFAULT, Conversation, Episode, Source
from lossmask.errors import EpisodeError, InputError, InputProblem, LossmaskError
from lossmask.example import Example
from lossmask.mask import MaskOptions
from lossmask.prepare import (
    Kind, PrepareOptions, PrepareSummary, Result, Worker, prepare_kind, start_result, turn_end_ids,
)
from lossmask.render import RenderOptions
from lossmask.render.base import Label, Rendered
from lossmask.sources import (
    DEFAULT_MAX_LINE_BYTES, detect_format, load_line, open_input, parse_record, read_lines, too_long,
)
from lossmask.store import PAIR_SIDES, PAIRS_KIND

PAIR_KEYS = ("prompt", "chosen", "rejected")
_CONVERSATION_KEYS = ("system", "language", "tools")
_MESSAGE_AT = re.compile(r"^messages\[(\d+)\](.*)$")


@dataclass(frozen=True)
class Pair:
    """A prompt with a preferred and a dispreferred response, each side a whole episode (prompt untrained)."""

    chosen: Episode
    rejected: Episode
    source: Source
    omit_stop: bool = False  # the rejected side is rendered without its stop (see the module docstring)
    meta: dict[str, Any] = field(default_factory=dict, compare=False)


# -- parsing --------------------------------------------------------------------------------------------
def parse_pair(obj: Any, source: Source) -> Pair:
    """One decoded JSON record → Pair; raises InputError naming the field at fault (``chosen[0].content``)."""
    try:
        return _pair(obj, source)
    except EpisodeError as exc:
        raise InputError(exc.at(source.file, source.line)) from None


def is_pair_record(obj: Any) -> bool:
    """Whether a decoded record is a pair (has ``chosen`` and ``rejected``) rather than an episode."""
    return isinstance(obj, dict) and "chosen" in obj and "rejected" in obj


def read_pairs(path: str | Path, max_line_bytes: int = DEFAULT_MAX_LINE_BYTES) -> Iterator[Pair | InputProblem]:
    """Yield, in file order, a Pair or the InputProblem of every non-blank line (``.gz`` read transparently)."""
    name = str(path)
    if name.endswith((".txt", ".txt.gz")):
        yield InputProblem(name, 1, "format_mismatch", "preference pairs are read from JSONL, not plain text",
                           hint='write one {"prompt", "chosen", "rejected"} object a line')
        return
    with open_input(name) as f:
        for lineno, raw, size in read_lines(f, max_line_bytes):
            if raw is None:
                yield too_long(name, lineno, size, max_line_bytes, "line")
            elif not raw.isspace():
                try:
                    yield _pair(load_line(raw), Source(name, lineno))
                except EpisodeError as exc:
                    yield exc.at(name, lineno)


def _pair(obj: Any, source: Source) -> Pair:
    if not isinstance(obj, dict):
        raise EpisodeError("not_object", "line is not a JSON object", hint='write one {"prompt", "chosen", '
                           '"rejected"} object a line')
    for key in ("chosen", "rejected"):
        if obj.get(key) is None:
            raise EpisodeError("missing_field", f"a preference pair needs '{key}'", key,
                               hint='give "prompt", "chosen" and "rejected" (see lossmask/pairs.py)')
    extras = {k: v for k, v in obj.items() if k not in PAIR_KEYS}
    prompt, chosen, rejected = obj.get("prompt"), obj["chosen"], obj["rejected"]
    implicit = prompt is None
    if implicit:
        prompt, chosen, rejected = _implicit_prompt(chosen, rejected)
    raw = all(isinstance(x, str) for x in (prompt, chosen, rejected))
    sides = [_side(prompt, response, side, extras, source, implicit, raw)
             for side, response in zip(PAIR_SIDES, (chosen, rejected))]
    meta = {k: v for k, v in extras.items() if k not in _CONVERSATION_KEYS}
    return Pair(sides[0], sides[1], source, _omit_stop(obj.get("_meta")), meta)


def _omit_stop(meta: Any) -> bool:
    if not isinstance(meta, dict) or meta.get("omit_stop") is None:
        return False
    if not isinstance(meta["omit_stop"], bool):
        raise EpisodeError("bad_type", f"_meta.omit_stop must be true or false, got {meta['omit_stop']!r}",
                           "_meta.omit_stop", "use true to render the rejected response without its stop")
    return meta["omit_stop"]


def _implicit_prompt(chosen: Any, rejected: Any) -> tuple[list, list, list]:
    """TRL's implicit prompt: two conversations equal up to their last message."""
    if not (isinstance(chosen, list) and isinstance(rejected, list) and chosen and rejected):
        raise EpisodeError(
            "missing_field", "a pair without 'prompt' needs chosen and rejected as whole conversations (lists of "
            "messages) that differ only in their last message", "prompt",
            'add "prompt": [messages...] (or a string, for raw text)',
        )
    if chosen[:-1] != rejected[:-1]:
        at = next((i for i, (a, b) in enumerate(zip(chosen, rejected)) if a != b), min(len(chosen), len(rejected)) - 1)
        raise EpisodeError(
            "implicit_prompt_mismatch",
            f"chosen and rejected differ at message {at}, before their last message: the prompt is ambiguous",
            f"rejected[{at}]", 'give the prompt explicitly: "prompt": [...] with one response in each side',
        )
    return chosen[:-1], chosen[-1:], rejected[-1:]


def _side(prompt: Any, response: Any, side: str, extras: dict, source: Source, implicit: bool, raw: bool) -> Episode:
    """One side of the pair as an episode: prompt (untrained) + response, parsed by sources.py."""
    if raw:
        given = [k for k in _CONVERSATION_KEYS if extras.get(k) is not None]
        if given:
            raise EpisodeError(
                "unsupported_field", f"'{given[0]}' applies to message prompts; a raw-text pair has no place for it",
                given[0], "write it into the prompt text, or give the prompt as a list of messages",
            )
        record = {"prompt": prompt, "completion": response}
        return _parsed(record, source, "prompt_completion", {"completion": side})
    if not isinstance(prompt, (str, list)):
        raise EpisodeError("bad_type", "prompt must be a list of messages or a string", "prompt",
                           'write "prompt": [{"role": "user", "content": "..."}] or "prompt": "..."')
    asked = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    if isinstance(response, str):
        answer = [{"role": "assistant", "content": response}]
    elif isinstance(response, dict):
        answer = [response]
    elif isinstance(response, list) and response:
        answer = response
    else:
        raise EpisodeError("bad_type", f"{side} must be an assistant message, a list of them, or a string", side,
                           f'write "{side}": {{"role": "assistant", "content": "..."}}')
    named = side if implicit else "prompt"  # an implicit prompt is the first messages of each side
    where = ["prompt"] if isinstance(prompt, str) else [f"{named}[{i}]" for i in range(len(asked))]
    offset = len(asked) if implicit else 0
    where += [side] if not isinstance(response, list) else [f"{side}[{offset + j}]" for j in range(len(answer))]
    record = {k: extras[k] for k in _CONVERSATION_KEYS if k in extras}
    record["messages"] = [*asked, *answer]
    fmt = detect_format(record)
    whole = _parsed(record, source, fmt, {"messages": side}, where)
    n_answer = len(_parsed({"messages": answer}, source, fmt, {"messages": side}, where[len(asked):]).messages)
    return _untrained_prompt(whole, len(whole.messages) - n_answer, side)


def _parsed(record: dict, source: Source, fmt: str, names: dict[str, str], where: list[str] = ()) -> Episode:
    """parse_record, with the fields of its errors named as the pair's (``messages[3]`` → ``chosen[0]``)."""
    try:
        return parse_record(record, source, fmt)
    except InputError as exc:
        p = exc.problem
        raise EpisodeError(p.reason, p.message, _pair_field(p.field, names, where), p.hint) from None


def _pair_field(name: str | None, names: dict[str, str], where: list[str]) -> str | None:
    if name is None:
        return None
    match = _MESSAGE_AT.match(name)
    if match and int(match.group(1)) < len(where):
        return where[int(match.group(1))] + match.group(2)
    return names.get(name, name)


def _untrained_prompt(episode: Conversation, n_prompt: int, side: str) -> Conversation:
    """Weight 0 for every prompt message; the response must be assistant messages with something to train."""
    prompt, response = episode.messages[:n_prompt], episode.messages[n_prompt:]
    for m in response:
        if m.role not in TRAINED_BY_DEFAULT:
            raise EpisodeError("bad_response", f"the {side} response holds a {m.role} message; a response is what "
                               "the assistant writes (assistant messages and tool calls)", side,
                               "move earlier turns into the prompt")
    if not any(m.loss_weight > 0 for m in response):
        raise EpisodeError("nothing_to_train", f"the {side} response has train: false or weight 0", side,
                           "remove train/weight from the response: a pair trains its responses")
    untrained = []
    for i, m in enumerate(prompt):
        if m.role in TRAINED_BY_DEFAULT:
            if m.train or (m.weight or 0.0) > 0:
                raise EpisodeError("trained_prompt", "the prompt of a pair is never trained, but a prompt message "
                                   "sets train/weight", "prompt", "remove train/weight from the prompt's messages")
            m = replace(m, train=False)
        untrained.append(m)
    return replace(episode, messages=(*untrained, *response))


# -- rendering and masking -----------------------------------------------------------------------------
def without_stop(rendered: Rendered) -> Rendered:
    """The sequence cut before the final stop token(s) of its last trained turn (``_meta.omit_stop``)."""
    trained = rendered.trained_spans
    if not trained or trained[-1].label != Label.STOP:
        raise EpisodeError("no_stop", "the rejected response has no stop to omit")
    first = len(trained) - 1
    while first > 0 and trained[first - 1].label == Label.STOP:
        first -= 1
    if first == 0:
        raise EpisodeError("empty_response", "the rejected response is empty once its stop is omitted",
                           "rejected", "give the truncated response some text")
    cut = trained[first].start
    spans = [s for s in rendered.spans if s.end <= cut]
    return Rendered(rendered.text[:cut], spans, rendered.source, [cut], list(rendered.notes))


def shared_prompt_length(chosen: Example, rejected: Example) -> int:
    """Tokens before the first trained token, checked identical on both sides; else ``prompt_mismatch``."""
    kc, kr = (int(np.flatnonzero(ex.weights > 0)[0]) for ex in (chosen, rejected))
    if kc == kr and np.array_equal(chosen.input_ids[:kc], rejected.input_ids[:kr]):
        return kc
    n = min(kc, kr)
    differs = np.flatnonzero(chosen.input_ids[:n] != rejected.input_ids[:n])
    at = int(differs[0]) if len(differs) else n
    raise EpisodeError(
        "prompt_mismatch",
        f"chosen and rejected do not share their prompt tokens: the first trained token is at {kc} in chosen and "
        f"{kr} in rejected, and the token ids first differ at position {at}",
        hint="the prompt must render to the same tokens whatever the response; a token merging across the "
        "prompt/response seam can cause this (e.g. a raw-text response that does not start with a space)",
    )


class PairWorker(Worker):
    """Renders both sides of each pair with one renderer, masks them in one batch, checks the shared prompt."""

    def run(self, chunk: list[tuple[int, Pair | InputProblem]]) -> tuple[list[Result], tuple[str, ...]]:
        results = []
        pending: list[tuple[Result, Pair, list[Rendered]]] = []
        for fi, item in chunk:
            result = start_result(fi, item)
            results.append(result)
            if isinstance(item, InputProblem):
                continue
            try:
                pending.append((result, item, [self._render(item, side, result) for side in PAIR_SIDES]))
            except EpisodeError as exc:
                result.reject(exc.at(item.source.file, item.source.line))
        masked = self.masker.mask([r for *_, sides in pending for r in sides]) if pending else []
        for k, (result, pair, rendered) in enumerate(pending):
            try:
                chosen, rejected = (_example(ex, side) for ex, side in zip(masked[2 * k : 2 * k + 2], PAIR_SIDES))
                shared_prompt_length(chosen, rejected)
            except EpisodeError as exc:
                result.reject(exc.at(pair.source.file, pair.source.line))
                continue
            if pair.omit_stop:
                rejected.truncated = True
                result.notes.append("rejected_without_stop")
            result.examples = [chosen, rejected]
            result.notes.extend(note for r in rendered for note in r.notes)
            result.stop_ids.update(turn_end_ids(chosen) | turn_end_ids(rejected))
        return results, self.renderer.stop_strings

    def _render(self, pair: Pair, side: str, result: Result) -> Rendered:
        try:
            episode, neutralized = self.guard.apply(getattr(pair, side))
            rendered = self.renderer.render(episode)
            if len(rendered) != 1:
                raise EpisodeError("not_one_turn", f"renders as {len(rendered)} examples, not one",
                                   hint="a pair side trains one assistant turn: its response")
            one = without_stop(rendered[0]) if side == "rejected" and pair.omit_stop else rendered[0]
        except EpisodeError as exc:
            raise _on_side(exc, side) from None
        result.neutralized += neutralized
        return one


def _on_side(exc: EpisodeError, side: str) -> EpisodeError:
    return EpisodeError(exc.reason, f"{side}: {exc.message}", exc.field or side, exc.hint)


def _example(item: Example | EpisodeError, side: str) -> Example:
    if isinstance(item, EpisodeError):
        raise _on_side(item, side)
    return item


def encode_pairs(
    pairs: list[Pair], tokenizer, render: RenderOptions = RenderOptions(), mask: MaskOptions = MaskOptions(),
    special_in_content: str = "reject",
) -> list[tuple[Example, Example] | InputProblem]:
    """(chosen, rejected) examples per pair, exactly as ``prepare --pairs`` stores them (for evaluation)."""
    options = PrepareOptions(inputs=[], tokenizer="", out="", render=render, mask=mask,
                             special_in_content=special_in_content)
    results, _ = PairWorker(options, tokenizer).run([(0, pair) for pair in pairs])
    return [r.problem if r.problem is not None else (r.examples[0], r.examples[1]) for r in results]


# -- prepare --pairs ----------------------------------------------------------------------------------------
def _read(options: PrepareOptions) -> Iterator[tuple[int, Pair | InputProblem]]:
    for fi, path in enumerate(options.inputs):
        for item in read_pairs(path, options.max_line_bytes):
            yield fi, item


PAIRS = Kind(PAIRS_KIND, _read, PairWorker, parts=tuple(f".{side}" for side in PAIR_SIDES),
             metadata={"pair_sides": list(PAIR_SIDES)})


def prepare_pairs(options: PrepareOptions, progress: bool = True) -> PrepareSummary:
    """``lossmask prepare --pairs``: pair JSONL → a pair dataset (same renderer, mask, checks, writer as SFT).

    The summary counts pairs as examples (``examples["train"]``) and tokens of both sides; the note
    ``rejected_without_stop`` counts the pairs stored with ``_meta.omit_stop``.
    """
    if options.input_format != "auto":
        raise LossmaskError("--input-format does not apply to --pairs: the pair schema is read per line (see "
                            "lossmask/pairs.py)")
    return prepare_kind(options, PAIRS, progress)
