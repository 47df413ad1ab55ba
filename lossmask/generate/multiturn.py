"""Phase-4 "multiturn" data: conversations of two to four turns with clean boundaries and carried context.

One turn is a user message and the assistant's answer; every answer ends its block and hands back to the
user, so the model learns where a turn stops and that the next user message starts a new one.

Patterns (uniform):

- ``follow_up``: a question, then elliptical follow-ups ("And what about Spain?", "Und 7 plus 8?") that only
  make sense with the first question; 2-4 turns.
- ``clarification``: an underspecified question ("What is the capital?"); the assistant asks which country,
  animal or numbers are meant, the user says, the assistant answers; sometimes one follow-up; 2-3 turns.
- ``topic_switch``: unrelated questions and small talk one after the other, consecutive topics always
  different, later ones often announced ("Another question: ..."); each answer ignores the earlier topic;
  2-4 turns.
- ``carry_over``: turn 1 gives a name and city or a favourite number, one or two unrelated turns follow, and
  the last turn needs the fact from turn 1 ("Where do I live?", "What is my favourite number plus 3?"); 3-4
  turns. ``_meta.carry_fact`` is that fact (it is in the first user message and in the last answer, never in
  the last question), ``carry_from_turn`` is 1 and ``carry_to_turn`` the last turn.

Facts come from ``chat.facts`` (the phase-3 table). ``_meta.turns`` counts user/assistant turns.

Held-out split: the key is every user message of the conversation joined by newlines; so the user side of a
held-out conversation never occurs in training as a whole (single messages like "And Spain?" may).
"""
from __future__ import annotations

import random
from collections.abc import Iterable
from functools import partial

from lossmask.generate.chat import (
    ANIMALS,
    COUNTRIES,
    COUNTRY_ATTRIBUTES,
    PEOPLE,
    Fact,
    animal_fact,
    arithmetic_fact,
    country_fact,
    facts,
    smalltalk_space,
    upper_first,
)
from lossmask.generate.format_lock import LANGUAGES, check_request
from lossmask.generate.prompts import draw_on_side, record, system_prompt

PATTERNS: tuple[str, ...] = ("follow_up", "clarification", "topic_switch", "carry_over")

Turns = list[tuple[str, str]]

