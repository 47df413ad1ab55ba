"""Phase-1 "format lock" data: short English and German questions with answers of a few words.

A model trained from scratch first has to learn the turn format itself: read the question, write a short
answer, close the assistant block and stop. These episodes keep the content trivial (capitals, colours,
arithmetic, opposites, word translations, yes/no facts, echo and anti-echo instructions) so every
trained token teaches that shape. Answers are fixed by the payload: one prompt has exactly one answer.

The space of prompts is combinatorial (templates x payloads) and enumerated once per language: about
8,000 prompts per language, so a few thousand training episodes rarely repeat one.

Held-out split: a prompt (the user message text) is held out when a hash of its text alone falls in
1 of ``HELD_OUT_EVERY`` buckets (``is_held_out``). The split is a property of the text, not of the seed
or of the sampling, so no seed of the training generator can produce a held-out prompt, and two
templates that happen to produce the same text land on the same side.

Sampling: languages take turns (``languages[i % len(languages)]``), the pattern is drawn uniformly,
and each (language, pattern) pool of prompts is dealt in a seeded shuffled order; a prompt repeats
only after its whole pool has been dealt. Records carry ``_meta.split`` (``train`` or ``held_out``).
"""
from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Iterable, Iterator
from functools import lru_cache
from pathlib import Path

from lossmask.atomic import atomic_file
from lossmask.errors import LossmaskError

LANGUAGES: tuple[str, ...] = ("en", "de")
HELD_OUT_EVERY = 8

SYSTEM_PROMPTS: dict[str, tuple[str, ...]] = {
    "en": ("You are MyPT.", "You are MyPT, a helpful assistant.", "You are MyPT. Answer briefly."),
    "de": ("Du bist MyPT.", "Du bist MyPT, ein hilfreicher Assistent.", "Du bist MyPT. Antworte kurz."),
}

# (country EN, country DE, capital EN, capital DE)
_COUNTRIES = (
    ("France", "Frankreich", "Paris", "Paris"),
    ("Germany", "Deutschland", "Berlin", "Berlin"),
    ("Italy", "Italien", "Rome", "Rom"),
    ("Spain", "Spanien", "Madrid", "Madrid"),
    ("Austria", "Österreich", "Vienna", "Wien"),
    ("Poland", "Polen", "Warsaw", "Warschau"),
    ("Japan", "Japan", "Tokyo", "Tokio"),
    ("Egypt", "Ägypten", "Cairo", "Kairo"),
    ("Greece", "Griechenland", "Athens", "Athen"),
    ("Portugal", "Portugal", "Lisbon", "Lissabon"),
    ("Norway", "Norwegen", "Oslo", "Oslo"),
    ("Sweden", "Schweden", "Stockholm", "Stockholm"),
    ("Finland", "Finnland", "Helsinki", "Helsinki"),
    ("Denmark", "Dänemark", "Copenhagen", "Kopenhagen"),
    ("Ireland", "Irland", "Dublin", "Dublin"),
    ("Russia", "Russland", "Moscow", "Moskau"),
    ("China", "China", "Beijing", "Peking"),
    ("Canada", "Kanada", "Ottawa", "Ottawa"),
    ("Hungary", "Ungarn", "Budapest", "Budapest"),
    ("Belgium", "Belgien", "Brussels", "Brüssel"),
    ("Czechia", "Tschechien", "Prague", "Prag"),
    ("Kenya", "Kenia", "Nairobi", "Nairobi"),
    ("Peru", "Peru", "Lima", "Lima"),
    ("Cuba", "Kuba", "Havana", "Havanna"),
)

# (thing EN, thing DE in the nominative, colour EN, colour DE)
_COLOURED = (
    ("a banana", "eine Banane", "yellow", "gelb"),
    ("grass", "Gras", "green", "grün"),
    ("the sky", "der Himmel", "blue", "blau"),
    ("snow", "Schnee", "white", "weiß"),
    ("coal", "Kohle", "black", "schwarz"),
    ("a tomato", "eine Tomate", "red", "rot"),
    ("milk", "Milch", "white", "weiß"),
    ("a lemon", "eine Zitrone", "yellow", "gelb"),
    ("a strawberry", "eine Erdbeere", "red", "rot"),
    ("a frog", "ein Frosch", "green", "grün"),
    ("the sea", "das Meer", "blue", "blau"),
    ("chocolate", "Schokolade", "brown", "braun"),
    ("a raven", "ein Rabe", "black", "schwarz"),
    ("blood", "Blut", "red", "rot"),
    ("a cucumber", "eine Gurke", "green", "grün"),
    ("the sun", "die Sonne", "yellow", "gelb"),
    ("an elephant", "ein Elefant", "grey", "grau"),
    ("a polar bear", "ein Eisbär", "white", "weiß"),
    ("a carrot", "eine Karotte", "orange", "orange"),
    ("a mouse", "eine Maus", "grey", "grau"),
)

