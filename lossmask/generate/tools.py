"""Phase-5 (toolcall) and phase-6 (agentic) data: questions about a document workspace, answered with tools.

Every question is about a fact listed in the workspace's ``facts.json`` (the shipped sample has 121), and
every tool result in an episode is what ``Workspace.call`` really returned for that call, so the model
learns to read real results. A fact is ``{"doc", "kind", "subject", "value", "answer"}`` (optional
``"query"``): ``subject`` is a noun phrase in the nominative that fits every question template of its
``kind`` (amount, value, person, place, date, past), ``value`` the exact text the answer hinges on (it must
occur in the document), ``answer`` a sentence containing it. ``documents`` maps a doc id to its
``language`` and optional ``topic`` (a noun phrase for "the document about ...") and ``summary``.

Questions are ``frame(template(kind).format(s=subject))``: 4 templates a kind and 4 frames a language,
16 phrasings a fact. The search query the model writes is the subject's content words (or the fact's
``query``); a broader query is the topic's words. Answers are the fact's answer in one of four frames
(plain, "According to", "stated in", or a verbatim quote of the document sentence when a tool returned
it), and the final assistant message cites the doc id.

Patterns (``_meta.pattern``):

- ``SEARCH_ANSWER``: search, the snippet of the right document holds the value, answer.
- ``SEARCH_GETDOC_ANSWER``: search, the snippet does not hold it, so get_doc, answer. Whether a search
  episode becomes one or the other is decided by the real snippet, never by fiat.
- ``LIST_SELECT_SUMMARIZE``: list_docs (with the folder as prefix when the user names it), pick the
  document about the topic, get_doc, summarise (the summary plus up to two fact sentences).
- ``ERROR_RECOVERY``: get_doc on a wrong id (the file name with ``.md``, or a slug of the title the user
  mentioned); the tool's error (with ``did_you_mean`` when it has one) leads to the right id directly,
  or to a search first.
- ``NO_TOOL``: arithmetic, translation, letter counts, time units, greetings, questions about the
  assistant: answered directly, no tool.
- Wrong tool then correction (``_meta.correction: true``, a search pattern): list_docs first for a
  content question, then a ``think`` that explains why that cannot answer it, then the search chain.

Mix: ``generate_toolcall`` (phase 5, one tool call) deals blocks of 5 episodes: 1 NO_TOOL, 4
SEARCH_ANSWER (facts whose snippet holds the value). ``generate_agentic`` (phase 6) deals blocks of 25:
5 NO_TOOL (20%), 2 corrections (8%), 5 search-and-answer, 5 search-and-read, 4 summaries, 4 error
recoveries. Each block is shuffled; languages take turns (``languages[i % len(languages)]``).

Held-out split, fixed by content and never by seed: a fact is held out when a hash of its doc, kind and
subject falls in 1 of ``HELD_OUT_EVERY`` buckets, so the training side never asks about it (its
document still appears in training results: retrieval, not memorisation, is what is measured, and no
training answer states it, summaries included); a document is held out for summaries by a hash of its
id; a NO_TOOL prompt by a hash of its text (1 in ``NO_TOOL_HELD_OUT_EVERY``; categories with no
held-out prompt, such as greetings, are left out of the held-out side).

Every record is checked by ``validate_record`` before it is returned: each call names a tool that
exists with arguments its schema accepts, each result equals re-running the call, the tool sequence and
the pattern agree, every cited document exists, and each ``_meta.answer_contains`` string is in the
answer and in a result tied to a cited document. A record that fails is a bug and raises.

``_meta``: generator, phase ("5"/"6"), pattern, language, split, expected_tools (the calls in order, []
for NO_TOOL), cited_docs, answer_contains, fact (``doc#n`` or null), correction. System prompts are
``TOOL_SYSTEM_PROMPTS``, the third tier (``tools`` in ``lossmask.generate.prompts``): about 80 tokens
that list the tools, three variants a language.
"""
from __future__ import annotations

import difflib
import hashlib
import json
import random
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lossmask.episode import Source
from lossmask.errors import InputError, LossmaskError
from lossmask.generate.format_lock import LANGUAGES, check_request
from lossmask.sources import parse_record
from lossmask.workspace import DEFAULT_TOP_K, Workspace, check_call, sample_workspace

PATTERNS: tuple[str, ...] = (
    "SEARCH_ANSWER", "SEARCH_GETDOC_ANSWER", "LIST_SELECT_SUMMARIZE", "ERROR_RECOVERY", "NO_TOOL",
)
KINDS: tuple[str, ...] = ("amount", "value", "person", "place", "date", "past")
FACTS_FILE = "facts.json"
HELD_OUT_EVERY = 4
NO_TOOL_HELD_OUT_EVERY = 8

SEARCH, GET_DOC, LIST_DOCS = "workspace.search", "workspace.get_doc", "workspace.list_docs"

# Slots of one shuffled block (see the module docstring): DIRECT = search whose snippet answers,
# READ = search then get_doc, CORRECTION = list_docs first, then a think and the search chain.
TOOLCALL_BLOCK = ("NO_TOOL",) + ("DIRECT",) * 4
AGENTIC_BLOCK = (
    ("NO_TOOL",) * 5 + ("CORRECTION",) * 2 + ("DIRECT",) * 5 + ("READ",) * 5 + ("SUMMARY",) * 4
    + ("RECOVERY",) * 4
)

