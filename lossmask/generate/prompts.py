"""System prompts by tier, plus the record frame every phase generator shares (the request check, which
format_lock uses too, is ``format_lock.check_request``).

The system prompt grows with the curriculum, so a small model first meets the short, fixed prompts and
only later the longer ones it must actually read:

- ``short``  (phases 1-2): ``format_lock.SYSTEM_PROMPTS``, a few tokens each.
- ``medium`` (phases 3-4): ``MEDIUM_SYSTEM_PROMPTS``, 15-20 tokens each (Qwen3 / Llama 3 tokenizers).
- ``tools``  (phases 5-6): ``TOOL_SYSTEM_PROMPTS``, the prompts that list the workspace tools. They are
  owned by ``lossmask.generate.tools`` and re-exported here on first access, so importing this module
  never needs the tool module (which may itself import from here).

Held-out split shared by phases 2-4 and 1b: every candidate item has a *key* (the payload, or the user's
words); ``format_lock.is_held_out(key)`` puts it on one side for good, and a generator redraws a candidate
until it lands on the requested side (``draw_on_side``). No seed of the training side can produce a
held-out key.
"""
from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any, TypeVar

from lossmask.errors import LossmaskError
from lossmask.generate.format_lock import SYSTEM_PROMPTS, is_held_out

T = TypeVar("T")

SHORT_SYSTEM_PROMPTS = SYSTEM_PROMPTS
MEDIUM_SYSTEM_PROMPTS: dict[str, tuple[str, ...]] = {
    "en": (
        "You are MyPT, a friendly assistant. Answer clearly and briefly in the user's language.",
        "You are MyPT, a helpful assistant for English and German. Keep answers short and correct.",
        "You are MyPT. Give short, accurate answers and use any context the user provides.",
        "You are MyPT, a helpful assistant. Reply in one to three sentences.",
        "You are MyPT, a polite assistant. Answer questions briefly and stay on topic.",
    ),
    "de": (
        "Du bist MyPT, ein freundlicher Assistent. Antworte klar und kurz.",
        "Du bist MyPT, ein Assistent für Deutsch und Englisch. Antworte kurz.",
        "Du bist MyPT. Gib kurze, genaue Antworten und nutze den Kontext.",
        "Du bist MyPT. Antworte in ein bis drei Sätzen.",
        "Du bist MyPT, ein hilfreicher Assistent. Bleib kurz und beim Thema.",
    ),
}
TIERS: tuple[str, ...] = ("short", "medium", "tools")
MAX_DRAWS = 10_000


def __getattr__(name: str) -> Any:
    """``TOOL_SYSTEM_PROMPTS`` comes from ``lossmask.generate.tools``, imported on first use."""
    if name == "TOOL_SYSTEM_PROMPTS":
        from lossmask.generate.tools import TOOL_SYSTEM_PROMPTS

        return TOOL_SYSTEM_PROMPTS
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def system_prompt(tier: str, language: str, rng: random.Random) -> str:
    """One system prompt of ``tier`` (short, medium, tools) in ``language``, drawn with ``rng``."""
    if tier == "short":
        table = SHORT_SYSTEM_PROMPTS
    elif tier == "medium":
        table = MEDIUM_SYSTEM_PROMPTS
    elif tier == "tools":
        table = __getattr__("TOOL_SYSTEM_PROMPTS")
    else:
        raise LossmaskError(f"unknown system prompt tier {tier!r}; choose one of {', '.join(TIERS)}")
    if language not in table:
        raise LossmaskError(f"no {tier} system prompts in language {language!r}; choose one of {', '.join(table)}")
    return rng.choice(table[language])


def draw_on_side(make: Callable[[], T], key: Callable[[T], str], held_out: bool, what: str) -> T:
    """Call ``make`` until its item's key falls on the requested side of the split (module docstring)."""
    for _ in range(MAX_DRAWS):
        item = make()
        if is_held_out(key(item)) == held_out:
            return item
    side = "held-out" if held_out else "training"
    raise LossmaskError(f"{what}: no {side} item in {MAX_DRAWS} draws; the item space is too small")


def split_name(held_out: bool) -> str:
    return "held_out" if held_out else "train"


def record(
    system: str,
    messages: list[dict],
    language: str,
    meta: dict[str, Any],
    held_out: bool,
) -> dict:
    """A native-schema record; ``meta`` starts with generator, phase and pattern, then the gate fields."""
    head = {key: meta[key] for key in ("generator", "phase", "pattern")}
    rest = {key: value for key, value in meta.items() if key not in head}
    return {
        "system": system,
        "messages": messages,
        "language": language,
        "_meta": {**head, "language": language, "split": split_name(held_out), **rest},
    }