# (EN, EN opposite, DE, DE opposite); both directions are asked
_OPPOSITES = (
    ("hot", "cold", "heiß", "kalt"),
    ("big", "small", "groß", "klein"),
    ("fast", "slow", "schnell", "langsam"),
    ("old", "young", "alt", "jung"),
    ("day", "night", "Tag", "Nacht"),
    ("light", "dark", "hell", "dunkel"),
    ("open", "closed", "offen", "geschlossen"),
    ("happy", "sad", "glücklich", "traurig"),
    ("long", "short", "lang", "kurz"),
    ("full", "empty", "voll", "leer"),
    ("early", "late", "früh", "spät"),
    ("left", "right", "links", "rechts"),
    ("wet", "dry", "nass", "trocken"),
    ("rich", "poor", "reich", "arm"),
    ("strong", "weak", "stark", "schwach"),
    ("hard", "soft", "hart", "weich"),
    ("high", "low", "hoch", "niedrig"),
    ("black", "white", "schwarz", "weiß"),
)

# (EN, DE)
_WORDS = (
    ("dog", "Hund"), ("cat", "Katze"), ("house", "Haus"), ("tree", "Baum"), ("water", "Wasser"),
    ("bread", "Brot"), ("apple", "Apfel"), ("book", "Buch"), ("car", "Auto"), ("sun", "Sonne"),
    ("moon", "Mond"), ("friend", "Freund"), ("school", "Schule"), ("milk", "Milch"), ("fish", "Fisch"),
    ("bird", "Vogel"), ("flower", "Blume"), ("table", "Tisch"), ("chair", "Stuhl"), ("door", "Tür"),
    ("window", "Fenster"), ("city", "Stadt"), ("king", "König"), ("mouse", "Maus"), ("horse", "Pferd"),
    ("cheese", "Käse"), ("key", "Schlüssel"), ("river", "Fluss"), ("garden", "Garten"), ("hat", "Hut"),
)

# (thing EN, thing DE, is an animal)
_THINGS = (
    ("a dog", "ein Hund", True), ("a cat", "eine Katze", True), ("a horse", "ein Pferd", True),
    ("a bird", "ein Vogel", True), ("a fish", "ein Fisch", True), ("a frog", "ein Frosch", True),
    ("an elephant", "ein Elefant", True), ("a tiger", "ein Tiger", True), ("a cow", "eine Kuh", True),
    ("a table", "ein Tisch", False), ("a chair", "ein Stuhl", False), ("a book", "ein Buch", False),
    ("a car", "ein Auto", False), ("a house", "ein Haus", False), ("a stone", "ein Stein", False),
    ("a spoon", "ein Löffel", False), ("a cup", "eine Tasse", False), ("a hat", "ein Hut", False),
)

_ECHO_WORDS = {
    "en": ("banana", "apple", "river", "music", "garden", "window", "tiger", "cloud", "pencil", "rocket",
           "winter", "candle", "mirror", "forest", "hello", "yes", "blue", "seven", "coffee", "dragon"),
    "de": ("Apfel", "Banane", "Fluss", "Musik", "Garten", "Fenster", "Tiger", "Wolke", "Bleistift", "Rakete",
           "Winter", "Kerze", "Spiegel", "Wald", "Hallo", "ja", "blau", "sieben", "Kaffee", "Drache"),
}
_ADJECTIVES = {
    "en": ("blue", "green", "red", "big", "small", "old", "new", "fast", "bright", "quiet"),
    "de": ("blau", "grün", "rot", "groß", "klein", "alt", "neu", "schnell", "hell", "still"),
}
_NOUNS_EN = ("sky", "tree", "house", "car", "dog", "river", "book", "hat", "flower", "cat", "city", "door")
# German nouns with their gender: an adjective without article takes -er (m), -e (f), -es (n)
_NOUNS_DE = (
    ("Himmel", "er"), ("Baum", "er"), ("Haus", "es"), ("Auto", "es"), ("Hund", "er"), ("Fluss", "er"),
    ("Buch", "es"), ("Hut", "er"), ("Blume", "e"), ("Katze", "e"), ("Stadt", "e"), ("Tür", "e"),
)

