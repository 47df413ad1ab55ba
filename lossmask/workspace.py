"""A folder of documents the model can search and read through tools, confined to that folder.

A workspace is a directory of ``.md`` and ``.txt`` files (any depth; hidden files and folders skipped).
A document's id is its path relative to the root, with ``/`` between folders and without the extension
(``handbook/travel-policy``); its title is its first non-blank line, without leading ``#`` marks.

Every file is read once, when the workspace is opened, into an in-memory SQLite FTS5 index: nothing is
written next to the user's documents, and there is no cache to go stale. Tools then answer from that
index only and never open a path taken from a tool argument, which is what confines them: a doc id that
climbs out (``../x``, ``..\\x``), an absolute path, a NUL byte or a backslash is refused with an error
result, and a symlink whose target lies outside the root is never indexed, so it cannot be read.

Ranking is deterministic: FTS5 ``bm25`` (title weighted 3, text 1) over the words of the query joined
with OR (Porter-stemmed, diacritics folded; words of 4+ letters also match as prefixes, so "Urlaub"
finds "Urlaubstage"), ties broken by doc id. The snippet of a hit is the sentence of that document that
best matches the query (bm25 over sentences, ties to the earlier one; the first sentence when only the
title matched), cut to ``SNIPPET_CHARS`` at a word boundary with "…". Sentences are split at ``.!?`` followed
by a capital, except after a German ordinal: a one- or two-digit number followed by a month name or
preceded by an article or preposition ("am 3. Juni", "in der 2. Klasse").

Tools (``TOOLS``, public names as the model writes them): ``workspace.search {query, top_k}`` →
``{"results": [{doc_id, score, snippet, title}, ...]}``; ``workspace.get_doc {doc_id}`` → ``{doc_id, text,
title}`` (``truncated: true`` past ``MAX_TEXT_CHARS``); ``workspace.list_docs {prefix}`` → ``{"docs":
{doc_id: title, ...}, "total": n}`` (the first ``LIST_LIMIT``; a mapping, so a long list does not repeat
its keys). ``Workspace.call`` validates the arguments against the schema and returns compact JSON text
(sorted keys, no spaces, non-ASCII kept); anything wrong with a call — unknown tool, missing, unknown or
ill-typed argument, unknown or escaping doc id — comes back as ``{"error": "..."}`` (plus
``did_you_mean`` for near-miss doc ids), never as an exception, because the model has to learn to read
the error and correct its call.
"""
from __future__ import annotations

import difflib
import json
import os
import re
import sqlite3
import unicodedata
from pathlib import Path
from typing import Any

from lossmask.errors import LossmaskError, json_kind

SUFFIXES = (".md", ".txt")
SNIPPET_CHARS = 180  # longest snippet a search result shows
MAX_TEXT_CHARS = 8000  # longest document text get_doc shows; longer ones are cut and marked truncated
LIST_LIMIT = 50  # most documents list_docs shows at once
DEFAULT_TOP_K = 3
MAX_TOP_K = 10
_MAX_QUERY_WORDS = 32
_PREFIX_FROM = 4  # query words this long also match longer words: German compounds (Urlaub -> Urlaubstage)
_TOKENIZER = "porter unicode61 remove_diacritics 2"