TOOL_SYSTEM_PROMPTS: dict[str, tuple[str, ...]] = {
    "en": (
        "You are MyPT, an assistant with access to a document workspace. Tools: workspace.search(query, "
        "top_k) finds documents by keywords and returns snippets; workspace.get_doc(doc_id) returns the full "
        "text of one document; workspace.list_docs(prefix) lists document ids and titles. Use a tool when "
        "the answer depends on the documents, answer directly otherwise, and cite the doc id you used.",
        "You are MyPT. You can call three tools: workspace.search with a query and an optional top_k to "
        "search the documents, workspace.get_doc with a doc_id to read one document, and "
        "workspace.list_docs with an optional prefix to list documents. Answer only from what the tools "
        "return and cite the document. Do not call a tool for questions you can answer yourself.",
        "You are MyPT, a helpful assistant for a shared document folder. Available tools: workspace.search "
        "{query, top_k}: keyword search with a snippet per hit; workspace.get_doc {doc_id}: one document in "
        "full; workspace.list_docs {prefix}: ids and titles. If a tool returns an error, read it, fix the "
        "call and try again. Cite the doc id of the document your answer comes from.",
    ),
    "de": (
        "Du bist MyPT, ein Assistent mit Zugriff auf einen Dokumentenordner. Werkzeuge: "
        "workspace.search(query, top_k) sucht nach Stichwörtern und liefert Ausschnitte; "
        "workspace.get_doc(doc_id) liefert ein Dokument vollständig; workspace.list_docs(prefix) listet IDs und "
        "Titel. Nutze ein Werkzeug, wenn die Antwort in den Dokumenten steht, sonst antworte direkt. Nenne die "
        "doc_id als Quelle.",
        "Du bist MyPT. Deine Werkzeuge: workspace.search mit query und optional top_k durchsucht die Dokumente, "
        "workspace.get_doc mit doc_id liest ein Dokument, workspace.list_docs mit optionalem prefix listet "
        "Dokumente auf. Antworte nur mit dem, was die Werkzeuge liefern, und nenne das Dokument. Fragen, die du "
        "selbst beantworten kannst, brauchen kein Werkzeug.",
        "Du bist MyPT, ein Assistent für einen gemeinsamen Dokumentenordner. Werkzeuge: workspace.search "
        "{query, top_k}: Stichwortsuche mit Ausschnitten; workspace.get_doc {doc_id}: ein ganzes Dokument; "
        "workspace.list_docs {prefix}: IDs und Titel. Meldet ein Werkzeug einen Fehler, korrigiere den Aufruf und "
        "versuche es erneut. Nenne die doc_id deiner Quelle.",
    ),
}

QUESTION_TEMPLATES: dict[str, dict[str, tuple[str, ...]]] = {
    "en": {
        "amount": ("What is {s}?", "How much is {s}?", "Can you look up {s}?", "Do you know how much {s} is?"),
        "value": ("What is {s}?", "Can you look up {s}?", "Please find {s} for me.", "Do you know {s}?"),
        "person": ("Who is {s}?", "Do you know who {s} is?", "Can you find out who {s} is?", "Who exactly is {s}?"),
        "place": ("Where is {s}?", "Do you know where {s} is?", "Can you find out where {s} is?",
                  "Where exactly is {s}?"),
        "date": ("When is {s}?", "Do you know when {s} is?", "On which date is {s}?", "Can you look up when {s} is?"),
        "past": ("When was {s}?", "In which year was {s}?", "Do you know when {s} was?",
                 "Can you look up when {s} was?"),
    },
    "de": {
        "amount": ("Wie hoch ist {s}?", "Was ist {s}?", "Weißt du, wie hoch {s} ist?",
                   "Kannst du nachsehen, wie hoch {s} ist?"),
        "value": ("Was ist {s}?", "Kannst du nachsehen, was {s} ist?", "Weißt du, was {s} ist?",
                  "Sag mir bitte, was {s} ist."),
        "person": ("Wer ist {s}?", "Weißt du, wer {s} ist?", "Kannst du herausfinden, wer {s} ist?",
                   "Wer ist eigentlich {s}?"),
        "place": ("Wo ist {s}?", "Weißt du, wo {s} ist?", "Kannst du nachsehen, wo {s} ist?", "Wo genau ist {s}?"),
        "date": ("Wann ist {s}?", "Weißt du, wann {s} ist?", "An welchem Tag ist {s}?",
                 "Kannst du nachsehen, wann {s} ist?"),
        "past": ("Wann war {s}?", "In welchem Jahr war {s}?", "Weißt du, wann {s} war?",
                 "Kannst du nachsehen, wann {s} war?"),
    },
}
QUESTION_FRAMES: dict[str, tuple[str, ...]] = {
    "en": ("{q}", "Quick question: {q}", "{q} Please check the documents.", "Could you help me? {q}"),
    "de": ("{q}", "Kurze Frage: {q}", "{q} Schau bitte in den Dokumenten nach.", "Kannst du mir helfen? {q}"),
}
ANSWER_FRAMES: dict[str, tuple[str, ...]] = {
    "en": ("{a}", 'According to "{title}": {a}', '{a} This is stated in "{title}".',
           '{a} The document says: "{quote}"'),
    "de": ("{a}", "Laut „{title}“: {a}", "{a} Das steht in „{title}“.",
           "{a} Im Dokument heißt es: „{quote}“"),
}
# The user points at a document: by its file name (the model tries it as an id) or by its title.
REFERENCES: dict[str, dict[str, tuple[str, ...]]] = {
    "en": {"file": ("{q} It is in the file {file}.", "{q} The file is {file}."),
           "title": ('{q} It should be in "{title}".', '{q} Look it up in "{title}".')},
    "de": {"file": ("{q} Das steht in der Datei {file}.", "{q} Die Datei heißt {file}."),
           "title": ("{q} Das müsste in „{title}“ stehen.", "{q} Schau in „{title}“ nach.")},
}
SUMMARY_REQUESTS: dict[str, dict[str, tuple[str, ...]]] = {
    "en": {
        "folder": ("Which documents are in the {folder}/ folder? Summarize the one about {topic}.",
                   "Find the document about {topic} in {folder}/ and summarize it.",
                   "Give me a short summary of the {folder}/ document about {topic}."),
        "all": ("Summarize our document about {topic}.", "Is there a document about {topic}? Please summarize it.",
                "What does our document about {topic} say? A short summary is enough."),
    },
    "de": {
        "folder": ("Welche Dokumente liegen im Ordner {folder}/? Fasse das zum Thema {topic} zusammen.",
                   "Such im Ordner {folder}/ das Dokument zum Thema {topic} und fasse es zusammen.",
                   "Gib mir eine kurze Zusammenfassung des Dokuments zum Thema {topic} aus {folder}/."),
        "all": ("Fasse unser Dokument zum Thema {topic} zusammen.",
                "Gibt es ein Dokument zum Thema {topic}? Bitte fasse es zusammen.",
                "Was steht in unserem Dokument zum Thema {topic}? Eine kurze Zusammenfassung reicht."),
    },
}
SUMMARY_FRAMES: dict[str, tuple[str, ...]] = {
    "en": ('Here is a short summary of "{title}": {summary}{points}', '"{title}" in brief: {summary}{points}',
           "{summary}{points}"),
    "de": ("Hier ist eine kurze Zusammenfassung von „{title}“: {summary}{points}",
           "„{title}“ in Kürze: {summary}{points}", "{summary}{points}"),
}
KEY_POINTS = {"en": " Key points: ", "de": " Wichtig: "}
THINK: dict[str, dict[str, tuple[str, ...]]] = {
    "en": {
        "open": ("The snippet from {doc} does not show the answer, so I will read the whole document.",
                 "{doc} looks right, but its snippet does not contain the answer. I will open it."),
        "suggested": ("There is no document '{bad}'. The tool suggests '{doc}', so I will open that one.",
                      "The id '{bad}' was wrong; '{doc}' is the id the error suggests."),
        "not_found": ("The doc id '{bad}' does not exist. I will search for the document instead.",
                      "There is no document '{bad}', and no suggestion fits. Searching is the way to find it."),
        "select": ('The document about {topic} is {doc} ("{title}").', 'I need {doc}: "{title}" is about {topic}.'),
        "wrong_tool": ("workspace.list_docs only shows ids and titles, not {subject}. I need to search the "
                       "document contents instead.",
                       "The list of documents does not tell me {subject}. Searching the contents is the right "
                       "tool here."),
    },
    "de": {
        "open": ("Der Ausschnitt aus {doc} zeigt die Antwort nicht, deshalb lese ich das ganze Dokument.",
                 "{doc} passt, aber der Ausschnitt enthält die Antwort nicht. Ich öffne das Dokument."),
        "suggested": ("Ein Dokument '{bad}' gibt es nicht. Das Werkzeug schlägt '{doc}' vor, also öffne ich dieses.",
                      "Die ID '{bad}' war falsch; laut Fehlermeldung ist '{doc}' gemeint."),
        "not_found": ("Die ID '{bad}' gibt es nicht. Ich suche stattdessen nach dem Dokument.",
                      "Ein Dokument '{bad}' gibt es nicht, und kein Vorschlag passt. Ich finde es über die Suche."),
        "select": ("Das Dokument zum Thema {topic} ist {doc} („{title}“).",
                   "Ich brauche {doc}: „{title}“ behandelt das Thema {topic}."),
        "wrong_tool": ("workspace.list_docs zeigt nur IDs und Titel, nicht den Inhalt der Dokumente. Ich muss "
                       "stattdessen den Inhalt durchsuchen.",
                       "Die Liste der Dokumente beantwortet die Frage nicht. Hier ist die Suche im Inhalt das "
                       "richtige Werkzeug."),
    },
}
_STOPWORDS = frozenset(
    "a an and are at by do does for from how in is it my of on or our per the this to was what when where which "
    "who with your am an auf bei das dem den der des die ein eine einem einen einer eines für im ist mit oder "
    "pro und vom von war zum zur".split()
)