_FOLLOW_UP = {
    "en": ("And what about {x}?", "And {x}?", "What about {x}?", "How about {x}?"),
    "de": ("Und was ist mit {dat}?", "Und {x}?", "Und wie sieht es mit {dat} aus?"),
}
_AMBIGUOUS = {
    "en": {
        "capital": ("What is the capital?", "Can you tell me the capital?"),
        "continent": ("Which continent is it on?", "On which continent is it?"),
        "language": ("What language do they speak there?", "Which language is spoken there?"),
        "legs": ("How many legs does it have?", "Do you know how many legs it has?"),
        "plus": ("Can you add two numbers for me?", "Please add two numbers for me."),
        "times": ("Can you multiply two numbers for me?", "Please multiply two numbers for me."),
    },
    "de": {
        "capital": ("Was ist die Hauptstadt?", "Kannst du mir die Hauptstadt sagen?"),
        "continent": ("Auf welchem Kontinent liegt es?", "In welchem Erdteil liegt das?"),
        "language": ("Welche Sprache spricht man dort?", "Welche Sprache wird dort gesprochen?"),
        "legs": ("Wie viele Beine hat es?", "Weißt du, wie viele Beine es hat?"),
        "plus": ("Kannst du zwei Zahlen für mich addieren?", "Bitte addiere zwei Zahlen für mich."),
        "times": ("Kannst du zwei Zahlen für mich multiplizieren?", "Bitte multipliziere zwei Zahlen für mich."),
    },
}
_CLARIFY = {
    "en": {"country": ("Which country do you mean?", "Which country are you asking about?"),
           "animal": ("Which animal do you mean?", "Which animal are you asking about?"),
           "numbers": ("Sure, which numbers?", "Of course. Which two numbers?")},
    "de": {"country": ("Welches Land meinst du?", "Um welches Land geht es?"),
           "animal": ("Welches Tier meinst du?", "Um welches Tier geht es?"),
           "numbers": ("Gern, welche Zahlen?", "Klar. Welche zwei Zahlen?")},
}
_SPECIFY = {
    "en": {"country": ("{x}.", "I mean {x}.", "{x}, please."), "animal": ("{X}.", "I mean {x}."),
           "numbers": ("{a} and {b}.", "The numbers {a} and {b}.")},
    "de": {"country": ("{x}.", "Ich meine {x}.", "{x}, bitte."), "animal": ("{X}.", "Ich frage nach {dat}."),
           "numbers": ("{a} und {b}.", "Die Zahlen {a} und {b}.")},
}
_SWITCH = {
    "en": ("", "Another question: ", "Different topic: ", "Something else: ", "New question: "),
    "de": ("", "Andere Frage: ", "Anderes Thema: ", "Noch etwas: ", "Neue Frage: "),
}
# (EN, DE)
_CITIES = (
    ("Graz", "Graz"), ("Leeds", "Leeds"), ("Bremen", "Bremen"), ("Porto", "Porto"), ("Lyon", "Lyon"),
    ("Turin", "Turin"), ("Basel", "Basel"), ("Bergen", "Bergen"), ("Malmö", "Malmö"), ("Cork", "Cork"),
    ("Utrecht", "Utrecht"), ("Ghent", "Gent"), ("Kraków", "Krakau"), ("Seville", "Sevilla"), ("Munich", "München"),
    ("Cologne", "Köln"), ("Zurich", "Zürich"), ("Salzburg", "Salzburg"), ("Leipzig", "Leipzig"), ("Bologna", "Bologna"),
)
_INTRO = {
    "en": {"person": (("Hi, I'm {name} and I live in {city}.", "Hello! My name is {name}, and I live in {city}."),
                      "Nice to meet you, {name}! How can I help you?"),
           "number": (("My favourite number is {k}. Please remember it.", "Remember this: my favourite number is {k}."),
                      "Got it, your favourite number is {k}.")},
    "de": {"person": (("Hallo, ich bin {name} und wohne in {city}.", "Hi! Ich heiße {name} und lebe in {city}."),
                      "Schön, dich kennenzulernen, {name}! Wie kann ich dir helfen?"),
           "number": (("Meine Lieblingszahl ist {k}. Merk sie dir bitte.", "Merk dir: Meine Lieblingszahl ist {k}."),
                      "Alles klar, deine Lieblingszahl ist {k}.")},
}
_RECALL = {
    "en": {"name": (("What's my name?", "Do you remember my name?"), "Your name is {name}."),
           "city": (("Where do I live?", "Do you remember where I live?"), "You live in {city}."),
           "number": (("What is my favourite number plus {m}?", "Can you add {m} to my favourite number?"),
                      "Your favourite number is {k}, so {k} plus {m} is {r}.")},
    "de": {"name": (("Wie heiße ich?", "Weißt du noch, wie ich heiße?"), "Du heißt {name}."),
           "city": (("Wo wohne ich?", "Weißt du noch, wo ich wohne?"), "Du wohnst in {city}."),
           "number": (("Was ist meine Lieblingszahl plus {m}?", "Kannst du {m} zu meiner Lieblingszahl addieren?"),
                      "Deine Lieblingszahl ist {k}, also ist {k} plus {m} gleich {r}.")},
}


def generate_multiturn(
    n: int, seed: int, languages: Iterable[str] = LANGUAGES, held_out: bool = False
) -> list[dict]:
    """``n`` conversations of 2-4 turns (patterns and split in the module docstring)."""
    langs = check_request("multiturn", n, languages)
    rng = random.Random(f"multiturn\0{seed}\0{held_out}")
    records = []
    for i in range(n):
        lang = langs[i % len(langs)]
        pattern = rng.choice(PATTERNS)
        turns, extra = draw_on_side(partial(_BUILDERS[pattern], lang, rng), _user_side, held_out, "multiturn")
        messages = [
            {"role": role, "content": text} for user, answer in turns for role, text in (("user", user), ("assistant", answer))
        ]
        meta = {"generator": "multiturn", "phase": "4", "pattern": pattern, "turns": len(turns),
                "expected_language": lang, **extra}
        records.append(record(system_prompt("medium", lang, rng), messages, lang, meta, held_out))
    return records


def _user_side(item: tuple[Turns, dict]) -> str:
    """The held-out key: every user message, one a line."""
    return "\n".join(user for user, _ in item[0])


def _follow_up(lang: str, rng: random.Random) -> tuple[Turns, dict]:
    k = rng.randint(2, 4)
    topic = rng.choice(("country", "animal", "arithmetic"))
    if topic == "country":
        attribute = rng.choice(COUNTRY_ATTRIBUTES)
        chosen = rng.sample(COUNTRIES, k)
        items = [(country_fact(c, attribute), c[1] if lang == "de" else c[0]) for c in chosen]
        refs = [{"x": name, "dat": name} for _, name in items]
    elif topic == "animal":
        chosen = rng.sample(ANIMALS, k)
        items = [(animal_fact(a), a[1] if lang == "de" else a[0]) for a in chosen]
        refs = [{"x": name, "dat": _dative(name)} for _, name in items]
    else:
        op, a = rng.choice((0, 2)), rng.randint(1, 12)
        items = [(arithmetic_fact(a, op, b), "") for b in rng.sample(range(13), k)]
        refs = [{"x": ref, "dat": ref} for ref in (_arithmetic_ref(fact, lang) for fact, _ in items)]
    first, _ = items[0]
    turns = [(rng.choice(first.questions[lang]), first.answer(lang))]
    for (fact, _), ref in zip(items[1:], refs[1:]):
        turns.append((rng.choice(_FOLLOW_UP[lang]).format(**ref), fact.answer(lang, 1)))
    return turns, {"topic": topic}


