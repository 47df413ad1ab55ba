"""Phase-2 "operators" data: COPY, WRAP and EXTRACT applied to payloads the model has never seen.

After format lock the model answers, but mostly from memory. Operators make the answer a function of the
prompt: copy the payload, wrap it in the brackets the instruction names, or pull one part out of a
sentence. The payload is random, so the only way to the right answer is to read it.

- COPY: "Copy exactly: <payload>" -> payload.
- WRAP: square brackets, parentheses, double quotes or curly braces, named in the instruction
  ("Wrap in parentheses: <payload>" -> "(payload)").
- EXTRACT: the number in a sentence (number payloads only), the text in double quotes, or the part after
  the colon of a "Label: payload" line (on its own line under the instruction).

Payloads come from a combinatorial generator (``make_payload``): nouns and adjective + noun pairs of the
language (German adjectives inflected for the noun's gender), "X and Y" phrases, numbers (10 to 9,999,999),
codes like "XK-4821" and pronounceable nonsense words. No payload holds a double quote, a colon or a newline,
so every EXTRACT has exactly one answer.

Contrast: episodes come in groups of three, one payload under all three operators in a shuffled order, next
to each other in the output (``_meta.group`` numbers the groups). The model sees the same payload answered
three ways, so the instruction, not the payload, decides the answer. A group shares one language; languages
take turns by group.

Held-out split: a payload is held out when ``format_lock.is_held_out(payload)`` (a hash of its text, 1 in
``HELD_OUT_EVERY``); payloads are redrawn until they fall on the requested side, so no training seed ever
produces a held-out payload. Records carry ``_meta`` operator, payload, expected (the answer), variant,
payload_kind and group.
"""
from __future__ import annotations

import random
from collections.abc import Iterable
from functools import partial

from lossmask.generate.format_lock import LANGUAGES, check_request
from lossmask.generate.prompts import draw_on_side, record, system_prompt

OPERATORS: tuple[str, ...] = ("COPY", "WRAP", "EXTRACT")
PAYLOAD_KINDS: tuple[str, ...] = ("word", "pair", "phrase", "number", "code", "nonce")
WRAPPERS: dict[str, tuple[str, str]] = {
    "square": ("[", "]"), "round": ("(", ")"), "quotes": ('"', '"'), "curly": ("{", "}"),
}

_NOUNS_EN = (
    "lamp", "river", "garden", "window", "rocket", "candle", "mirror", "forest", "pencil", "ladder",
    "bottle", "island", "castle", "bridge", "violin", "tiger", "cloud", "anchor", "basket", "helmet",
    "jacket", "kettle", "lemon", "magnet", "needle", "orange", "pillow", "rabbit", "saddle", "tunnel",
)
# German nouns with the ending an undeclined adjective takes before them: -er (m), -e (f), -es (n)
_NOUNS_DE = (
    ("Lampe", "e"), ("Fluss", "er"), ("Garten", "er"), ("Fenster", "es"), ("Rakete", "e"), ("Kerze", "e"),
    ("Spiegel", "er"), ("Wald", "er"), ("Bleistift", "er"), ("Leiter", "e"), ("Flasche", "e"), ("Insel", "e"),
    ("Schloss", "es"), ("Brücke", "e"), ("Geige", "e"), ("Tiger", "er"), ("Wolke", "e"), ("Anker", "er"),
    ("Korb", "er"), ("Helm", "er"), ("Jacke", "e"), ("Kessel", "er"), ("Zitrone", "e"), ("Magnet", "er"),
    ("Nadel", "e"), ("Kissen", "es"), ("Hase", "er"), ("Sattel", "er"), ("Tunnel", "er"), ("Boot", "es"),
)
_ADJECTIVES = {
    "en": ("red", "green", "blue", "old", "new", "small", "big", "fast", "warm", "cold", "bright", "wild",
           "quiet", "young", "round", "soft"),
    "de": ("rot", "grün", "blau", "alt", "neu", "klein", "groß", "schnell", "warm", "kalt", "hell", "wild",
           "still", "jung", "rund", "weich"),
}
_AND = {"en": "and", "de": "und"}
_SYLLABLES = ("ka", "lo", "mi", "ra", "ve", "to", "na", "sel", "dor", "bri", "fen", "gal", "hol", "mar", "tis",
              "wen", "lun", "pra", "zu", "kel", "bo", "ri", "dan", "sum", "ix", "or")