@dataclass(frozen=True)
class Fact:
    """One checkable fact of a workspace document (see the module docstring for the fields)."""

    id: str  # doc#n, n counting the document's facts in file order
    doc: str
    language: str
    kind: str
    subject: str
    value: str
    answer: str
    query: str  # what the model searches for
    sentence: str  # the document sentence holding the value (what a quote shows)


@dataclass(frozen=True)
class DocInfo:
    doc_id: str
    title: str
    language: str
    folder: str  # the doc id up to its last "/" ("" at the top level)
    topic: str | None
    summary: str | None


@dataclass(frozen=True)
class Catalogue:
    """A workspace with its facts, checked against the documents."""

    workspace: Workspace
    docs: dict[str, DocInfo]
    facts: tuple[Fact, ...]


# ---- the generators ----------------------------------------------------------------------------------


def generate_toolcall(
    n: int,
    seed: int,
    languages: Iterable[str] = LANGUAGES,
    held_out: bool = False,
    workspace: Workspace | str | Path | None = None,
) -> list[dict]:
    """Phase 5: one search call and a grounded answer, or (20%) a direct answer with no tool."""
    return _generate("toolcall", "5", TOOLCALL_BLOCK, n, seed, languages, held_out, workspace)


def generate_agentic(
    n: int,
    seed: int,
    languages: Iterable[str] = LANGUAGES,
    held_out: bool = False,
    workspace: Workspace | str | Path | None = None,
) -> list[dict]:
    """Phase 6: multi-step chains (search, read, list, recover from errors, correct a wrong tool)."""
    return _generate("agentic", "6", AGENTIC_BLOCK, n, seed, languages, held_out, workspace)


def _generate(
    generator: str,
    phase: str,
    block: tuple[str, ...],
    n: int,
    seed: int,
    languages: Iterable[str],
    held_out: bool,
    workspace: Workspace | str | Path | None,
) -> list[dict]:
    langs = check_request(None, n, languages)
    if n == 0:
        return []
    ws = workspace if isinstance(workspace, Workspace) else Workspace(workspace or sample_workspace())
    pools = _Pools(load_catalogue(ws), held_out, random.Random(f"{generator}\0pools\0{seed}\0{held_out}"))
    rng = random.Random(f"{generator}\0{seed}\0{held_out}")
    records: list[dict] = []
    slots: list[str] = []
    for i in range(n):
        if not slots:
            slots = list(block)
            rng.shuffle(slots)
        slot = slots.pop()
        lang = langs[i % len(langs)]
        chain = _Chain(ws, lang, rng)
        _SLOTS[slot](chain, pools, lang)
        record = chain.record(generator, phase, rng.choice(TOOL_SYSTEM_PROMPTS[lang]), held_out)
        validate_record(record, ws)
        records.append(record)
    return records


