"""Phase-3 "chat" data: natural English and German chat, system prompt rules, and retrieval with citations.

Patterns (drawn with ``PATTERN_WEIGHTS``):

- ``smalltalk``: greetings, thanks, moods, "who are you"; answers of one or two sentences.
- ``knowledge``: simple questions from a bilingual fact table (``facts``: capitals, continents, languages,
  animal legs, everyday facts, arithmetic); the answer is one or two sentences in the user's language.
- ``system_rule``: a knowledge question under a system prompt with a rule the answer obeys
  (``_meta.system_rule``): ``one_sentence`` (only the first sentence of a two-sentence answer),
  ``answer_in_en``/``answer_in_de`` (the answer in that language, whatever the user writes), ``start_with``
  (the answer starts with ``_meta.required_prefix``, e.g. "Sure:").
- ``retrieval``: the user message carries ``context``: one to three short documents about made-up places,
  bridges, lakes and companies, each headed ``[doc:ID]``. The question asks about one of them; the answer
  states the fact from the context (``_meta.answer_fact`` appears in both), ``cite`` names the document id,
  and 40% of answers start with a one-line ``think`` saying which document answers what. The entities are
  invented, so the answer can only come from the context.
- ``echo`` (repeat a sentence exactly) and ``anti_echo`` (answer a question the user asks not to repeat).

Gate fields in ``_meta``: ``has_context``, ``cited_docs`` ([] without context), ``expected_language`` (the
language of the answer: the user's, unless a rule says otherwise), ``system_rule`` (None without one),
``fact`` (the fact table key behind the answer, None for smalltalk, echo and retrieval).

Held-out split: the key is the question for the knowledge-based patterns and retrieval (so a held-out
question stays held out under every rule and prefix), and the whole user message for smalltalk and echo;
``format_lock.is_held_out(key)`` decides (see ``prompts``). Format-lock prompts that are also chat questions
fall on the same side in both phases.
"""
from __future__ import annotations

import random
import re
from collections.abc import Iterable
from dataclasses import dataclass
from functools import lru_cache

from lossmask.generate.format_lock import LANGUAGES, check_request
from lossmask.generate.prompts import draw_on_side, record, system_prompt

PATTERN_WEIGHTS: dict[str, float] = {
    "smalltalk": 0.15,
    "knowledge": 0.25,
    "system_rule": 0.20,
    "retrieval": 0.30,
    "echo": 0.05,
    "anti_echo": 0.05,
}
THINK_SHARE = 0.4
SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


@dataclass(frozen=True)
class Fact:
    """One answerable fact in both languages; ``sentences[lang][0]`` alone answers the question."""

    key: str
    topic: str
    questions: dict[str, tuple[str, ...]]
    sentences: dict[str, tuple[str, ...]]

    def answer(self, language: str, first: int | None = None) -> str:
        """The answer in ``language``: all its sentences, or only the ``first`` ones."""
        return " ".join(self.sentences[language][:first])


@dataclass(frozen=True)
class Entity:
    """A made-up thing described by a short document; ``qa`` holds (question, answer, fact) triples."""

    doc_id: str
    name: str
    subject: str  # how the think line names it ("the Velmora Bridge", German in the accusative)
    text: str
    qa: tuple[tuple[str, str, str], ...]