_LETTERS = "ABCDEFGHJKLMNPQRSTUVWXYZ"

_COPY = {
    "en": ("Copy exactly: {p}", "Repeat exactly: {p}", "Write this back unchanged: {p}", "Copy this text: {p}"),
    "de": ("Kopiere genau: {p}", "Wiederhole exakt: {p}", "Gib das unverändert zurück: {p}",
           "Kopiere diesen Text: {p}"),
}
_WRAP = {
    "en": {
        "square": ("Wrap in brackets: {p}", "Wrap in square brackets: {p}", "Put square brackets around: {p}"),
        "round": ("Wrap in parentheses: {p}", "Put parentheses around: {p}"),
        "quotes": ("Wrap in double quotes: {p}", "Put double quotes around: {p}"),
        "curly": ("Wrap in curly braces: {p}", "Put curly braces around: {p}"),
    },
    "de": {
        "square": ("Setze in eckige Klammern: {p}", "Schreib in eckigen Klammern: {p}"),
        "round": ("Setze in runde Klammern: {p}", "Schreib in runden Klammern: {p}"),
        "quotes": ("Setze in Anführungszeichen: {p}", "Schreib in Anführungszeichen: {p}"),
        "curly": ("Setze in geschweifte Klammern: {p}", "Schreib in geschweiften Klammern: {p}"),
    },
}
# EXTRACT: (instruction templates with {t}, carrier texts with {p}) per variant
_EXTRACT = {
    "en": {
        "number": (
            ("Extract the number from: {t}", "Which number is in this sentence? {t}", "Give only the number in: {t}"),
            ("The box holds {p} apples.", "We counted {p} birds on the lake.", "The hall has room for {p} guests.",
             "The parcel travelled {p} kilometres."),
        ),
        "quotes": (
            ("Extract the text in quotes from: {t}", "What is written in quotes here? {t}",
             "Give only the part in quotes: {t}"),
            ('The sign says "{p}" in big letters.', 'She wrote "{p}" on the board.', 'The note only said "{p}".',
             'He answered "{p}" and left.'),
        ),
        "colon": (
            ("Extract the part after the colon:\n{t}", "Give only what follows the colon:\n{t}"),
            ("Code: {p}", "Name: {p}", "Answer: {p}", "Value: {p}", "Key: {p}", "Result: {p}"),
        ),
    },
    "de": {
        "number": (
            ("Extrahiere die Zahl aus: {t}", "Welche Zahl steht in diesem Satz? {t}", "Gib nur die Zahl aus: {t}"),
            ("Die Kiste enthält {p} Äpfel.", "Wir haben {p} Vögel auf dem See gezählt.",
             "Der Saal bietet Platz für {p} Gäste.", "Das Paket reiste {p} Kilometer weit."),
        ),
        "quotes": (
            ("Extrahiere den Text in Anführungszeichen aus: {t}", "Was steht hier in Anführungszeichen? {t}",
             "Gib nur den Teil in Anführungszeichen aus: {t}"),
            ('Auf dem Schild steht "{p}" in großen Buchstaben.', 'Sie schrieb "{p}" an die Tafel.',
             'Auf dem Zettel stand nur "{p}".', 'Er antwortete "{p}" und ging.'),
        ),
        "colon": (
            ("Extrahiere den Teil nach dem Doppelpunkt:\n{t}", "Gib nur aus, was nach dem Doppelpunkt steht:\n{t}"),
            ("Code: {p}", "Name: {p}", "Antwort: {p}", "Wert: {p}", "Schlüssel: {p}", "Ergebnis: {p}"),
        ),
    },
}