# ---- building one episode ----------------------------------------------------------------------------


class _Chain:
    """One episode being built: its messages, with every tool really run on the workspace."""

    def __init__(self, ws: Workspace, lang: str, rng: random.Random):
        self.ws = ws
        self.lang = lang
        self.rng = rng
        self.messages: list[dict[str, Any]] = []
        self.tools: list[str] = []
        self.pattern = ""
        self.cited: list[str] = []
        self.contains: list[str] = []
        self.fact: str | None = None
        self.correction = False

    def user(self, text: str) -> None:
        self.messages.append({"role": "user", "content": text})

    def think(self, key: str, **values: str) -> None:
        """A reasoning step before the next call (an assistant message with only ``think``)."""
        text = self.rng.choice(THINK[self.lang][key]).format(**values)
        self.messages.append({"role": "assistant", "content": "", "think": text})

    def call(self, name: str, arguments: dict[str, Any]) -> dict[str, Any]:
        result = self.ws.call(name, arguments)
        self.messages.append({"role": "assistant_toolcall", "name": name, "arguments": arguments})
        self.messages.append({"role": "toolresult", "name": name, "content": result})
        self.tools.append(name)
        return json.loads(result)

    def answer(self, text: str, pattern: str, cited: list[str], contains: list[str]) -> None:
        message: dict[str, Any] = {"role": "assistant", "content": text}
        if cited:
            message["cite"] = ", ".join(cited)
        self.messages.append(message)
        self.pattern, self.cited, self.contains = pattern, cited, contains

    def record(self, generator: str, phase: str, system: str, held_out: bool) -> dict:
        return {
            "system": system,
            "messages": self.messages,
            "language": self.lang,
            "_meta": {
                "generator": generator,
                "phase": phase,
                "pattern": self.pattern,
                "language": self.lang,
                "split": "held_out" if held_out else "train",
                "expected_tools": list(self.tools),
                "cited_docs": list(self.cited),
                "answer_contains": list(self.contains),
                "fact": self.fact,
                "correction": self.correction,
            },
        }


def _no_tool(chain: _Chain, pools: _Pools, lang: str) -> None:
    prompt, answer, key = pools.next_no_tool(lang)
    chain.user(prompt)
    chain.answer(answer, "NO_TOOL", [], [key])


def _direct(chain: _Chain, pools: _Pools, lang: str) -> None:
    fact = pools.next("direct", lang)
    chain.user(_question(fact, chain.rng))
    _search_and_answer(chain, pools, fact, fact.query)


def _read(chain: _Chain, pools: _Pools, lang: str) -> None:
    fact, query = pools.next("read", lang)
    chain.user(_question(fact, chain.rng))
    _search_and_answer(chain, pools, fact, query)


def _correction(chain: _Chain, pools: _Pools, lang: str) -> None:
    """A content question sent to list_docs first; a think explains why, then the search chain."""
    fact = pools.next("facts", lang)
    chain.user(_question(fact, chain.rng))
    info = pools.catalogue.docs[fact.doc]
    chain.call(LIST_DOCS, {"prefix": info.folder + "/"} if info.folder and chain.rng.random() < 0.5 else {})
    chain.think("wrong_tool", subject=fact.subject)
    chain.correction = True
    _search_and_answer(chain, pools, fact, pools.search_query(fact, chain.rng))


def _recovery(chain: _Chain, pools: _Pools, lang: str) -> None:
    """get_doc on a wrong id the user's wording invites; the error leads to the right document."""
    fact = pools.next("facts", lang)
    info = pools.catalogue.docs[fact.doc]
    by_file = chain.rng.random() < 0.5
    bad = fact.doc + ".md" if by_file else _slug(info.title)
    if chain.ws.has_doc(bad):
        by_file, bad = True, fact.doc + ".md"
    template = chain.rng.choice(REFERENCES[lang]["file" if by_file else "title"])
    chain.user(template.format(q=_question(fact, chain.rng), file=fact.doc + ".md", title=info.title))
    error = chain.call(GET_DOC, {"doc_id": bad})
    if "error" not in error:
        raise LossmaskError(f"tools generator: get_doc({bad!r}) did not fail, so it cannot teach recovery")
    if fact.doc in error.get("did_you_mean", []):
        if chain.rng.random() < 0.5:
            chain.think("suggested", bad=bad, doc=fact.doc)
        text = chain.call(GET_DOC, {"doc_id": fact.doc})["text"]
        chain.fact = fact.id
        chain.answer(_fact_answer(fact, info, text, chain.rng), "ERROR_RECOVERY", [fact.doc], [fact.value])
        return
    if chain.rng.random() < 0.5:
        chain.think("not_found", bad=bad)
    _search_and_answer(chain, pools, fact, fact.query)
    chain.pattern = "ERROR_RECOVERY"


def _summary(chain: _Chain, pools: _Pools, lang: str) -> None:
    info = pools.next("summaries", lang)
    rng = chain.rng
    in_folder = bool(info.folder) and rng.random() < 0.5
    requests = SUMMARY_REQUESTS[lang]["folder" if in_folder else "all"]
    chain.user(rng.choice(requests).format(folder=info.folder, topic=info.topic))
    listed = chain.call(LIST_DOCS, {"prefix": info.folder + "/"} if in_folder else {})
    if info.doc_id not in listed["docs"]:
        raise LossmaskError(
            f"tools generator: list_docs does not show {info.doc_id} (over {len(listed['docs'])} documents "
            "listed); give the document a folder so a prefix narrows the list"
        )
    if rng.random() < 0.5:
        chain.think("select", topic=info.topic, doc=info.doc_id, title=info.title)
    chain.call(GET_DOC, {"doc_id": info.doc_id})
    facts = pools.summary_facts(info.doc_id)
    points = sorted(rng.sample(range(len(facts)), min(2, len(facts))))
    chosen = [facts[k] for k in points]
    tail = KEY_POINTS[lang] + " ".join(f.answer for f in chosen) if chosen else ""
    text = rng.choice(SUMMARY_FRAMES[lang]).format(title=info.title, summary=info.summary, points=tail)
    chain.answer(text, "LIST_SELECT_SUMMARIZE", [info.doc_id], [f.value for f in chosen])