# (EN, DE, capital EN, capital DE, continent EN, continent DE, language EN, language DE)
COUNTRIES: tuple[tuple[str, ...], ...] = (
    ("France", "Frankreich", "Paris", "Paris", "Europe", "Europa", "French", "Französisch"),
    ("Germany", "Deutschland", "Berlin", "Berlin", "Europe", "Europa", "German", "Deutsch"),
    ("Italy", "Italien", "Rome", "Rom", "Europe", "Europa", "Italian", "Italienisch"),
    ("Spain", "Spanien", "Madrid", "Madrid", "Europe", "Europa", "Spanish", "Spanisch"),
    ("Austria", "Österreich", "Vienna", "Wien", "Europe", "Europa", "German", "Deutsch"),
    ("Poland", "Polen", "Warsaw", "Warschau", "Europe", "Europa", "Polish", "Polnisch"),
    ("Greece", "Griechenland", "Athens", "Athen", "Europe", "Europa", "Greek", "Griechisch"),
    ("Portugal", "Portugal", "Lisbon", "Lissabon", "Europe", "Europa", "Portuguese", "Portugiesisch"),
    ("Norway", "Norwegen", "Oslo", "Oslo", "Europe", "Europa", "Norwegian", "Norwegisch"),
    ("Sweden", "Schweden", "Stockholm", "Stockholm", "Europe", "Europa", "Swedish", "Schwedisch"),
    ("Finland", "Finnland", "Helsinki", "Helsinki", "Europe", "Europa", "Finnish", "Finnisch"),
    ("Denmark", "Dänemark", "Copenhagen", "Kopenhagen", "Europe", "Europa", "Danish", "Dänisch"),
    ("Hungary", "Ungarn", "Budapest", "Budapest", "Europe", "Europa", "Hungarian", "Ungarisch"),
    ("Czechia", "Tschechien", "Prague", "Prag", "Europe", "Europa", "Czech", "Tschechisch"),
    ("Japan", "Japan", "Tokyo", "Tokio", "Asia", "Asien", "Japanese", "Japanisch"),
    ("China", "China", "Beijing", "Peking", "Asia", "Asien", "Chinese", "Chinesisch"),
    ("South Korea", "Südkorea", "Seoul", "Seoul", "Asia", "Asien", "Korean", "Koreanisch"),
    ("India", "Indien", "New Delhi", "Neu-Delhi", "Asia", "Asien", "Hindi and English", "Hindi und Englisch"),
    ("Egypt", "Ägypten", "Cairo", "Kairo", "Africa", "Afrika", "Arabic", "Arabisch"),
    ("Kenya", "Kenia", "Nairobi", "Nairobi", "Africa", "Afrika", "Swahili and English", "Suaheli und Englisch"),
    ("Canada", "Kanada", "Ottawa", "Ottawa", "North America", "Nordamerika", "English and French",
     "Englisch und Französisch"),
    ("Mexico", "Mexiko", "Mexico City", "Mexiko-Stadt", "North America", "Nordamerika", "Spanish", "Spanisch"),
    ("Cuba", "Kuba", "Havana", "Havanna", "North America", "Nordamerika", "Spanish", "Spanisch"),
    ("Brazil", "Brasilien", "Brasília", "Brasília", "South America", "Südamerika", "Portuguese", "Portugiesisch"),
    ("Peru", "Peru", "Lima", "Lima", "South America", "Südamerika", "Spanish", "Spanisch"),
    ("Argentina", "Argentinien", "Buenos Aires", "Buenos Aires", "South America", "Südamerika", "Spanish",
     "Spanisch"),
    ("Australia", "Australien", "Canberra", "Canberra", "Oceania", "Ozeanien", "English", "Englisch"),
)
COUNTRY_ATTRIBUTES: tuple[str, ...] = ("capital", "continent", "language")

# (EN with article, DE with article in the nominative, legs)
ANIMALS: tuple[tuple[str, str, int], ...] = (
    ("a dog", "ein Hund", 4), ("a cat", "eine Katze", 4), ("a horse", "ein Pferd", 4), ("a cow", "eine Kuh", 4),
    ("a frog", "ein Frosch", 4), ("a mouse", "eine Maus", 4), ("a fox", "ein Fuchs", 4),
    ("a spider", "eine Spinne", 8), ("an ant", "eine Ameise", 6), ("a bee", "eine Biene", 6),
    ("a beetle", "ein Käfer", 6), ("a fly", "eine Fliege", 6), ("a chicken", "ein Huhn", 2),
    ("a duck", "eine Ente", 2), ("an owl", "eine Eule", 2),
)
_NUMBER_WORDS = {"en": {2: "two", 4: "four", 6: "six", 8: "eight"}, "de": {2: "zwei", 4: "vier", 6: "sechs", 8: "acht"}}

