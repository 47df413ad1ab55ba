"""Phase-1b "context extension" data: long-context QA and general replay text, for packing to 4096 tokens.

Stretching the context from 1024 to 4096 positions (position interpolation) needs sequences that use the
far positions. Two kinds of records:

- ``long_qa``: the user ``context`` is a long run of short ``[doc:ID]`` documents (made-up bridges,
  villages, companies and lakes from ``chat.make_entity``, mixed with descriptive notes about made-up
  places), about ``target_tokens`` long. One document holds the fact the question asks for, at a random
  position; the answer is one sentence stating it and cites that document. Every document is about
  a different name, so the fact has exactly one source. ``_meta.fact_position`` is where that document starts,
  as a fraction of the context (0 = first, close to 1 = last); ``_meta.answer_fact`` appears in the
  document and in the answer.
- ``replay``: ``{"_replay": true, "text": ...}`` records of the same kind of prose without document
  headers, 50-100% of the target length, trained on every token; the packer fills 4096-token rows with
  them. ``replay_share`` of the training records are replay; held-out sets are QA only (replay has no
  answer to grade).

Length is counted in characters, ``CHARS_PER_TOKEN[language]`` per token (measured on this text with the
Qwen3 and Llama 3 tokenizers: 3.6-3.8 in English, 3.1-3.2 in German; made-up names split into many tokens).
A tokenizer trained on this data packs more characters per token, so the records then come out shorter,
never longer. It is string assembly only: hundreds of records a second.

Held-out split: the key is the question, which holds the made-up name of the asked-about entity
(``format_lock.is_held_out``, see ``prompts``).
"""
from __future__ import annotations

import random
from collections.abc import Iterable

from lossmask.errors import LossmaskError
from lossmask.generate.chat import Entity, format_context, make_entity, make_name, unique_names
from lossmask.generate.format_lock import LANGUAGES, check_request
from lossmask.generate.prompts import draw_on_side, record, split_name, system_prompt

CHARS_PER_TOKEN: dict[str, float] = {"en": 3.6, "de": 3.1}
MIN_TARGET_TOKENS = 100

_NOTES = {
    "en": (
        "In {season}, the fields around {n} turn {field}.",
        "The market in {n} opens every {day} morning.",
        "Visitors to {n} often walk along the old stone paths.",
        "Most houses in {n} have {roof} roofs.",
        "A small bus connects {n} with the next town {k} times a day.",
        "The winters in {n} are long, but the summers are mild.",
        "Children in {n} learn to swim in the river.",
        "Every year, {n} holds a festival with music and food.",
        "The library of {n} is open until six in the evening.",
        "From the hill above {n}, you can see {k} church towers.",
    ),
    "de": (
        "Im {season} färben sich die Felder um {n} {field}.",
        "Der Markt in {n} öffnet jeden {day} früh.",
        "Besucher von {n} spazieren oft über die alten Steinwege.",
        "Die meisten Häuser in {n} haben {roof}e Dächer.",
        "Ein kleiner Bus verbindet {n} {k}-mal am Tag mit der nächsten Stadt.",
        "Die Winter in {n} sind lang, aber die Sommer sind mild.",
        "Die Kinder in {n} lernen im Fluss schwimmen.",
        "Jedes Jahr feiert {n} ein Fest mit Musik und Essen.",
        "Die Bibliothek von {n} ist bis sechs Uhr abends geöffnet.",
        "Vom Hügel über {n} sieht man {k} Kirchtürme.",
    ),
}
# (EN, DE)
_SEASONS = (("spring", "Frühling"), ("summer", "Sommer"), ("autumn", "Herbst"))
_FIELDS = (("green", "grün"), ("yellow", "gelb"), ("golden", "golden"), ("brown", "braun"))
_ROOFS = (("red", "rot"), ("grey", "grau"), ("brown", "braun"), ("blue", "blau"), ("black", "schwarz"))
_DAYS = (("Monday", "Montag"), ("Tuesday", "Dienstag"), ("Wednesday", "Mittwoch"), ("Thursday", "Donnerstag"),
         ("Friday", "Freitag"), ("Saturday", "Samstag"))