TOOLS: list[dict[str, Any]] = [
    {
        "type": "function",
        "function": {
            "name": "workspace.search",
            "description": "Search the workspace documents by keywords. Returns the best matching documents "
            "(doc_id, title, score) with the sentence that matches best as a snippet.",
            "parameters": {
                "type": "object",
                "properties": {
                    "query": {"type": "string", "minLength": 1, "maxLength": 500,
                              "description": "keywords to search for"},
                    "top_k": {"type": "integer", "minimum": 1, "maximum": MAX_TOP_K,
                              "description": f"how many results to return (default {DEFAULT_TOP_K})"},
                },
                "required": ["query"],
                "additionalProperties": False,
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "workspace.get_doc",
            "description": "Read one document in full by its doc_id (as returned by search or list_docs).",
            "parameters": {
                "type": "object",
                "properties": {
                    "doc_id": {"type": "string", "minLength": 1, "maxLength": 300,
                               "description": "the document's id, e.g. handbook/travel-policy"},
                },
                "required": ["doc_id"],
                "additionalProperties": False,
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "workspace.list_docs",
            "description": "List the ids and titles of the workspace documents, optionally only those whose "
            "id starts with a prefix such as a folder name.",
            "parameters": {
                "type": "object",
                "properties": {
                    "prefix": {"type": "string", "maxLength": 300,
                               "description": "only ids starting with this, e.g. handbook/"},
                },
                "required": [],
                "additionalProperties": False,
            },
        },
    },
]
TOOL_NAMES: tuple[str, ...] = tuple(tool["function"]["name"] for tool in TOOLS)
_SCHEMAS: dict[str, dict[str, Any]] = {tool["function"]["name"]: tool["function"]["parameters"] for tool in TOOLS}
_TYPES = {"string": (str, "a string"), "integer": (int, "an integer")}
_SENTENCE_END = re.compile(r"[.!?][\"'”“)]*\s+(?=[\"'„“(]?[A-ZÄÖÜ0-9])")
_MONTHS = frozenset(
    "Januar Februar März April Mai Juni Juli August September Oktober November Dezember".split()
)
_ORDINAL_BEFORE = frozenset("am vom zum zur bis im ab seit dem der den des die das jeden jedem".split())
_BULLET = re.compile(r"^(?:[-*+]|\d+[.)])\s+")


class WorkspaceError(LossmaskError):
    """A tool call the workspace refuses; ``call`` turns it into an ``{"error": ...}`` result."""

    def __init__(self, message: str, did_you_mean: list[str] | None = None):
        super().__init__(message)
        self.did_you_mean = did_you_mean or []

    def result(self) -> dict[str, Any]:
        out: dict[str, Any] = {"error": str(self)}
        if self.did_you_mean:
            out["did_you_mean"] = self.did_you_mean
        return out


def sample_workspace() -> Path:
    """The bilingual sample workspace shipped with lossmask (``lossmask/data/workspace``)."""
    return Path(__file__).resolve().parent / "data" / "workspace"


def tool_json(value: Any) -> str:
    """The one way tool results are written: compact, sorted keys, non-ASCII kept."""
    return json.dumps(value, ensure_ascii=False, sort_keys=True, separators=(",", ":"))


class Workspace:
    """A folder of documents indexed in memory with SQLite FTS5; tools are answered from the index only."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        if not self.root.is_dir():
            raise LossmaskError(f"workspace {self.root} is not a directory; give a folder of .md/.txt documents")
        self.skipped: list[str] = []  # links not indexed: they resolve outside the root or to no file
        self._docs: dict[str, tuple[str, str]] = {}  # doc_id -> (title, text)
        self._sentences: dict[str, tuple[str, ...]] = {}
        for path, doc_id in self._files():
            text = _read(path)
            self._docs[doc_id] = (_title(text, doc_id), text)
            self._sentences[doc_id] = tuple(sentences(_body(text)))
        if not self._docs:
            raise LossmaskError(f"workspace {self.root} holds no .md or .txt documents")
        self.doc_ids: tuple[str, ...] = tuple(sorted(self._docs))
        self._db = _index(self._docs, self._sentences)

    # ---- the tools, as Python ----------------------------------------------------------------------

    def search(self, query: str, top_k: int = DEFAULT_TOP_K) -> list[dict[str, Any]]:
        """Best matches for the words of ``query``: doc_id, title, snippet, score (higher is better)."""
        words = list(dict.fromkeys(re.findall(r"\w+", unicodedata.normalize("NFC", query).lower())))
        words = words[:_MAX_QUERY_WORDS]
        if not words:
            raise WorkspaceError("the query has no words to search for; give keywords such as 'travel policy'")
        if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= MAX_TOP_K:
            raise WorkspaceError(f"top_k must be an integer from 1 to {MAX_TOP_K}, got {top_k!r}")
        match = " OR ".join(f'"{w}"*' if len(w) >= _PREFIX_FROM else f'"{w}"' for w in words)
        rows = self._db.execute(
            "SELECT doc_id, bm25(docs, 0.0, 3.0, 1.0) AS rank FROM docs WHERE docs MATCH ? "
            "ORDER BY rank, doc_id LIMIT ?",
            (match, top_k),
        ).fetchall()
        return [
            {"doc_id": doc_id, "title": self._docs[doc_id][0], "snippet": self._snippet(doc_id, match),
             "score": round(-rank, 2) + 0.0}
            for doc_id, rank in rows
        ]

    def get_doc(self, doc_id: str) -> dict[str, str]:
        """The document with this id: doc_id, title, text (the whole file)."""
        doc_id = self._known(doc_id, "doc_id")
        title, text = self._docs[doc_id]
        return {"doc_id": doc_id, "title": title, "text": text}

    def list_docs(self, prefix: str = "") -> list[dict[str, str]]:
        """Every document whose id starts with ``prefix``, by id: doc_id, title."""
        _check_relative(prefix, "prefix", allow_empty=True)
        return [{"doc_id": d, "title": self._docs[d][0]} for d in self.doc_ids if d.startswith(prefix)]

    def sentences(self, doc_id: str) -> tuple[str, ...]:
        """The sentences a snippet is chosen from, each an exact substring of the document's text."""
        return self._sentences[self._known(doc_id, "doc_id")]

    def has_doc(self, doc_id: str) -> bool:
        return doc_id in self._docs

    # ---- the tools, as the model calls them --------------------------------------------------------

    def call(self, name: Any, arguments: Any) -> str:
        """Run a tool by its public name; the JSON text the model sees (errors as ``{"error": ...}``)."""
        problem = check_call(name, arguments)
        if problem is not None:
            return tool_json({"error": problem})
        try:
            if name == "workspace.search":
                top_k = arguments.get("top_k", DEFAULT_TOP_K)
                return tool_json({"results": self.search(arguments["query"], top_k)})
            if name == "workspace.get_doc":
                doc = self.get_doc(arguments["doc_id"])
                if len(doc["text"]) > MAX_TEXT_CHARS:
                    doc = {**doc, "text": doc["text"][:MAX_TEXT_CHARS], "truncated": True}
                return tool_json(doc)
            docs = self.list_docs(arguments.get("prefix", ""))
            return tool_json({"docs": {d["doc_id"]: d["title"] for d in docs[:LIST_LIMIT]}, "total": len(docs)})
        except WorkspaceError as exc:
            return tool_json(exc.result())

    def close(self) -> None:
        self._db.close()

    # ---- internals ---------------------------------------------------------------------------------

    def _files(self) -> list[tuple[Path, str]]:
        """(path, doc_id) of every document inside the root, sorted; symlinks out of the root skipped."""
        root = self.root.resolve()
        found: dict[str, Path] = {}
        for folder, dirs, files in os.walk(self.root, followlinks=False):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            for name in sorted(files):
                path = Path(folder) / name
                if name.startswith(".") or path.suffix.lower() not in SUFFIXES:
                    continue
                if not path.resolve().is_relative_to(root) or not path.resolve().is_file():
                    self.skipped.append(str(path))
                    continue
                doc_id = path.relative_to(self.root).with_suffix("").as_posix()
                if doc_id in found:
                    raise LossmaskError(
                        f"workspace {self.root}: {found[doc_id]} and {path} both have the doc id {doc_id!r}; "
                        "rename one of them"
                    )
                found[doc_id] = path
        return sorted((path, doc_id) for doc_id, path in found.items())

    def _known(self, doc_id: Any, field: str) -> str:
        _check_relative(doc_id, field, allow_empty=False)
        if doc_id not in self._docs:
            raise WorkspaceError(
                f"no document with doc_id {doc_id!r}; use workspace.search or workspace.list_docs to find doc ids",
                self._near(doc_id),
            )
        return doc_id

    def _near(self, doc_id: str) -> list[str]:
        """Ids the caller probably meant: same name without extension, case or folder, or close spelling."""
        key = _stem(doc_id)
        same = [d for d in self.doc_ids if _stem(d) == key or _stem(d).rsplit("/", 1)[-1] == key]
        close = difflib.get_close_matches(doc_id, self.doc_ids, n=3, cutoff=0.75)
        return list(dict.fromkeys(same + close))[:3]

    def _snippet(self, doc_id: str, match: str) -> str:
        row = self._db.execute(
            "SELECT idx FROM sentences WHERE sentences MATCH ? AND doc_id = ? "
            "ORDER BY bm25(sentences), idx LIMIT 1",
            (match, doc_id),
        ).fetchone()
        options = self._sentences[doc_id]
        if not options:
            return ""
        return _cut(options[row[0] if row else 0], SNIPPET_CHARS)


def check_call(name: Any, arguments: Any) -> str | None:
    """Why a tool call does not fit the tool schemas (unknown tool, bad arguments), or None if it does."""
    if not isinstance(name, str) or name not in _SCHEMAS:
        return f"unknown tool {name!r}; available tools: {', '.join(TOOL_NAMES)}"
    if not isinstance(arguments, dict):
        return f"arguments of {name} must be a JSON object, got {json_kind(arguments)}"
    schema = _SCHEMAS[name]
    properties = schema["properties"]
    takes = ", ".join(f"{key} ({spec['type']})" for key, spec in properties.items()) or "no arguments"
    for key in arguments:
        if key not in properties:
            return f"unknown argument {key!r} for {name}; it takes: {takes}"
    for key in schema["required"]:
        if key not in arguments:
            return f"missing required argument {key!r} for {name}; it takes: {takes}"
    for key, value in arguments.items():
        spec = properties[key]
        python_type, described = _TYPES[spec["type"]]
        if isinstance(value, bool) or not isinstance(value, python_type):
            return f"argument {key!r} of {name} must be {described}, got {json_kind(value)}"
        if isinstance(value, str):
            if len(value) < spec.get("minLength", 0):
                return f"argument {key!r} of {name} must not be empty"
            if len(value) > spec.get("maxLength", len(value)):
                return f"argument {key!r} of {name} is longer than {spec['maxLength']} characters"
        elif not spec.get("minimum", value) <= value <= spec.get("maximum", value):
            return f"argument {key!r} of {name} must be from {spec['minimum']} to {spec['maximum']}, got {value}"
    return None


def sentences(text: str) -> list[str]:
    """Sentences of a document body: per non-heading line, bullet marks dropped, split at sentence ends."""
    out = []
    for line in text.split("\n"):
        line = _BULLET.sub("", line.strip())
        if not line or line.startswith("#"):
            continue
        start = 0
        for end in _SENTENCE_END.finditer(line):
            if _ordinal(line[start : end.start()], line[end.end() :]):
                continue
            out.append(line[start : end.start() + 1].strip())
            start = end.end()
        out.append(line[start:].strip())
    return [s for s in out if s]


def _ordinal(before: str, after: str) -> bool:
    """Whether the period between ``before`` and ``after`` ends a German ordinal ("am 3. Juni"), not a sentence."""
    number = re.search(r"(?:^|\s)(?:(\w+)\s+)?\d{1,2}$", before)
    if number is None:
        return False
    following = re.match(r"\w*", after).group()
    return following in _MONTHS or (number.group(1) or "") in _ORDINAL_BEFORE


def _check_relative(value: Any, field: str, allow_empty: bool) -> None:
    """Refuse ids that are not plain relative paths inside the workspace (the confinement rule)."""
    if not isinstance(value, str):
        raise WorkspaceError(f"{field} must be a string, got {json_kind(value)}")
    if not value and not allow_empty:
        raise WorkspaceError(f"{field} is empty; give a doc id such as handbook/travel-policy")
    if "\x00" in value:
        raise WorkspaceError(f"{field} contains a NUL byte; doc ids are plain relative paths")
    if ".." in re.split(r"[/\\]", value):
        raise WorkspaceError(f"{field} {value!r} points outside the workspace; '..' is not allowed")
    if value.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", value):
        raise WorkspaceError(f"{field} {value!r} is an absolute path; doc ids are relative to the workspace root")
    if "\\" in value:
        raise WorkspaceError(f"{field} {value!r} contains '\\'; doc ids use '/' between folders")


def _read(path: Path) -> str:
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise LossmaskError(
            f"{path}: not valid UTF-8 at byte {exc.start} ({exc.reason}); save the document as UTF-8 "
            "or move it out of the workspace"
        ) from None
    text = text.removeprefix("\ufeff").replace("\r\n", "\n").replace("\r", "\n")
    return unicodedata.normalize("NFC", text).strip()


def _title(text: str, doc_id: str) -> str:
    for line in text.split("\n"):
        if line.strip():
            return line.strip().lstrip("#").strip() or doc_id
    return doc_id.rsplit("/", 1)[-1]


def _body(text: str) -> str:
    """The text without its title line (the title is indexed and shown on its own)."""
    lines = text.split("\n")
    return "\n".join(lines[1:]) if lines and lines[0].strip() else text


def _index(docs: dict[str, tuple[str, str]], sentence_map: dict[str, tuple[str, ...]]) -> sqlite3.Connection:
    db = sqlite3.connect(":memory:", check_same_thread=False)  # read-only after building
    try:
        db.execute(f"CREATE VIRTUAL TABLE docs USING fts5(doc_id UNINDEXED, title, body, tokenize='{_TOKENIZER}')")
        db.execute(f"CREATE VIRTUAL TABLE sentences USING fts5(doc_id UNINDEXED, idx UNINDEXED, text, "
                   f"tokenize='{_TOKENIZER}')")
    except sqlite3.OperationalError as exc:
        db.close()
        raise LossmaskError(
            f"this Python's SQLite ({sqlite3.sqlite_version}) cannot build the workspace index: {exc}. "
            "The workspace needs SQLite 3.27 or newer with FTS5, which standard CPython builds include; "
            "use such a Python"
        ) from exc
    db.executemany("INSERT INTO docs VALUES (?, ?, ?)", [(d, t, _body(x)) for d, (t, x) in sorted(docs.items())])
    db.executemany(
        "INSERT INTO sentences VALUES (?, ?, ?)",
        [(d, i, s) for d, found in sorted(sentence_map.items()) for i, s in enumerate(found)],
    )
    return db


def _cut(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    head = text[: limit - 1]
    space = head.rfind(" ")
    return (head[:space] if space > limit // 2 else head).rstrip(" ,;:") + "…"


def _stem(doc_id: str) -> str:
    """An id compared loosely: lower case, no .md/.txt extension."""
    lowered = doc_id.casefold()
    for suffix in SUFFIXES:
        lowered = lowered.removesuffix(suffix)
    return lowered