# key: (EN questions, EN sentences, DE questions, DE sentences)
_GENERAL: dict[str, tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...], tuple[str, ...]]] = {
    "week": (("How many days does a week have?", "How many days are in a week?"), ("A week has seven days.",),
             ("Wie viele Tage hat eine Woche?",), ("Eine Woche hat sieben Tage.",)),
    "year": (("How many months are in a year?",), ("A year has twelve months.",),
             ("Wie viele Monate hat ein Jahr?",), ("Ein Jahr hat zwölf Monate.",)),
    "day": (("How many hours does a day have?",), ("A day has 24 hours.",),
            ("Wie viele Stunden hat ein Tag?",), ("Ein Tag hat 24 Stunden.",)),
    "hour": (("How many minutes are in an hour?",), ("An hour has 60 minutes.",),
             ("Wie viele Minuten hat eine Stunde?",), ("Eine Stunde hat 60 Minuten.",)),
    "boil": (("At what temperature does water boil?",), ("At sea level, water boils at 100 degrees Celsius.",),
             ("Bei welcher Temperatur kocht Wasser?",), ("Auf Meereshöhe kocht Wasser bei 100 Grad Celsius.",)),
    "freeze": (("At what temperature does water freeze?",), ("Water freezes at 0 degrees Celsius.",),
               ("Bei welcher Temperatur gefriert Wasser?",), ("Wasser gefriert bei 0 Grad Celsius.",)),
    "planet": (("What is the largest planet in our solar system?",),
               ("Jupiter is the largest planet in our solar system.",),
               ("Was ist der größte Planet unseres Sonnensystems?",),
               ("Jupiter ist der größte Planet unseres Sonnensystems.",)),
    "continents": (("How many continents are there?",), ("There are seven continents.",),
                   ("Wie viele Kontinente gibt es?",), ("Es gibt sieben Kontinente.",)),
    "bees": (("What do bees make?",), ("Bees make honey.", "They also make wax."),
             ("Was machen Bienen?",), ("Bienen machen Honig.", "Außerdem stellen sie Wachs her.")),
    "green": (("What colour do you get when you mix blue and yellow?",), ("Mixing blue and yellow gives green.",),
              ("Welche Farbe entsteht, wenn man Blau und Gelb mischt?",), ("Blau und Gelb gemischt ergeben Grün.",)),
    "triangle": (("How many sides does a triangle have?",), ("A triangle has three sides.",),
                 ("Wie viele Seiten hat ein Dreieck?",), ("Ein Dreieck hat drei Seiten.",)),
    "plants": (("What gas do plants take in from the air?",),
               ("Plants take in carbon dioxide from the air.", "In return, they release oxygen."),
               ("Welches Gas nehmen Pflanzen aus der Luft auf?",),
               ("Pflanzen nehmen Kohlendioxid aus der Luft auf.", "Dafür geben sie Sauerstoff ab.")),
    "faust": (("Who wrote Faust?",), ("Faust was written by Johann Wolfgang von Goethe.",),
              ("Wer hat den Faust geschrieben?",), ("Den Faust hat Johann Wolfgang von Goethe geschrieben.",)),
    "football": (("How many players does a football team have on the field?",),
                 ("A football team has eleven players on the field.",),
                 ("Wie viele Spieler hat eine Fußballmannschaft auf dem Feld?",),
                 ("Eine Fußballmannschaft hat elf Spieler auf dem Feld.",)),
    "sun": (("What is the closest star to Earth?",), ("The closest star to Earth is the Sun.",),
            ("Welcher Stern ist der Erde am nächsten?",), ("Die Sonne ist der Stern, der der Erde am nächsten ist.",)),
    "rainbow": (("How many colours does a rainbow have?",), ("A rainbow is usually described with seven colours.",),
                ("Wie viele Farben hat ein Regenbogen?",), ("Ein Regenbogen wird meist mit sieben Farben beschrieben.",)),
}

_COUNTRY_QUESTIONS = {
    "en": {
        "capital": ("What is the capital of {c}?", "Which city is the capital of {c}?",
                    "Do you know the capital of {c}?"),
        "continent": ("On which continent is {c}?", "Which continent is {c} on?"),
        "language": ("What language do people speak in {c}?", "Which language is spoken in {c}?"),
    },
    "de": {
        "capital": ("Was ist die Hauptstadt von {c}?", "Welche Stadt ist die Hauptstadt von {c}?",
                    "Weißt du, was die Hauptstadt von {c} ist?"),
        "continent": ("Auf welchem Kontinent liegt {c}?", "In welchem Erdteil liegt {c}?"),
        "language": ("Welche Sprache spricht man in {c}?", "Welche Sprache wird in {c} gesprochen?"),
    },
}
_COUNTRY_SENTENCES = {
    "en": {
        "capital": ("The capital of {c} is {cap}.", "{cap} is in {cont}."),
        "continent": ("{c} is in {cont}.", "Its capital is {cap}."),
        "language": ("In {c}, people mainly speak {lang}.",),
    },
    "de": {
        "capital": ("Die Hauptstadt von {c} ist {cap}.", "{cap} liegt in {cont}."),
        "continent": ("{c} liegt in {cont}.", "Die Hauptstadt ist {cap}."),
        "language": ("In {c} spricht man hauptsächlich {lang}.",),
    },
}
_ARITHMETIC = {
    "en": (("plus", lambda a, b: a + b), ("minus", lambda a, b: a - b), ("times", lambda a, b: a * b)),
    "de": (("plus", lambda a, b: a + b), ("minus", lambda a, b: a - b), ("mal", lambda a, b: a * b)),
}
_ARITHMETIC_QUESTIONS = {
    "en": ("What is {a} {op} {b}?", "How much is {a} {op} {b}?", "Can you calculate {a} {op} {b}?"),
    "de": ("Was ist {a} {op} {b}?", "Wie viel ist {a} {op} {b}?", "Kannst du {a} {op} {b} ausrechnen?"),
}
_ARITHMETIC_SENTENCE = {"en": "{a} {op} {b} is {r}.", "de": "{a} {op} {b} ist {r}."}