def _clarification(lang: str, rng: random.Random) -> tuple[Turns, dict]:
    what = rng.choice(("country", "animal", "numbers"))
    if what == "country":
        attribute = rng.choice(COUNTRY_ATTRIBUTES)
        country = rng.choice(COUNTRIES)
        name = country[1] if lang == "de" else country[0]
        fact, slots = country_fact(country, attribute), {"x": name}
        vague = _AMBIGUOUS[lang][attribute]
    elif what == "animal":
        animal = rng.choice(ANIMALS)
        name = animal[1] if lang == "de" else animal[0]
        fact, slots = animal_fact(animal), {"x": name, "X": upper_first(name), "dat": _dative(name)}
        vague = _AMBIGUOUS[lang]["legs"]
    else:
        op = rng.choice((0, 2))
        a, b = rng.randint(0, 12), rng.randint(0, 12)
        fact, slots = arithmetic_fact(a, op, b), {"a": a, "b": b}
        vague = _AMBIGUOUS[lang]["plus" if op == 0 else "times"]
    turns = [
        (rng.choice(vague), rng.choice(_CLARIFY[lang][what])),
        (rng.choice(_SPECIFY[lang][what]).format(**slots), fact.answer(lang)),
    ]
    if what == "country" and rng.random() < 0.4:
        other = rng.choice([c for c in COUNTRIES if c != country])
        other_name = other[1] if lang == "de" else other[0]
        question = rng.choice(_FOLLOW_UP[lang]).format(x=other_name, dat=other_name)
        turns.append((question, country_fact(other, attribute).answer(lang, 1)))
    return turns, {"clarified": what}


def _topic_switch(lang: str, rng: random.Random) -> tuple[Turns, dict]:
    topics: list[str] = []
    turns: Turns = []
    for k in range(rng.randint(2, 4)):
        topic = rng.choice([t for t in ("country", "animal", "general", "arithmetic", "smalltalk") if not topics
                            or t != topics[-1]])
        topics.append(topic)
        if topic == "smalltalk":
            turns.append(rng.choice(smalltalk_space(lang)))
            continue
        fact = rng.choice(facts()[topic])
        prefix = rng.choice(_SWITCH[lang]) if k else ""
        turns.append((prefix + rng.choice(fact.questions[lang]), fact.answer(lang)))
    return turns, {"topics": topics}


def _carry_over(lang: str, rng: random.Random) -> tuple[Turns, dict]:
    kind = rng.choice(("name", "city", "number"))
    slots: dict = {"name": rng.choice(PEOPLE), "city": rng.choice(_CITIES)[1 if lang == "de" else 0]}
    if kind == "number":
        slots["k"] = rng.randint(2, 99)
        slots["m"] = rng.choice([m for m in range(1, 21) if str(slots["k"]) not in str(m)])
        slots["r"] = slots["k"] + slots["m"]
    intro_prompts, intro_answer = _INTRO[lang]["number" if kind == "number" else "person"]
    turns = [(rng.choice(intro_prompts).format(**slots), intro_answer.format(**slots))]
    for _ in range(rng.randint(1, 2)):
        fact = _other_fact(rng)
        turns.append((rng.choice(fact.questions[lang]), fact.answer(lang)))
    recall_prompts, recall_answer = _RECALL[lang][kind]
    turns.append((rng.choice(recall_prompts).format(**slots), recall_answer.format(**slots)))
    carried = str(slots["k"] if kind == "number" else slots[kind])
    return turns, {"carry_kind": kind, "carry_fact": carried, "carry_from_turn": 1, "carry_to_turn": len(turns)}


def _other_fact(rng: random.Random) -> Fact:
    table = facts()
    return rng.choice(table[rng.choice(("country", "animal", "general"))])


def _arithmetic_ref(fact: Fact, lang: str) -> str:
    """ "7 plus 8" from an arithmetic fact's answer ("7 plus 8 is 15.")."""
    return fact.sentences[lang][0].rsplit(" ", 2)[0]


def _dative(noun_phrase: str) -> str:
    """German indefinite article in the dative: ein -> einem, eine -> einer (nouns stay as they are)."""
    article, _, noun = noun_phrase.partition(" ")
    return {"ein": "einem", "eine": "einer"}.get(article, article) + " " + noun


_BUILDERS = {
    "follow_up": _follow_up,
    "clarification": _clarification,
    "topic_switch": _topic_switch,
    "carry_over": _carry_over,
}