def _search_and_answer(chain: _Chain, pools: _Pools, fact: Fact, query: str) -> None:
    """Search; answer from the snippet when it holds the value, else read the document first."""
    rng = chain.rng
    arguments: dict[str, Any] = {"query": query}
    if rng.random() < 0.25:
        arguments["top_k"] = rng.choice((DEFAULT_TOP_K, 5))
    results = chain.call(SEARCH, arguments)["results"]
    hit = next((r for r in results if r["doc_id"] == fact.doc), None)
    if hit is None:
        raise LossmaskError(f"tools generator: search {query!r} does not return {fact.doc}")
    info = pools.catalogue.docs[fact.doc]
    chain.fact = fact.id
    if fact.value in hit["snippet"]:
        chain.answer(_fact_answer(fact, info, hit["snippet"], rng), "SEARCH_ANSWER", [fact.doc], [fact.value])
        return
    if rng.random() < 0.4:
        chain.think("open", doc=fact.doc)
    text = chain.call(GET_DOC, {"doc_id": fact.doc})["text"]
    chain.answer(_fact_answer(fact, info, text, rng), "SEARCH_GETDOC_ANSWER", [fact.doc], [fact.value])


def _question(fact: Fact, rng: random.Random) -> str:
    question = rng.choice(QUESTION_TEMPLATES[fact.language][fact.kind]).format(s=fact.subject)
    question = question[0].upper() + question[1:]
    return rng.choice(QUESTION_FRAMES[fact.language]).format(q=question)


def _fact_answer(fact: Fact, info: DocInfo, seen: str, rng: random.Random) -> str:
    """The fact's sentence in a frame; the quoting frame only when a tool result shows the document
    sentence and it says more than the answer (a quote that repeats the answer teaches nothing)."""
    quotable = fact.sentence in seen and difflib.SequenceMatcher(None, fact.sentence, fact.answer).ratio() < 0.8
    frames = [f for f in ANSWER_FRAMES[fact.language] if "{quote}" not in f or quotable]
    return rng.choice(frames).format(a=fact.answer, title=info.title, quote=fact.sentence)


_SLOTS = {
    "NO_TOOL": _no_tool,
    "DIRECT": _direct,
    "READ": _read,
    "CORRECTION": _correction,
    "RECOVERY": _recovery,
    "SUMMARY": _summary,
}


# ---- pools and the held-out split --------------------------------------------------------------------


def is_held_out_fact(fact: Fact) -> bool:
    return _bucket(f"{fact.doc}\0{fact.kind}\0{fact.subject}", HELD_OUT_EVERY)


def is_held_out_doc(doc_id: str) -> bool:
    return _bucket(f"summary\0{doc_id}", HELD_OUT_EVERY)


def is_held_out_prompt(prompt: str) -> bool:
    return _bucket(prompt, NO_TOOL_HELD_OUT_EVERY)


def _bucket(text: str, every: int) -> bool:
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") % every == 0


class _Pools:
    """What one side of the split may ask, per language, each dealt in a seeded shuffled order."""

    def __init__(self, catalogue: Catalogue, held_out: bool, rng: random.Random):
        self.catalogue = catalogue
        self.held_out = held_out
        self.rng = rng
        ws = catalogue.workspace
        facts = [f for f in catalogue.facts if is_held_out_fact(f) == held_out]
        self.items: dict[tuple[str, str], list[Any]] = {}
        for lang in LANGUAGES:
            mine = [f for f in facts if f.language == lang]
            self.items["facts", lang] = mine
            self.items["direct", lang] = [f for f in mine if _snippet_holds(ws, f, f.query)]
            self.items["read", lang] = [
                (f, q) for f in mine for q in dict.fromkeys((self.broad_query(f), f.query))
                if q and _finds(ws, f, q) and not _snippet_holds(ws, f, q)
            ]
            self.items["summaries", lang] = [
                d for d_id, d in sorted(catalogue.docs.items())
                if d.language == lang and d.topic and d.summary and is_held_out_doc(d_id) == held_out
            ]
            no_tool = _no_tool_space(lang)
            for category, prompts in no_tool.items():
                self.items[f"no_tool:{category}", lang] = [p for p in prompts if is_held_out_prompt(p[0]) == held_out]
        self._dealers: dict[tuple[str, str], Iterator[Any]] = {}

    def next(self, pool: str, lang: str) -> Any:
        key = (pool, lang)
        if key not in self._dealers:
            items = self.items.get(key, [])
            if not items:
                side = "held-out" if self.held_out else "training"
                raise LossmaskError(
                    f"tools generator: the workspace has no {side} items for {pool!r} in {lang!r}; "
                    f"add facts (or topics and summaries) for {lang} documents to {FACTS_FILE}"
                )
            self._dealers[key] = _deal(items, random.Random(self.rng.getrandbits(64)))
        return next(self._dealers[key])

    def next_no_tool(self, lang: str) -> tuple[str, str, str]:
        categories = sorted(k for k, lng in self.items if lng == lang and k.startswith("no_tool:")
                            and self.items[k, lng])
        return self.next(self.rng.choice(categories), lang)

    def summary_facts(self, doc_id: str) -> list[Fact]:
        """Facts a summary may state as key points: only this side's, so no training answer states a
        held-out fact (a held-out summary of a document without held-out facts may use any)."""
        facts = [f for f in self.catalogue.facts if f.doc == doc_id]
        mine = [f for f in facts if is_held_out_fact(f) == self.held_out]
        return mine if mine or not self.held_out else facts

    def broad_query(self, fact: Fact) -> str | None:
        topic = self.catalogue.docs[fact.doc].topic
        return _keywords(topic) if topic else None

    def search_query(self, fact: Fact, rng: random.Random) -> str:
        """The precise query, or (half the time, when it finds the document) the broad one."""
        broad = self.broad_query(fact)
        if broad and rng.random() < 0.5 and _finds(self.catalogue.workspace, fact, broad):
            return broad
        return fact.query