PEOPLE: tuple[str, ...] = (
    "Lena", "Jonas", "Maria", "Tom", "Aylin", "Noah", "Emma", "Felix", "Sofia", "Paul", "Mia", "Ben", "Clara",
    "Luca", "Hannah", "Omar", "Nina", "David", "Ida", "Karim", "Greta", "Samuel", "Yara", "Elias",
)
_MOODS = {
    "en": {
        "happy": "That's great to hear! What made your day so good?",
        "tired": "I'm sorry to hear that. A short break or some fresh air might help.",
        "bored": "Let's change that! Would you like a fun fact or a quick quiz?",
        "nervous": "That's understandable. Do you want to tell me what is coming up?",
        "sad": "I'm sorry you're feeling sad. Do you want to talk about it?",
    },
    "de": {
        "glücklich": "Das freut mich zu hören! Was hat deinen Tag so schön gemacht?",
        "müde": "Das tut mir leid. Eine kurze Pause oder frische Luft könnte helfen.",
        "gelangweilt": "Das ändern wir! Möchtest du einen lustigen Fakt oder ein kleines Quiz?",
        "nervös": "Das ist verständlich. Magst du mir erzählen, was ansteht?",
        "traurig": "Es tut mir leid, dass du traurig bist. Möchtest du darüber reden?",
    },
}
# (user messages, answers): every user message pairs with every answer
_SMALLTALK = {
    "en": (
        (("Hi!", "Hello!", "Good morning!", "Hey there!", "Good evening!"),
         ("Hello! How can I help you today?", "Hi! What can I do for you?")),
        (("How are you?", "How are you doing today?", "How's it going?"),
         ("I'm doing well, thank you. How can I help you?", "Very well, thanks for asking! What can I do for you?")),
        (("What's your name?", "Who are you?", "What are you?"),
         ("I am MyPT, a helpful assistant.", "I'm MyPT, an assistant for English and German.")),
        (("Thank you!", "Thanks for your help.", "Thanks a lot!"),
         ("You're welcome! Let me know if you need anything else.", "Glad I could help!")),
        (("Goodbye!", "Bye, see you later.", "See you tomorrow!"),
         ("Goodbye! Have a nice day.", "See you! Take care.")),
        (("Can you speak German?", "Do you understand German?"),
         ("Yes, I can answer in English and German.", "Yes. Just write to me in German and I will answer in German.")),
    ),
    "de": (
        (("Hallo!", "Guten Morgen!", "Hi!", "Servus!", "Guten Abend!"),
         ("Hallo! Wie kann ich dir heute helfen?", "Hallo! Was kann ich für dich tun?")),
        (("Wie geht es dir?", "Wie geht's dir heute?", "Alles gut bei dir?"),
         ("Mir geht es gut, danke. Wie kann ich dir helfen?", "Sehr gut, danke der Nachfrage! Was kann ich für dich tun?")),
        (("Wie heißt du?", "Wer bist du?", "Was bist du?"),
         ("Ich bin MyPT, ein hilfreicher Assistent.", "Ich bin MyPT, ein Assistent für Deutsch und Englisch.")),
        (("Danke!", "Danke für deine Hilfe.", "Vielen Dank!"),
         ("Gern geschehen! Sag Bescheid, wenn du noch etwas brauchst.", "Freut mich, dass ich helfen konnte!")),
        (("Tschüss!", "Bis später!", "Bis morgen!"),
         ("Tschüss! Einen schönen Tag noch.", "Bis bald! Mach's gut.")),
        (("Sprichst du Englisch?", "Verstehst du Englisch?"),
         ("Ja, ich kann auf Deutsch und Englisch antworten.", "Ja. Schreib mir einfach auf Englisch, dann antworte ich auf Englisch.")),
    ),
}
_GREETING = {
    "en": (("Hi, I'm {x}.", "Hello, my name is {x}."), "Nice to meet you, {x}! How can I help you?"),
    "de": (("Hallo, ich bin {x}.", "Hi, ich heiße {x}."), "Schön, dich kennenzulernen, {x}! Wie kann ich dir helfen?"),
}
_MOOD_PROMPTS = {"en": ("I'm feeling {x} today.", "I am {x} today."), "de": ("Ich bin heute {x}.", "Ich fühle mich heute {x}.")}

_RULES = {
    "one_sentence": {"en": ("Answer in one sentence.", "Always reply with a single sentence."),
                     "de": ("Antworte in einem Satz.", "Antworte immer mit genau einem Satz.")},
    "answer_in_en": {"en": ("Always answer in English.", "Reply in English only."),
                     "de": ("Antworte immer auf Englisch.", "Antworte nur auf Englisch.")},
    "answer_in_de": {"en": ("Always answer in German.", "Reply in German only."),
                     "de": ("Antworte auf Deutsch.", "Antworte immer auf Deutsch.")},
    "start_with": {"en": ("Always start with '{x}'", "Begin every answer with '{x}'"),
                   "de": ("Beginne immer mit '{x}'", "Fang jede Antwort mit '{x}' an")},
}
_PREFIXES = {"en": ("Sure:", "Answer:", "OK:"), "de": ("Gern:", "Antwort:", "Klar:")}
_ECHO = {
    "en": ("Repeat this sentence exactly: {s}", "Please say this back to me word for word: {s}"),
    "de": ("Wiederhole diesen Satz genau: {s}", "Sag mir diesen Satz bitte Wort für Wort nach: {s}"),
}
_ANTI_ECHO = {
    "en": ("Don't repeat my question, just answer it: {q}", "No need to repeat this, answer it: {q}"),
    "de": ("Wiederhole meine Frage nicht, beantworte sie: {q}", "Bitte nicht wiederholen, sondern beantworten: {q}"),
}
_THINK = {
    "en": ("The question is about {s}, and {doc} has the answer.", "{doc} describes {s}; the answer is there."),
    "de": ("Die Frage betrifft {s}, und {doc} enthält die Antwort.", "{doc} beschreibt {s}; dort steht die Antwort."),
}