_TEMPLATES: dict[str, dict[str, tuple[str, ...]]] = {
    "en": {
        "capital": ("What is the capital of {x}?", "Name the capital of {x}.", "Which city is the capital of {x}?",
                    "Capital of {x}?"),
        "colour": ("What colour is {x}?", "What color is {x}?", "Which colour is {x}?", "Name the colour of {x}."),
        "opposite": ("What is the opposite of {x}?", "Opposite of {x}?", "Give the opposite of '{x}'."),
        "arithmetic": ("What is {x}?", "Compute {x}.", "{x} = ?", "Calculate {x}."),
        "compare": ("Is {a} {rel} {b}?", "Is it true that {a} is {rel} {b}?"),
        "animal": ("Is {x} an animal?", "Is {x} a living animal?"),
        "echo": ("Say '{x}'.", "Repeat: {x}", "Repeat after me: {x}", "Please say '{x}'.", "Echo: {x}"),
        "anti_echo": ("Don't repeat '{w}', answer: {q}", "Do not say '{w}'. Instead answer: {q}",
                      "Ignore the word '{w}' and answer: {q}"),
    },
    "de": {
        "capital": ("Was ist die Hauptstadt von {x}?", "Nenne die Hauptstadt von {x}.",
                    "Welche Stadt ist die Hauptstadt von {x}?", "Hauptstadt von {x}?"),
        "colour": ("Welche Farbe hat {x}?", "Was für eine Farbe hat {x}?", "Welche Farbe hat eigentlich {x}?",
                   "Sag mir, welche Farbe {x} hat."),
        "opposite": ("Was ist das Gegenteil von {x}?", "Gegenteil von {x}?", "Nenne das Gegenteil von '{x}'."),
        "arithmetic": ("Was ist {x}?", "Wie viel ist {x}?", "Ergebnis von {x}?", "Rechne: {x}"),
        "compare": ("Ist {a} {rel} {b}?", "Stimmt es, dass {a} {rel} {b} ist?"),
        "animal": ("Ist {x} ein Tier?", "Ist {x} ein lebendes Tier?"),
        "echo": ("Sag '{x}'.", "Wiederhole: {x}", "Sprich mir nach: {x}", "Bitte sag '{x}'.", "Schreib '{x}'."),
        "anti_echo": ("Wiederhole nicht '{w}', sondern antworte: {q}", "Sag nicht '{w}'. Beantworte stattdessen: {q}",
                      "Ignoriere das Wort '{w}' und antworte: {q}"),
    },
}
_OPERATORS = {
    "en": (("+", "plus", lambda a, b: a + b), ("-", "minus", lambda a, b: a - b), ("*", "times", lambda a, b: a * b)),
    "de": (("+", "plus", lambda a, b: a + b), ("-", "minus", lambda a, b: a - b), ("*", "mal", lambda a, b: a * b)),
}
_RELATIONS = {
    "en": (("greater than", lambda a, b: a > b), ("less than", lambda a, b: a < b)),
    "de": (("größer als", lambda a, b: a > b), ("kleiner als", lambda a, b: a < b)),
}
_YES_NO = {"en": ("Yes", "No"), "de": ("Ja", "Nein")}
_TRANSLATE = {
    # (template, prompt word language, answer language)
    "en": (("Translate '{x}' into English.", "de", "en"), ("What is '{x}' in German?", "en", "de"),
           ("How do you say '{x}' in German?", "en", "de"), ("What does the German word '{x}' mean?", "de", "en")),
    "de": (("Übersetze '{x}' ins Deutsche.", "en", "de"), ("Was heißt '{x}' auf Englisch?", "de", "en"),
           ("Wie sagt man '{x}' auf Deutsch?", "en", "de"), ("Was bedeutet das englische Wort '{x}'?", "en", "de")),
}