def _deal(pool: list[Any], rng: random.Random) -> Iterator[Any]:
    """Every item once in a shuffled order, then again in a new order, forever."""
    while True:
        order = list(pool)
        rng.shuffle(order)
        yield from order


def _finds(ws: Workspace, fact: Fact, query: str) -> bool:
    return any(r["doc_id"] == fact.doc for r in ws.search(query))


def _snippet_holds(ws: Workspace, fact: Fact, query: str) -> bool:
    return any(r["doc_id"] == fact.doc and fact.value in r["snippet"] for r in ws.search(query))


def _keywords(text: str) -> str:
    """A search query from a noun phrase: its words without articles and prepositions."""
    words = [w for w in re.findall(r"[\w][\w.-]*\w|\w", text) if w.lower() not in _STOPWORDS]
    return " ".join(words) or text


def _slug(title: str) -> str:
    """A file-name-like guess at an id from a title ("Urlaub und Feiertage" -> "urlaub-und-feiertage")."""
    text = title.lower()
    for a, b in (("ä", "ae"), ("ö", "oe"), ("ü", "ue"), ("ß", "ss")):
        text = text.replace(a, b)
    return re.sub(r"[^a-z0-9]+", "-", text).strip("-") or "document"


# ---- the facts file ----------------------------------------------------------------------------------


def load_catalogue(workspace: Workspace) -> Catalogue:
    """Read and check ``facts.json`` of a workspace (format in the module docstring)."""
    path = workspace.root / FACTS_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise LossmaskError(
            f"{path} not found: the tool generators ask about facts listed there; "
            f"see {sample_workspace() / FACTS_FILE} for the format"
        ) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise LossmaskError(f"cannot read {path}: {exc}") from None
    if not isinstance(data, dict) or not isinstance(data.get("documents"), dict) or not isinstance(
        data.get("facts"), list
    ):
        raise LossmaskError(f'{path}: expected {{"documents": {{doc_id: {{...}}}}, "facts": [...]}}')
    docs = {doc_id: _doc_info(path, workspace, doc_id, entry) for doc_id, entry in data["documents"].items()}
    facts: list[Fact] = []
    counts: dict[str, int] = {}
    for i, entry in enumerate(data["facts"]):
        fact = _fact(path, workspace, docs, i, entry, counts)
        facts.append(fact)
    return Catalogue(workspace, docs, tuple(facts))


def _doc_info(path: Path, ws: Workspace, doc_id: str, entry: Any) -> DocInfo:
    where = f"{path} (documents.{doc_id})"
    if not ws.has_doc(doc_id):
        raise LossmaskError(f"{where}: the workspace has no document {doc_id!r}; fix the id or remove the entry")
    if not isinstance(entry, dict) or entry.get("language") not in LANGUAGES:
        raise LossmaskError(f'{where}: give "language": one of {", ".join(LANGUAGES)}')
    for key in ("topic", "summary"):
        if entry.get(key) is not None and not (isinstance(entry[key], str) and entry[key].strip()):
            raise LossmaskError(f"{where}: {key} must be a non-empty string")
    folder = doc_id.rsplit("/", 1)[0] if "/" in doc_id else ""
    title = ws.get_doc(doc_id)["title"]
    return DocInfo(doc_id, title, entry["language"], folder, entry.get("topic"), entry.get("summary"))


def _fact(path: Path, ws: Workspace, docs: dict[str, DocInfo], i: int, entry: Any, counts: dict[str, int]) -> Fact:
    where = f"{path} (facts[{i}])"
    if not isinstance(entry, dict):
        raise LossmaskError(f"{where}: a fact must be an object")
    for key in ("doc", "kind", "subject", "value", "answer"):
        if not isinstance(entry.get(key), str) or not entry[key].strip():
            raise LossmaskError(f"{where}: {key!r} must be a non-empty string")
    doc = entry["doc"]
    if doc not in docs:
        raise LossmaskError(f"{where}: document {doc!r} has no entry in 'documents' (give its language there)")
    if entry["kind"] not in KINDS:
        raise LossmaskError(f"{where}: kind {entry['kind']!r} is not one of {', '.join(KINDS)}")
    value = entry["value"]
    if value not in entry["answer"]:
        raise LossmaskError(f"{where}: the answer must contain the value {value!r} word for word")
    sentence = next((s for s in ws.sentences(doc) if value in s), None)
    if sentence is None:
        raise LossmaskError(f"{where}: no sentence of {doc} contains the value {value!r}; copy it from the document")
    query = entry.get("query") or _keywords(entry["subject"])
    n = counts[doc] = counts.get(doc, 0) + 1
    fact = Fact(f"{doc}#{n}", doc, docs[doc].language, entry["kind"], entry["subject"], value, entry["answer"],
                query, sentence)
    if not _finds(ws, fact, query):
        raise LossmaskError(
            f"{where}: searching {query!r} does not return {doc} among the top {DEFAULT_TOP_K}; "
            'give the fact a "query" with words from its sentence'
        )
    return fact


# ---- direct answers (NO_TOOL) ------------------------------------------------------------------------

_WORDS = (
    ("house", "Haus"), ("dog", "Hund"), ("cat", "Katze"), ("tree", "Baum"), ("water", "Wasser"), ("bread", "Brot"),
    ("apple", "Apfel"), ("book", "Buch"), ("car", "Auto"), ("sun", "Sonne"), ("moon", "Mond"), ("friend", "Freund"),
    ("school", "Schule"), ("milk", "Milch"), ("bird", "Vogel"), ("flower", "Blume"), ("table", "Tisch"),
    ("chair", "Stuhl"), ("door", "Tür"), ("window", "Fenster"), ("city", "Stadt"), ("key", "Schlüssel"),
    ("river", "Fluss"), ("garden", "Garten"), ("cheese", "Käse"), ("bridge", "Brücke"), ("mountain", "Berg"),
    ("street", "Straße"), ("kitchen", "Küche"), ("letter", "Brief"),
)
_SPELL = {
    "en": ("banana", "window", "garden", "river", "computer", "pancake", "bridge", "lamp", "coffee", "holiday",
           "travel", "office", "meeting", "summer", "printer", "keyboard"),
    "de": ("Banane", "Fenster", "Garten", "Brücke", "Kuchen", "Urlaub", "Lampe", "Kaffee", "Straße", "Büro",
           "Reise", "Apfel", "Drucker", "Sommer", "Tastatur", "Besprechung"),
}
_NAMES = ("Anna", "Ben", "Clara", "David", "Emma", "Felix", "Grace", "Henry", "Isla", "Jonas", "Lena", "Max",
          "Nora", "Oskar", "Paula", "Sam")