_NAME_SYLLABLES = ("ka", "lo", "mi", "ra", "ve", "to", "na", "sel", "dor", "bri", "fen", "gal", "hol", "mar", "tis",
                   "wen", "lun", "pra", "zu", "kel", "bo", "ri", "dan", "sum", "ber", "cal", "nor", "es")
# entity kind: (EN passage sentences, DE passage sentences, [(EN question, EN answer, DE question, DE answer, fact slot)])
_KINDS: dict[str, tuple[tuple[str, ...], tuple[str, ...], tuple[tuple[str, str, str, str, str], ...]]] = {
    "bridge": (
        ("The {n} Bridge is {length} metres long.", "It opened in {year}.", "It crosses the {river} river."),
        ("Die {n}-Brücke ist {length} Meter lang.", "Sie wurde {year} eröffnet.", "Sie überquert den Fluss {river}."),
        (("How long is the {n} Bridge?", "The {n} Bridge is {length} metres long.",
          "Wie lang ist die {n}-Brücke?", "Die {n}-Brücke ist {length} Meter lang.", "length"),
         ("When did the {n} Bridge open?", "The {n} Bridge opened in {year}.",
          "Wann wurde die {n}-Brücke eröffnet?", "Die {n}-Brücke wurde {year} eröffnet.", "year"),
         ("Which river does the {n} Bridge cross?", "The {n} Bridge crosses the {river} river.",
          "Welchen Fluss überquert die {n}-Brücke?", "Die {n}-Brücke überquert den Fluss {river}.", "river")),
    ),
    "village": (
        ("{n} is a village with {people} residents.", "It was founded in {year}.", "It is known for its {product}."),
        ("{n} ist ein Dorf mit {people} Einwohnern.", "Es wurde {year} gegründet.", "Es ist für {product_de} bekannt."),
        (("How many people live in {n}?", "{n} has {people} residents.",
          "Wie viele Einwohner hat {n}?", "{n} hat {people} Einwohner.", "people"),
         ("When was {n} founded?", "{n} was founded in {year}.",
          "Wann wurde {n} gegründet?", "{n} wurde {year} gegründet.", "year"),
         ("What is {n} known for?", "{n} is known for its {product}.",
          "Wofür ist {n} bekannt?", "{n} ist für {product_de} bekannt.", "product")),
    ),
    "company": (
        ("{n} is a company that makes {goods}.", "It was founded in {year}.", "It has {staff} employees."),
        ("{n} ist eine Firma, die {goods_de} herstellt.", "Sie wurde {year} gegründet.", "Sie hat {staff} Mitarbeiter."),
        (("What does {n} make?", "{n} makes {goods}.", "Was stellt {n} her?", "{n} stellt {goods_de} her.", "goods"),
         ("When was {n} founded?", "{n} was founded in {year}.",
          "Wann wurde {n} gegründet?", "{n} wurde {year} gegründet.", "year"),
         ("How many employees does {n} have?", "{n} has {staff} employees.",
          "Wie viele Mitarbeiter hat {n}?", "{n} hat {staff} Mitarbeiter.", "staff")),
    ),
    "lake": (
        ("Lake {n} is {depth} metres deep.", "It covers {area} square kilometres.",
         "The most common fish in it is the {fish}."),
        ("Der {n}see ist {depth} Meter tief.", "Er hat eine Fläche von {area} Quadratkilometern.",
         "Der häufigste Fisch darin ist {fish_de}."),
        (("How deep is Lake {n}?", "Lake {n} is {depth} metres deep.",
          "Wie tief ist der {n}see?", "Der {n}see ist {depth} Meter tief.", "depth"),
         ("How large is Lake {n}?", "Lake {n} covers {area} square kilometres.",
          "Wie groß ist der {n}see?", "Der {n}see hat eine Fläche von {area} Quadratkilometern.", "area"),
         ("What is the most common fish in Lake {n}?", "The most common fish in Lake {n} is the {fish}.",
          "Welcher Fisch ist im {n}see am häufigsten?", "Der häufigste Fisch im {n}see ist {fish_de}.", "fish")),
    ),
}
_SUBJECTS = {
    "bridge": ("the {n} Bridge", "die {n}-Brücke"),
    "village": ("{n}", "{n}"),
    "company": ("{n}", "{n}"),
    "lake": ("Lake {n}", "den {n}see"),
}
# (EN, DE phrase in the passage, DE fact that appears in passage and answer)
_PRODUCTS = (("cheese", "seinen Käse", "Käse"), ("apples", "seine Äpfel", "Äpfel"), ("pottery", "seine Töpferwaren",
             "Töpferwaren"), ("wine", "seinen Wein", "Wein"), ("honey", "seinen Honig", "Honig"),
             ("wool", "seine Wolle", "Wolle"), ("clocks", "seine Uhren", "Uhren"), ("bread", "sein Brot", "Brot"))