def generate_longctx(
    n: int,
    seed: int,
    languages: Iterable[str] = LANGUAGES,
    held_out: bool = False,
    target_tokens: int = 3000,
    replay_share: float = 0.3,
) -> list[dict]:
    """``n`` long-QA and replay records of about ``target_tokens`` tokens (see the module docstring)."""
    langs = check_request("longctx", n, languages)
    if isinstance(target_tokens, bool) or not isinstance(target_tokens, int) or target_tokens < MIN_TARGET_TOKENS:
        raise LossmaskError(f"longctx: target_tokens must be an integer >= {MIN_TARGET_TOKENS}, got {target_tokens!r}")
    if isinstance(replay_share, bool) or not isinstance(replay_share, (int, float)) or not 0 <= replay_share <= 1:
        raise LossmaskError(f"longctx: replay_share must be a number from 0 to 1, got {replay_share!r}")
    rng = random.Random(f"longctx\0{seed}\0{held_out}\0{target_tokens}")
    records = []
    for i in range(n):
        lang = langs[i % len(langs)]
        target_chars = int(target_tokens * CHARS_PER_TOKEN[lang])
        if not held_out and rng.random() < replay_share:
            records.append(_replay(lang, rng, int(target_chars * rng.uniform(0.5, 1.0)), held_out))
        else:
            records.append(_long_qa(lang, rng, target_chars, held_out))
    return records


def _long_qa(lang: str, rng: random.Random, target_chars: int, held_out: bool) -> dict:
    def make() -> tuple[Entity, tuple[str, str, str]]:
        entity = make_entity(make_name(rng), lang, rng)
        return entity, rng.choice(entity.qa)

    needle, (question, answer, fact) = draw_on_side(make, lambda item: item[1][0], held_out, "longctx")
    blocks = _documents(lang, rng, target_chars - len(needle.text), taken={needle.name})
    at = rng.randint(0, len(blocks))
    blocks.insert(at, needle)
    context = format_context(blocks)
    start = context.index(f"[{needle.doc_id}]")
    messages = [
        {"role": "user", "content": question, "context": context},
        {"role": "assistant", "content": answer, "cite": needle.doc_id},
    ]
    meta = {
        "generator": "longctx",
        "phase": "1b",
        "pattern": "long_qa",
        "has_context": True,
        "cited_docs": [needle.doc_id],
        "expected_language": lang,
        "answer_fact": fact,
        "fact_position": round(start / len(context), 4),
        "documents": len(blocks),
        "context_chars": len(context),
    }
    return record(system_prompt("medium", lang, rng), messages, lang, meta, held_out)


def _replay(lang: str, rng: random.Random, chars: int, held_out: bool) -> dict:
    text = "\n\n".join(block.text for block in _documents(lang, rng, chars, taken=()))
    meta = {"generator": "longctx", "phase": "1b", "pattern": "replay", "language": lang, "split": split_name(held_out)}
    return {"_replay": True, "text": text, "language": lang, "_meta": meta}


def _documents(lang: str, rng: random.Random, chars: int, taken: Iterable[str]) -> list[Entity]:
    """Documents (entities and notes, half each) about distinct names, together about ``chars`` long."""
    blocks: list[Entity] = []
    used = set(taken)
    total = 0
    while total < chars:
        (name,) = unique_names(1, rng, used)
        used.add(name)
        block = make_entity(name, lang, rng) if rng.random() < 0.5 else _notes(name, lang, rng)
        blocks.append(block)
        total += len(block.text) + len(block.doc_id) + 5  # "[ID] " and the blank line between blocks
    return blocks


def _notes(name: str, lang: str, rng: random.Random) -> Entity:
    """A descriptive note about a made-up place: three to five sentences, no questions to ask about it."""
    side = 1 if lang == "de" else 0

    def pick(pairs: tuple[tuple[str, str], ...]) -> str:
        return rng.choice(pairs)[side]

    slots = {"n": name, "season": pick(_SEASONS), "field": pick(_FIELDS), "roof": pick(_ROOFS), "day": pick(_DAYS),
             "k": rng.randint(2, 12)}
    text = " ".join(t.format(**slots) for t in rng.sample(_NOTES[lang], rng.randint(3, 5)))
    return Entity(f"doc:{name.lower()}-notes", name, name, text, ())