_SMALL_TALK = {
    "en": (("Hello!", "Hello! How can I help you today?", "Hello"), ("Hi there!", "Hi! What can I do for you?", "Hi"),
           ("Good morning!", "Good morning! How can I help?", "Good morning"),
           ("Thank you!", "You're welcome!", "welcome"),
           ("Thanks, that was helpful.", "Glad I could help!", "Glad"),
           ("Good night!", "Good night! Talk to you soon.", "Good night"),
           ("How are you?", "I'm fine, thank you! What can I do for you?", "fine"),
           ("See you later!", "See you later! Just ask when you need something.", "See you")),
    "de": (("Hallo!", "Hallo! Wie kann ich dir helfen?", "Hallo"), ("Hi!", "Hi! Was kann ich für dich tun?", "Hi"),
           ("Guten Morgen!", "Guten Morgen! Wie kann ich helfen?", "Guten Morgen"),
           ("Danke!", "Gern geschehen!", "Gern"),
           ("Danke, das hat geholfen.", "Schön, dass ich helfen konnte!", "helfen"),
           ("Gute Nacht!", "Gute Nacht! Bis bald.", "Gute Nacht"),
           ("Wie geht es dir?", "Mir geht es gut, danke! Was kann ich für dich tun?", "gut"),
           ("Bis später!", "Bis später! Frag einfach, wenn du etwas brauchst.", "Bis später")),
}
_ABOUT = {
    "en": (("Which tools can you use?", "I can use three tools: workspace.search to find documents by keywords, "
            "workspace.get_doc to read a document by its id, and workspace.list_docs to list the documents.",
            "workspace.search"),
           ("What can you do?", "I can answer questions directly, and I can search and read the documents in this "
            "workspace to answer questions about them.", "documents"),
           ("Who are you?", "I am MyPT, an assistant that can search and read the documents in this workspace.",
            "MyPT"),
           ("Can you read documents?", "Yes. I can search the workspace with workspace.search and read a whole "
            "document with workspace.get_doc.", "workspace.get_doc"),
           ("How do I find a document with you?", "Just ask me about its topic. I search the documents with "
            "workspace.search, or list them with workspace.list_docs.", "workspace.list_docs")),
    "de": (("Welche Werkzeuge kannst du benutzen?", "Ich kann drei Werkzeuge benutzen: workspace.search zum Suchen "
            "nach Stichwörtern, workspace.get_doc zum Lesen eines Dokuments über seine ID und workspace.list_docs "
            "zum Auflisten der Dokumente.", "workspace.search"),
           ("Was kannst du?", "Ich kann Fragen direkt beantworten und die Dokumente in diesem Ordner durchsuchen "
            "und lesen, um Fragen zu ihnen zu beantworten.", "Dokumente"),
           ("Wer bist du?", "Ich bin MyPT, ein Assistent, der die Dokumente in diesem Ordner durchsuchen und lesen "
            "kann.", "MyPT"),
           ("Kannst du Dokumente lesen?", "Ja. Ich kann den Ordner mit workspace.search durchsuchen und ein ganzes "
            "Dokument mit workspace.get_doc lesen.", "workspace.get_doc"),
           ("Wie finde ich mit dir ein Dokument?", "Frag mich einfach nach dem Thema. Ich durchsuche die Dokumente "
            "mit workspace.search oder liste sie mit workspace.list_docs auf.", "workspace.list_docs")),
}


def _no_tool_space(lang: str) -> dict[str, list[tuple[str, str, str]]]:
    """(prompt, answer, key string of the answer) per category, for questions that need no tool."""
    en = lang == "en"
    plus, minus, times, is_ = ("plus", "minus", "times", "is") if en else ("plus", "minus", "mal", "ist")
    ask = "What is {a} {op} {b}?" if en else "Was ist {a} {op} {b}?"
    arithmetic = [(ask.format(a=a, op=plus, b=b), f"{a} {plus} {b} {is_} {a + b}.", str(a + b))
                  for a in range(2, 21) for b in range(2, 21)]
    arithmetic += [(ask.format(a=a, op=times, b=b), f"{a} {times} {b} {is_} {a * b}.", str(a * b))
                   for a in range(2, 13) for b in range(2, 13)]
    arithmetic += [(ask.format(a=a, op=minus, b=b), f"{a} {minus} {b} {is_} {a - b}.", str(a - b))
                   for a in range(10, 31) for b in range(1, 10)]
    if en:
        translation = [(f"What is '{e}' in German?", f"'{e}' in German is '{d}'.", d) for e, d in _WORDS]
        translation += [(f"How do you say '{e}' in German?", f"In German, '{e}' is '{d}'.", d) for e, d in _WORDS]
        letters = [(f"How many letters does the word '{w}' have?", f"The word '{w}' has {len(w)} letters.",
                    str(len(w))) for w in _SPELL["en"]]
        units = [(f"How many minutes are in {h} hours?", f"{h} hours are {h * 60} minutes.", str(h * 60))
                 for h in range(2, 25)]
        units += [(f"How many days are in {w} weeks?", f"{w} weeks are {w * 7} days.", str(w * 7))
                  for w in range(2, 13)]
        units += [(f"How many seconds are in {m} minutes?", f"{m} minutes are {m * 60} seconds.", str(m * 60))
                  for m in range(2, 16)]
        writing = [(f"Write a one-line birthday greeting for {n}.", f"Happy birthday, {n}! All the best for the "
                    "year ahead.", n) for n in _NAMES]
        writing += [(f"Write a short thank-you note to {n}.", f"Dear {n}, thank you very much for your help!", n)
                    for n in _NAMES]
    else:
        translation = [(f"Was heißt '{d}' auf Englisch?", f"'{d}' heißt auf Englisch '{e}'.", e) for e, d in _WORDS]
        translation += [(f"Wie sagt man '{d}' auf Englisch?", f"Auf Englisch sagt man '{e}'.", e) for e, d in _WORDS]
        letters = [(f"Wie viele Buchstaben hat das Wort '{w}'?", f"Das Wort '{w}' hat {len(w)} Buchstaben.",
                    str(len(w))) for w in _SPELL["de"]]
        units = [(f"Wie viele Minuten haben {h} Stunden?", f"{h} Stunden haben {h * 60} Minuten.", str(h * 60))
                 for h in range(2, 25)]
        units += [(f"Wie viele Tage haben {w} Wochen?", f"{w} Wochen haben {w * 7} Tage.", str(w * 7))
                  for w in range(2, 13)]
        units += [(f"Wie viele Sekunden haben {m} Minuten?", f"{m} Minuten haben {m * 60} Sekunden.", str(m * 60))
                  for m in range(2, 16)]
        writing = [(f"Schreib einen kurzen Geburtstagsgruß für {n}.", f"Alles Gute zum Geburtstag, {n}! Ich wünsche "
                    "dir ein schönes neues Lebensjahr.", n) for n in _NAMES]
        writing += [(f"Schreib eine kurze Dankesnachricht an {n}.", f"Hallo {n}, vielen Dank für deine Hilfe!", n)
                    for n in _NAMES]
    return {
        "arithmetic": arithmetic,
        "translation": translation,
        "letters": letters,
        "units": units,
        "writing": writing,
        "small_talk": list(_SMALL_TALK[lang]),
        "about": list(_ABOUT[lang]),
    }