_GOODS = (("bicycles", "Fahrräder"), ("lamps", "Lampen"), ("toys", "Spielzeug"), ("shoes", "Schuhe"),
          ("solar panels", "Solarmodule"), ("chairs", "Stühle"), ("umbrellas", "Regenschirme"), ("maps", "Landkarten"))
_FISH = (("trout", "die Forelle", "Forelle"), ("pike", "der Hecht", "Hecht"), ("perch", "der Barsch", "Barsch"),
         ("carp", "der Karpfen", "Karpfen"), ("eel", "der Aal", "Aal"))


def generate_chat(n: int, seed: int, languages: Iterable[str] = LANGUAGES, held_out: bool = False) -> list[dict]:
    """``n`` single-turn chat episodes (patterns and split in the module docstring)."""
    langs = check_request("chat", n, languages)
    rng = random.Random(f"chat\0{seed}\0{held_out}")
    patterns, weights = zip(*PATTERN_WEIGHTS.items())
    records = []
    for i in range(n):
        lang = langs[i % len(langs)]
        pattern = rng.choices(patterns, weights)[0]
        records.append(_EPISODES[pattern](lang, langs, rng, held_out))
    return records


# ---- facts -----------------------------------------------------------------------------------------


def country_fact(country: tuple[str, ...], attribute: str) -> Fact:
    en, de, cap_en, cap_de, cont_en, cont_de, lang_en, lang_de = country
    slots = {"en": {"c": en, "cap": cap_en, "cont": cont_en, "lang": lang_en},
             "de": {"c": de, "cap": cap_de, "cont": cont_de, "lang": lang_de}}
    return Fact(
        f"{attribute}:{en}",
        "country",
        {lang: tuple(q.format(**slots[lang]) for q in _COUNTRY_QUESTIONS[lang][attribute]) for lang in LANGUAGES},
        {lang: tuple(s.format(**slots[lang]) for s in _COUNTRY_SENTENCES[lang][attribute]) for lang in LANGUAGES},
    )


def animal_fact(animal: tuple[str, str, int]) -> Fact:
    en, de, legs = animal
    return Fact(
        f"legs:{en.split()[-1]}",
        "animal",
        {"en": (f"How many legs does {en} have?",), "de": (f"Wie viele Beine hat {de}?",)},
        {"en": (f"{upper_first(en)} has {_NUMBER_WORDS['en'][legs]} legs.",),
         "de": (f"{upper_first(de)} hat {_NUMBER_WORDS['de'][legs]} Beine.",)},
    )


def arithmetic_fact(a: int, op: int, b: int) -> Fact:
    """``a`` (operation number ``op``: plus, minus, times) ``b``."""
    words = {lang: _ARITHMETIC[lang][op][0] for lang in LANGUAGES}
    result = _ARITHMETIC["en"][op][1](a, b)
    return Fact(
        f"{words['en']}:{a}:{b}",
        "arithmetic",
        {lang: tuple(q.format(a=a, op=words[lang], b=b) for q in _ARITHMETIC_QUESTIONS[lang]) for lang in LANGUAGES},
        {lang: (_ARITHMETIC_SENTENCE[lang].format(a=a, op=words[lang], b=b, r=result),) for lang in LANGUAGES},
    )


@lru_cache(maxsize=None)
def facts() -> dict[str, tuple[Fact, ...]]:
    """Every fact by topic: country, animal, general, arithmetic (operands 0-12, no negative results)."""
    general = tuple(
        Fact(f"general:{key}", "general", {"en": q_en, "de": q_de}, {"en": s_en, "de": s_de})
        for key, (q_en, s_en, q_de, s_de) in _GENERAL.items()
    )
    arithmetic = tuple(
        arithmetic_fact(a, op, b)
        for op in range(3)
        for a in range(13)
        for b in range(13)
        if _ARITHMETIC["en"][op][1](a, b) >= 0
    )
    return {
        "country": tuple(country_fact(c, attr) for c in COUNTRIES for attr in COUNTRY_ATTRIBUTES),
        "animal": tuple(animal_fact(a) for a in ANIMALS),
        "general": general,
        "arithmetic": arithmetic,
    }