def generate_operators(
    n: int, seed: int, languages: Iterable[str] = LANGUAGES, held_out: bool = False
) -> list[dict]:
    """``n`` operator episodes in contrastive groups of three (see the module docstring)."""
    langs = check_request("operators", n, languages)
    rng = random.Random(f"operators\0{seed}\0{held_out}")
    records: list[dict] = []
    group = 0
    while len(records) < n:
        lang = langs[group % len(langs)]
        kind, payload = draw_on_side(partial(make_payload, lang, rng), lambda item: item[1], held_out, "operators")
        order = list(OPERATORS)
        rng.shuffle(order)
        for operator in order[: n - len(records)]:
            prompt, expected, variant = apply_operator(operator, kind, payload, lang, rng)
            meta = {
                "generator": "operators",
                "phase": "2",
                "pattern": f"{operator.lower()}_{variant}" if variant else operator.lower(),
                "operator": operator,
                "variant": variant,
                "payload": payload,
                "payload_kind": kind,
                "expected": expected,
                "group": group,
            }
            messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": expected}]
            records.append(record(system_prompt("short", lang, rng), messages, lang, meta, held_out))
        group += 1
    return records


def make_payload(language: str, rng: random.Random) -> tuple[str, str]:
    """(kind, payload): one random payload of a random kind; words follow ``language``."""
    kind = rng.choice(PAYLOAD_KINDS)
    if kind == "word":
        return kind, _noun(language, rng)[0]
    if kind == "pair":
        return kind, _adjective_noun(language, rng)
    if kind == "phrase":
        return kind, f"{_adjective_noun(language, rng)} {_AND[language]} {_noun(language, rng)[0]}"
    if kind == "number":
        return kind, str(rng.randint(10, 10 ** rng.randint(2, 7) - 1))
    if kind == "code":
        return kind, _code(rng)
    word = "".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(2, 4)))
    return kind, word.capitalize() if rng.random() < 0.5 else word


def apply_operator(
    operator: str, kind: str, payload: str, language: str, rng: random.Random
) -> tuple[str, str, str | None]:
    """(instruction, expected answer, variant) for one operator on one payload."""
    if operator == "COPY":
        return rng.choice(_COPY[language]).format(p=payload), payload, None
    if operator == "WRAP":
        wrapper = rng.choice(tuple(WRAPPERS))
        left, right = WRAPPERS[wrapper]
        return rng.choice(_WRAP[language][wrapper]).format(p=payload), f"{left}{payload}{right}", wrapper
    variant = rng.choice(("number", "quotes", "colon") if kind == "number" else ("quotes", "colon"))
    instructions, carriers = _EXTRACT[language][variant]
    text = rng.choice(carriers).format(p=payload)
    return rng.choice(instructions).format(t=text), payload, variant


def _noun(language: str, rng: random.Random) -> tuple[str, str]:
    """(noun, German adjective ending; "" in English)."""
    if language == "de":
        return rng.choice(_NOUNS_DE)
    return rng.choice(_NOUNS_EN), ""


def _adjective_noun(language: str, rng: random.Random) -> str:
    noun, ending = _noun(language, rng)
    return f"{rng.choice(_ADJECTIVES[language])}{ending} {noun}"


def _code(rng: random.Random) -> str:
    """A product-style code: "XK-4821", "B7K-305" or "QRT58"."""

    def letters(k: int) -> str:
        return "".join(rng.choice(_LETTERS) for _ in range(k))

    def digits(k: int) -> str:
        return "".join(rng.choice("0123456789") for _ in range(k))

    shape = rng.randrange(3)
    if shape == 0:
        return f"{letters(2)}-{digits(4)}"
    if shape == 1:
        return f"{letters(1)}{digits(1)}{letters(1)}-{digits(3)}"
    return f"{letters(3)}{digits(2)}"