# ---- validation --------------------------------------------------------------------------------------


def validate_record(record: dict, workspace: Workspace) -> None:
    """Raise LossmaskError unless the record is a sound tool episode (the checks in the module docstring)."""
    meta = record.get("_meta", {})

    def fail(reason: str) -> None:
        raise LossmaskError(
            f"generated {meta.get('generator')} episode ({meta.get('pattern')}, fact {meta.get('fact')}) is "
            f"invalid: {reason}. This is a bug in lossmask.generate.tools or in the workspace's {FACTS_FILE}"
        )

    try:
        parse_record(record, Source("<generated>", 0), "native")
    except InputError as exc:
        fail(str(exc))
    messages = record["messages"]
    calls: list[str] = []
    results: list[Any] = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant_toolcall":
            continue
        name, arguments = m["name"], m["arguments"]
        problem = check_call(name, arguments)
        if problem is not None:
            fail(f"tool call {len(calls) + 1} does not fit the tool schemas: {problem}")
        if json.loads(json.dumps(arguments, ensure_ascii=False)) != arguments:
            fail(f"tool call {len(calls) + 1} arguments do not survive a JSON round trip")
        answer = messages[i + 1] if i + 1 < len(messages) else {}
        if answer.get("role") != "toolresult" or answer.get("name") != name:
            fail(f"tool call {len(calls) + 1} ({name}) is not followed by its result")
        if answer["content"] != workspace.call(name, arguments):
            fail(f"the result of tool call {len(calls) + 1} ({name}) is not what the tool returns")
        calls.append(name)
        results.append(json.loads(answer["content"]))
    if calls != meta.get("expected_tools"):
        fail(f"calls {calls} differ from expected_tools {meta.get('expected_tools')}")
    final = messages[-1]
    if final["role"] != "assistant" or not final.get("content", "").strip():
        fail("the episode does not end with an assistant answer")
    cited = meta.get("cited_docs", [])
    missing = [d for d in cited if not workspace.has_doc(d)]
    if missing:
        fail(f"cited documents {missing} do not exist")
    if final.get("cite") != (", ".join(cited) if cited else None):
        fail(f"cite {final.get('cite')!r} does not match cited_docs {cited}")
    for text in meta.get("answer_contains", []):
        if text not in final["content"]:
            fail(f"the answer does not contain {text!r}")
        if calls and not any(_grounds(result, text, cited) for result in results):
            fail(f"{text!r} is in no tool result of a cited document")
    _check_shape(meta, calls, results, messages, fail)


def _grounds(result: Any, text: str, cited: list[str]) -> bool:
    if "text" in result:
        return result["doc_id"] in cited and text in result["text"]
    return any(r["doc_id"] in cited and text in r["snippet"] for r in result.get("results", []))


def _check_shape(meta: dict, calls: list[str], results: list[Any], messages: list[dict], fail) -> None:
    """The pattern the record claims matches the calls it makes."""
    pattern = meta.get("pattern")
    errors = ["error" in r for r in results]
    if pattern not in PATTERNS:
        fail(f"unknown pattern {pattern!r}")
    if pattern == "NO_TOOL":
        if calls or meta.get("cited_docs"):
            fail("a NO_TOOL episode calls tools or cites documents")
        return
    if not calls or errors[-1]:
        fail("a tool episode must call tools and end on a successful result")
    if pattern == "ERROR_RECOVERY":
        if not errors[0]:
            fail("an ERROR_RECOVERY episode must start with a call that fails")
    elif any(errors):
        fail(f"a {pattern} episode has an error result")
    if meta.get("correction"):
        thinks = [m for m in messages if m["role"] == "assistant" and m.get("think")]
        if calls[0] != LIST_DOCS or not thinks:
            fail("a correction episode must start with list_docs and explain the switch in a think")
    tail = {
        "SEARCH_ANSWER": calls[-1] == SEARCH,
        "SEARCH_GETDOC_ANSWER": calls[-2:] == [SEARCH, GET_DOC],
        "LIST_SELECT_SUMMARIZE": calls == [LIST_DOCS, GET_DOC],
        "ERROR_RECOVERY": calls[0] == GET_DOC,
    }
    if not tail[pattern]:
        fail(f"calls {calls} do not fit the pattern {pattern}")