def fact_by_key(key: str) -> Fact:
    """The fact a record's ``_meta.fact`` names (KeyError for an unknown key)."""
    return _facts_by_key()[key]


@lru_cache(maxsize=None)
def _facts_by_key() -> dict[str, Fact]:
    return {fact.key: fact for group in facts().values() for fact in group}


def draw_question(language: str, rng: random.Random, held_out: bool, multi_sentence: bool = False) -> tuple[Fact, str]:
    """(fact, question) on the requested side of the split; a topic first, then a fact, then a phrasing."""
    table = facts()

    def make() -> tuple[Fact, str]:
        pool = _multi_sentence_facts(language) if multi_sentence else table[rng.choice(tuple(table))]
        fact = rng.choice(pool)
        return fact, rng.choice(fact.questions[language])

    return draw_on_side(make, lambda item: item[1], held_out, "chat")


@lru_cache(maxsize=None)
def _multi_sentence_facts(language: str) -> tuple[Fact, ...]:
    return tuple(f for group in facts().values() for f in group if len(f.sentences[language]) > 1)


def sentences(text: str) -> list[str]:
    """Split an answer into sentences (after . ! ? followed by whitespace), as the rule checks count them."""
    return [s for s in SENTENCE_END.split(text.strip()) if s]


# ---- entities for retrieval --------------------------------------------------------------------------


def make_name(rng: random.Random) -> str:
    """A pronounceable made-up name of two or three syllables ("Velmora" style)."""
    return "".join(rng.choice(_NAME_SYLLABLES) for _ in range(rng.randint(2, 3))).capitalize()


def make_entity(name: str, language: str, rng: random.Random) -> Entity:
    """A document about a made-up bridge, village, company or lake called ``name``, with its questions."""
    kind = rng.choice(tuple(_KINDS))
    product, goods, fish = rng.choice(_PRODUCTS), rng.choice(_GOODS), rng.choice(_FISH)
    de = language == "de"
    slots = {
        "n": name, "year": str(rng.randint(1820, 2015)), "length": str(rng.randint(80, 2400)),
        "river": make_name(rng), "people": str(rng.randint(120, 9800)), "product": product[0],
        "product_de": product[1], "goods": goods[0], "goods_de": goods[1], "staff": str(rng.randint(12, 48000)),
        "depth": str(rng.randint(4, 310)), "area": str(rng.randint(2, 580)), "fish": fish[0], "fish_de": fish[1],
    }
    facts_of = dict(slots, product=product[2] if de else product[0], goods=goods[1] if de else goods[0],
                    fish=fish[2] if de else fish[0])
    passage_en, passage_de, qa = _KINDS[kind]
    text = " ".join(s.format(**slots) for s in (passage_de if de else passage_en))
    pairs = tuple(
        ((q_de if de else q_en).format(**slots), (a_de if de else a_en).format(**slots), facts_of[slot])
        for q_en, a_en, q_de, a_de, slot in qa
    )
    subject = _SUBJECTS[kind][1 if de else 0].format(n=name)
    return Entity(f"doc:{name.lower()}-{kind}", name, subject, text, pairs)


def unique_names(k: int, rng: random.Random, taken: Iterable[str] = ()) -> list[str]:
    """``k`` distinct made-up names, none in ``taken``."""
    seen = set(taken)
    names: list[str] = []
    while len(names) < k:
        name = make_name(rng)
        if name not in seen:
            seen.add(name)
            names.append(name)
    return names


def format_context(entities: Iterable[Entity]) -> str:
    """Documents as the user's context: ``[doc:ID] text`` blocks separated by a blank line."""
    return "\n\n".join(f"[{e.doc_id}] {e.text}" for e in entities)


# ---- episodes ----------------------------------------------------------------------------------------


def _meta(pattern: str, lang: str, **fields) -> dict:
    meta = {"generator": "chat", "phase": "3", "pattern": pattern, "has_context": False, "cited_docs": [],
            "expected_language": lang, "system_rule": None, "fact": None}
    meta.update(fields)
    return meta


def _chat(user: dict, assistant: dict) -> list[dict]:
    return [{"role": "user", **user}, {"role": "assistant", **assistant}]


def _smalltalk(lang: str, langs: tuple[str, ...], rng: random.Random, held_out: bool) -> dict:
    prompt, answer = draw_on_side(lambda: rng.choice(smalltalk_space(lang)), lambda item: item[0], held_out, "chat")
    messages = _chat({"content": prompt}, {"content": answer})
    return record(system_prompt("medium", lang, rng), messages, lang, _meta("smalltalk", lang), held_out)


