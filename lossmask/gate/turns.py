"""Held-out records → turns to generate, and their generation with a per-turn budget.

A *turn* is one assistant block of a record with its gold history: the prompt is the myPT rendering of every
message before the block followed by ``<myPT_assistant>`` (exactly what the model saw before that block in
training), the reference is the block as the renderer writes it. Blocks follow the renderer's rule: an
assistant message and the tool calls right after it share one block; a tool call with no assistant message
before it opens its own.

Budget: a turn must end within ``max_new_tokens`` generated tokens when that is given, else within
1.5 × its reference's tokens + 16 (generous for a right answer, short enough to catch a runaway).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

from lossmask.episode import Conversation, Message, Source
from lossmask.errors import LossmaskError
from lossmask.gate.checks import Judged, parse_block
from lossmask.gate.generation import (
    CLOSE,
    EOT,
    OPEN,
    TOOLCALL_CLOSE,
    generate_greedy,
    pad_id,
    special_strings,
    strip_padding,
    tag_ids,
)
from lossmask.render.mypt import MyptRenderer
from lossmask.sources import parse_record
from lossmask.tokenizer import TokenizerInfo

BUDGET_FACTOR = 1.5
BUDGET_SLACK = 16


@dataclass(frozen=True)
class Record:
    """A parsed held-out record: its conversation, language and ``_meta`` (gate fields)."""

    index: int
    conversation: Conversation
    language: str
    meta: dict


@dataclass(frozen=True)
class Turn:
    """One assistant block to generate: prompt text, reference block text, the user's last words."""

    record: Record
    block: int  # which assistant block of the record (0-based)
    prompt: str
    reference: str
    question: str
    messages: tuple[Message, ...]  # the reference block's messages


def parse_records(records: list[dict], what: str = "held-out prompt") -> list[Record]:
    """Parse native-schema records; each must be a conversation with at least one assistant block."""
    if not records:
        raise LossmaskError(f"the gate needs at least one {what}")
    out = []
    for i, raw in enumerate(records):
        episode = parse_record(raw, Source(f"{what}s", i + 1))
        if not isinstance(episode, Conversation) or not assistant_blocks(episode.messages):
            raise LossmaskError(
                f"{what} {i + 1}: expected a conversation with the reference assistant answer "
                "(native schema: system, messages [user, assistant, ...])"
            )
        meta = episode.meta.get("_meta") if isinstance(episode.meta.get("_meta"), dict) else {}
        language = episode.language or meta.get("language") or "unknown"
        out.append(Record(i, episode, language, meta))
    return out


def assistant_blocks(messages: tuple[Message, ...]) -> list[tuple[int, int]]:
    """(start, end) message indices of every assistant block, in order (the renderer's grouping)."""
    blocks = []
    i = 0
    while i < len(messages):
        if messages[i].role not in ("assistant", "assistant_toolcall"):
            i += 1
            continue
        start = i
        if messages[i].role == "assistant":
            i += 1
        while i < len(messages) and messages[i].role == "assistant_toolcall":
            i += 1
        blocks.append((start, i))
    return blocks


def turn(record: Record, block: int, info: TokenizerInfo) -> Turn:
    """The turn of ``record``'s assistant block number ``block`` (negative counts from the end)."""
    blocks = assistant_blocks(record.conversation.messages)
    start, end = blocks[block]
    conv = record.conversation
    renderer = MyptRenderer(info)
    prefix = renderer.render(replace(conv, messages=conv.messages[:start]))[0].text
    full = renderer.render(replace(conv, messages=conv.messages[:end]))[0].text
    if not full.startswith(prefix + OPEN):
        raise LossmaskError(
            f"held-out prompt {record.index + 1}: assistant block {block % len(blocks) + 1} does not follow a user "
            "message or tool result; the gate cannot render its prompt"
        )
    users = [m.content for m in conv.messages[:start] if m.role == "user"]
    question = users[-1] if users else ""
    return Turn(record, block % len(blocks), prefix + OPEN, full[len(prefix + OPEN) :], question,
                conv.messages[start:end])


def reference_content(turn: Turn) -> str:
    """The reference answer text of a turn (its assistant message's content; "" for a bare tool call)."""
    first = turn.messages[0]
    return first.content if first.role == "assistant" else ""


class TurnGenerator:
    """Generates turns greedily in batches for one model and tokenizer, and parses every generated block."""

    def __init__(self, model, tokenizer, batch_size: int = 32, max_new_tokens: int | None = None):
        if batch_size < 1 or (max_new_tokens is not None and max_new_tokens < 1):
            raise LossmaskError(f"batch_size and max_new_tokens must be >= 1, got {batch_size} and {max_new_tokens}")
        self.model, self.tokenizer = model, tokenizer
        self.batch_size, self.max_new_tokens = batch_size, max_new_tokens
        self.info = TokenizerInfo.of(tokenizer)
        self.ids = tag_ids(tokenizer, (CLOSE, EOT, TOOLCALL_CLOSE))
        self.pad = pad_id(tokenizer)
        self.specials = special_strings(tokenizer)

    def budget(self, reference: str) -> int:
        if self.max_new_tokens is not None:
            return self.max_new_tokens
        tokens = len(self.tokenizer(reference, add_special_tokens=False)["input_ids"])
        return math.ceil(BUDGET_FACTOR * tokens) + BUDGET_SLACK

    def turns(self, turns: list[Turn]) -> list[tuple[Judged, str]]:
        """(judged block, generated text) per turn, in order."""
        texts = self.texts([t.prompt for t in turns], [self.budget(t.reference) for t in turns])
        return [(parse_block(text, self.specials), text) for text in texts]

    def texts(self, prompts: list[str], budgets: list[int]) -> list[str]:
        """The generated text per prompt (special tokens kept, padding dropped), each cut to its budget."""
        if not prompts:
            return []
        encoded = [self.tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
        new = generate_greedy(
            self.model, encoded, self.ids[EOT], self.pad, max(budgets), self.batch_size,
            stop_after=(self.ids[TOOLCALL_CLOSE], self.ids[CLOSE]),
        )
        return [
            self.tokenizer.decode(strip_padding(ids[:budget], self.pad, self.ids[EOT]), skip_special_tokens=False,
                                  clean_up_tokenization_spaces=False)
            for ids, budget in zip(new, budgets)
        ]