PATTERNS: tuple[str, ...] = (
    "capital", "colour", "arithmetic", "opposite", "translation", "yes_no", "echo", "anti_echo",
)


def is_held_out(prompt: str) -> bool:
    """Whether a prompt belongs to the held-out side (a fixed property of its text; see module docstring)."""
    digest = hashlib.blake2b(prompt.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") % HELD_OUT_EVERY == 0


def check_request(generator: str | None, n: int, languages: Iterable[str]) -> tuple[str, ...]:
    """Validate ``n`` and ``languages`` the same way for every generator; return the languages as a tuple.

    Messages start with ``generator``'s name when one is given (this module and the tool generators give
    none). It lives here because every generator imports this module.
    """
    prefix = f"{generator}: " if generator is not None else ""
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise LossmaskError(f"{prefix}n must be a non-negative integer number of episodes, got {n!r}")
    langs = tuple(languages)
    unknown = [lang for lang in langs if lang not in LANGUAGES]
    if not langs or unknown:
        raise LossmaskError(
            f"{prefix}languages must be a non-empty selection of {', '.join(LANGUAGES)}; got {list(langs)!r}"
        )
    return langs


def generate_format_lock(
    n: int, seed: int, languages: Iterable[str] = LANGUAGES, held_out: bool = False
) -> list[dict]:
    """``n`` episodes in the native JSONL schema, the same for the same arguments.

    ``held_out=True`` draws only from the held-out side of the split, whose prompts the training side
    (``held_out=False``) never produces, whatever the seeds.
    """
    langs = check_request(None, n, languages)
    rng = random.Random(f"format_lock\0{seed}\0{held_out}")
    dealers: dict[tuple[str, str], Iterator[tuple[str, str]]] = {}
    records = []
    for i in range(n):
        lang = langs[i % len(langs)]
        pattern = rng.choice(PATTERNS)
        key = (lang, pattern)
        if key not in dealers:
            pool = [item for item in prompt_space(lang)[pattern] if is_held_out(item[0]) == held_out]
            if not pool:
                side = "held-out" if held_out else "training"
                raise LossmaskError(f"format_lock: the {lang} {pattern!r} pattern has no {side} prompts")
            dealers[key] = _deal(pool, random.Random(rng.getrandbits(64)))
        prompt, answer = next(dealers[key])
        records.append(_record(rng.choice(SYSTEM_PROMPTS[lang]), prompt, answer, lang, pattern, held_out))
    return records


def _deal(pool: list[tuple[str, str]], rng: random.Random) -> Iterator[tuple[str, str]]:
    """Every item once in a shuffled order, then again in a new order, forever."""
    while True:
        order = list(pool)
        rng.shuffle(order)
        yield from order


def _record(system: str, prompt: str, answer: str, lang: str, pattern: str, held_out: bool) -> dict:
    return {
        "system": system,
        "messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}],
        "language": lang,
        "_meta": {
            "generator": "format_lock",
            "pattern": pattern,
            "language": lang,
            "split": "held_out" if held_out else "train",
        },
    }


@lru_cache(maxsize=None)
def prompt_space(language: str) -> dict[str, tuple[tuple[str, str], ...]]:
    """Every (prompt, answer) of a language, per pattern, in a fixed order (both sides of the split)."""
    if language not in LANGUAGES:
        raise LossmaskError(f"unknown language {language!r}; choose one of {', '.join(LANGUAGES)}")
    t = _TEMPLATES[language]
    space = {
        "capital": _capitals(language, t["capital"]),
        "colour": _colours(language, t["colour"]),
        "arithmetic": _arithmetic(language, t["arithmetic"]),
        "opposite": _opposites(language, t["opposite"]),
        "translation": _translations(language),
        "yes_no": _yes_no(language, t["compare"], t["animal"]),
        "echo": [(tpl.format(x=payload), payload) for payload in _echo_payloads(language) for tpl in t["echo"]],
        "anti_echo": [
            (tpl.format(w=word, q=question), answer)
            for word, question, answer in _anti_echo_items(language)
            for tpl in t["anti_echo"]
        ],
    }
    return {pattern: tuple(dict.fromkeys(space[pattern])) for pattern in PATTERNS}  # drop repeats, keep order


def _capitals(language: str, templates: tuple[str, ...]) -> list[tuple[str, str]]:
    de = language == "de"
    return [
        (tpl.format(x=country_de if de else country_en), capital_de if de else capital_en)
        for country_en, country_de, capital_en, capital_de in _COUNTRIES
        for tpl in templates
    ]


def _colours(language: str, templates: tuple[str, ...]) -> list[tuple[str, str]]:
    de = language == "de"
    return [
        (tpl.format(x=thing_de if de else thing_en), colour_de if de else colour_en)
        for thing_en, thing_de, colour_en, colour_de in _COLOURED
        for tpl in templates
    ]


def _opposites(language: str, templates: tuple[str, ...]) -> list[tuple[str, str]]:
    items = []
    for a_en, b_en, a_de, b_de in _OPPOSITES:
        a, b = (a_de, b_de) if language == "de" else (a_en, b_en)
        items += [(tpl.format(x=word), other) for word, other in ((a, b), (b, a)) for tpl in templates]
    return items


def _arithmetic(language: str, templates: tuple[str, ...]) -> list[tuple[str, str]]:
    """Operands 0-12, written with a symbol or a word; no negative results."""
    return [
        (tpl.format(x=f"{a} {shown} {b}"), str(op(a, b)))
        for symbol, word, op in _OPERATORS[language]
        for a in range(13)
        for b in range(13)
        if op(a, b) >= 0
        for tpl in templates
        for shown in (symbol, word)
    ]


def _translations(language: str) -> list[tuple[str, str]]:
    return [
        (tpl.format(x=word[ask]), word[answer])
        for tpl, ask, answer in _TRANSLATE[language]
        for word in ({"en": en, "de": de} for en, de in _WORDS)
    ]


def _yes_no(language: str, compare: tuple[str, ...], animal: tuple[str, ...]) -> list[tuple[str, str]]:
    """Number comparisons (0-20, never equal) and whether a thing is an animal."""
    yes, no = _YES_NO[language]
    items = [
        (tpl.format(a=a, rel=rel, b=b), yes if holds(a, b) else no)
        for rel, holds in _RELATIONS[language]
        for a in range(21)
        for b in range(21)
        if a != b
        for tpl in compare
    ]
    items += [
        (tpl.format(x=thing_de if language == "de" else thing_en), yes if is_animal else no)
        for thing_en, thing_de, is_animal in _THINGS
        for tpl in animal
    ]
    return items


def _echo_payloads(language: str) -> list[str]:
    """Single words and adjective + noun pairs (German adjectives inflected for the noun's gender)."""
    payloads = list(_ECHO_WORDS[language])
    for adjective in _ADJECTIVES[language]:
        if language == "de":
            payloads += [f"{adjective}{ending} {noun}" for noun, ending in _NOUNS_DE]
        else:
            payloads += [f"{adjective} {noun}" for noun in _NOUNS_EN]
    return payloads


def _anti_echo_items(language: str) -> Iterator[tuple[str, str, str]]:
    """(word not to repeat, question, answer): the question's own subject, or an unrelated echo word.

    Questions use the first template of their pattern. The question's own subject as the word to avoid
    is the contrast that matters: echoing it would be the wrong answer.
    """
    t = _TEMPLATES[language]
    colours = _colours(language, t["colour"][:1])
    capitals = _capitals(language, t["capital"][:1])
    for (question, answer), thing in zip(colours, _COLOURED):
        yield thing[1 if language == "de" else 0].split(" ")[-1], question, answer
    for (question, answer), country in zip(capitals, _COUNTRIES):
        yield country[1 if language == "de" else 0], question, answer
    questions = colours + capitals + _opposites(language, t["opposite"][:1])
    for k, word in enumerate(_ECHO_WORDS[language]):
        for question, answer in questions[k % 3 :: 3]:
            yield word, question, answer


def record_texts(records: Iterable[dict]) -> Iterator[str]:
    """The system, user and assistant texts of generated records (what a tokenizer is trained on)."""
    for record in records:
        if record.get("system"):
            yield record["system"]
        for message in record["messages"]:
            yield message["content"]


def write_jsonl(records: Iterable[dict], path: str | Path) -> int:
    """Write records as JSONL (UTF-8, one object a line) atomically; return the number written."""
    count = 0
    with atomic_file(path, "w") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
            count += 1
    return count