@lru_cache(maxsize=None)
def smalltalk_space(language: str) -> tuple[tuple[str, str], ...]:
    """Every (user message, answer) of small talk in ``language``."""
    items = [(u, a) for users, answers in _SMALLTALK[language] for u in users for a in answers]
    templates, greeting = _GREETING[language]
    items += [(t.format(x=name), greeting.format(x=name)) for name in PEOPLE for t in templates]
    items += [(t.format(x=mood), answer) for mood, answer in _MOODS[language].items() for t in _MOOD_PROMPTS[language]]
    return tuple(items)


def _knowledge(lang: str, langs: tuple[str, ...], rng: random.Random, held_out: bool) -> dict:
    fact, question = draw_question(lang, rng, held_out)
    messages = _chat({"content": question}, {"content": fact.answer(lang)})
    meta = _meta("knowledge", lang, fact=fact.key)
    return record(system_prompt("medium", lang, rng), messages, lang, meta, held_out)


def _system_rule(lang: str, langs: tuple[str, ...], rng: random.Random, held_out: bool) -> dict:
    rule = rng.choice(("one_sentence", "answer_in", "start_with"))
    fact, question = draw_question(lang, rng, held_out, multi_sentence=rule == "one_sentence")
    extra: dict = {}
    answer_lang = lang
    if rule == "one_sentence":
        answer = fact.answer(lang, 1)
    elif rule == "answer_in":
        answer_lang = rng.choice(langs)
        rule = f"answer_in_{answer_lang}"
        answer = fact.answer(answer_lang)
    else:
        prefix = rng.choice(_PREFIXES[lang])
        extra["required_prefix"] = prefix
        answer = f"{prefix} {fact.answer(lang)}"
    rule_text = rng.choice(_RULES[rule][lang]).format(x=extra.get("required_prefix"))
    if not rule_text.endswith("."):
        rule_text += "."
    system = f"{system_prompt('short', lang, rng)} {rule_text}"
    meta = _meta("system_rule", lang, expected_language=answer_lang, system_rule=rule, fact=fact.key, **extra)
    return record(system, _chat({"content": question}, {"content": answer}), lang, meta, held_out)


def _retrieval(lang: str, langs: tuple[str, ...], rng: random.Random, held_out: bool) -> dict:
    def make() -> tuple[list[Entity], Entity, tuple[str, str, str]]:
        entities = [make_entity(name, lang, rng) for name in unique_names(rng.randint(1, 3), rng)]
        target = rng.choice(entities)
        return entities, target, rng.choice(target.qa)

    entities, target, (question, answer, fact) = draw_on_side(make, lambda item: item[2][0], held_out, "chat")
    assistant = {"content": answer, "cite": target.doc_id}
    if rng.random() < THINK_SHARE:
        assistant = {"think": rng.choice(_THINK[lang]).format(s=target.subject, doc=target.doc_id), **assistant}
    messages = _chat({"content": question, "context": format_context(entities)}, assistant)
    meta = _meta("retrieval", lang, has_context=True, cited_docs=[target.doc_id], answer_fact=fact)
    return record(system_prompt("medium", lang, rng), messages, lang, meta, held_out)


def _echo(lang: str, langs: tuple[str, ...], rng: random.Random, held_out: bool) -> dict:
    def make() -> tuple[str, str]:
        if rng.random() < 0.5:
            sentence = rng.choice(sentences(make_entity(make_name(rng), lang, rng).text))
        else:
            fact = rng.choice(facts()[rng.choice(tuple(facts()))])
            sentence = rng.choice(fact.sentences[lang])
        return rng.choice(_ECHO[lang]).format(s=sentence), sentence

    prompt, sentence = draw_on_side(make, lambda item: item[0], held_out, "chat")
    messages = _chat({"content": prompt}, {"content": sentence})
    return record(system_prompt("medium", lang, rng), messages, lang, _meta("echo", lang), held_out)


def _anti_echo(lang: str, langs: tuple[str, ...], rng: random.Random, held_out: bool) -> dict:
    fact, question = draw_question(lang, rng, held_out)
    messages = _chat({"content": rng.choice(_ANTI_ECHO[lang]).format(q=question)}, {"content": fact.answer(lang)})
    meta = _meta("anti_echo", lang, fact=fact.key)
    return record(system_prompt("medium", lang, rng), messages, lang, meta, held_out)


def upper_first(text: str) -> str:
    """``text`` with its first letter upper-cased (unlike ``str.capitalize``, the rest is kept as it is).

    Shared with the multi-turn generator, which starts sentences with the same noun phrases.
    """
    return text[:1].upper() + text[1:]


_EPISODES = {
    "smalltalk": _smalltalk,
    "knowledge": _knowledge,
    "system_rule": _system_rule,
    "retrieval": _retrieval,
    "echo": _echo,
    "anti_echo": _anti_echo,
}
