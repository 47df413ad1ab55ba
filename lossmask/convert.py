"""``lossmask convert``: public Hugging Face datasets → native episode JSONL that ``lossmask prepare`` reads.

Each output line is ``{"system"?, "tools"?, "messages": [...], "language"?, "_meta": {"converter", "source_id"}}``.
Every record is serialized, read back and checked with ``sources.parse_record`` before it is written; a
record that fails is counted as rejected with its reason and never written. Nothing is half-converted:
a row either becomes one whole episode or is rejected.

SOURCE is a local path or a Hub id. Local: a ``.parquet``, ``.json``/``.jsonl`` (``.gz`` too), ``.csv``
(every cell read as text) or ``.arrow`` file (one split: ``split`` does not apply), a directory written by
``save_to_disk`` (a DatasetDict is indexed by ``split``), or any other directory of data files
(``datasets`` infers the splits from file names such as ``data/train-00000.parquet``; unnamed files are
``train``). Hub ids are ``owner/name`` or ``owner/name:config``. The output is written to a temporary
file renamed into place at the end, so an error leaves no partial file and an older output untouched.

Policies shared by every kind:

- ``max_examples`` is applied after filtering and validation: a seeded sample, the ``max_examples``
  valid episodes with the smallest ``blake2b(seed, source_id, row)`` hash, written in source order. It
  is deterministic for a seed, uniform over the episodes, and needs memory only for the sample.
- ``languages`` filter (``en de``; case-insensitive; ``pt`` also matches ``pt-BR``): oasst2 filters on the
  tree's ``lang``, other kinds on a ``language`` column when the data has one (rows with no value are
  filtered out). Without such a column nothing is filtered; with exactly one language given, every
  episode is tagged with it (e.g. ``--languages de`` for alpaca-gpt4_de); the report notes which.
- ``source_id`` is the row's ``id`` (or ``prompt_id``, ``conversation_id``, ``uuid``), else ``row:N`` (0-based).
- Messages after the last assistant message (an unanswered prompt, a trailing tool result) are dropped:
  nothing would train on them. Text is copied verbatim except where a kind says otherwise.

Kinds:

- ``oasst2``: message rows (``message_id``, ``parent_id``, ``text``, ``role``, ``lang``, ``rank``, ``deleted``,
  ``review_result``, ``message_tree_id``, ``tree_state``) or the trees form (one row per tree, the prompt
  with nested ``replies``). Per tree (trees whose ``tree_state`` is present and not ``ready_for_export`` are
  skipped) one conversation: from the root prompt, follow the best reply at every step until a message
  has no replies. Best = lowest ``rank`` (0 is best), unranked (null) after ranked, ties by smallest
  ``message_id``. Messages with ``deleted`` true or ``review_result`` false are removed together with
  their replies. A path ending in an unanswered prompt loses that prompt. ``min_depth`` counts messages
  (user and assistant) on the path; the default 2 keeps single-turn and multi-turn conversations.
- ``alpaca``: ``instruction``/``input``/``output`` (optional ``system``, ``history`` [[user, assistant], ...]):
  user = instruction and input joined by a blank line, a blank one left out, as sources.py reads alpaca.
- ``sharegpt`` / ``ultrachat`` (the same converter): ``conversations`` (``from``/``value``), ``messages``
  (``role``/``content``, UltraChat 200k) or ``data`` (alternating user/assistant strings, UltraChat).
  A system message is allowed only first; the rest must alternate user, assistant, starting with user
  (else rejected ``not_alternating``).
- ``tool-xml``: Hermes / Qwen style tool use written in the text, as ``conversations`` or ``messages``.
  Assistant text holds ``<tool_call>...</tool_call>`` blocks: each a JSON object ``{"name", "arguments"}``
  (or a list of them); Python-literal dicts (single quotes, as in NousResearch hermes-function-calling-v1)
  and Python call syntax ``name(key=value)`` (OLMo 3 / Dolci ``<function_calls>`` and the ``function_calls``
  message field) are read too. ``arguments`` must be an object or a JSON string holding one. Text before
  the first call becomes an ``assistant`` message (surrounding whitespace removed: it was glue for the
  XML), the calls ``assistant_toolcall`` messages; text after a call rejects the record. Tool results:
  messages with role ``tool``/``environment``/``observation``/``function``/``ipython`` and
  ``<tool_response>`` blocks (in those or in user messages) become ``toolresult`` messages (name taken
  from a JSON ``"name"`` in the result, if any). Tool schemas come from a ``tools`` column (a list, whose
  null-valued keys are dropped: Arrow structs add them, or a JSON string), else a system ``functions``
  field, else the system prompt's ``<tools>``/``<functions>`` blocks (a JSON list, one object, JSON lines,
  or Python literals; blank blocks are mentions, not schemas). ``system_tools`` says what
  happens to those blocks in the system text: ``keep`` (verbatim, default: renderers without a tools
  slot still show them), ``cut`` (blocks removed) or ``drop`` (the whole system prompt removed, for chat
  templates that write their own tool instructions). Rejection reasons: bad_tool_call_json,
  tool_call_not_object, bad_tool_call, missing_tool_name, missing_tool_arguments, bad_tool_arguments,
  unclosed_tag, stray_close_tag, text_after_tool_call, bad_tool_response, bad_tools.
"""
from __future__ import annotations

import ast
import csv
import hashlib
import heapq
import itertools
import json
import re
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Callable, Iterable, Iterator

from lossmask.episode import TRAINED_BY_DEFAULT, Source
from lossmask.atomic import atomic_file
from lossmask.errors import EpisodeError, InputError, LossmaskError
from lossmask.sources import parse_record

KINDS: tuple[str, ...] = ("oasst2", "alpaca", "sharegpt", "ultrachat", "tool-xml")
SYSTEM_TOOLS: tuple[str, ...] = ("keep", "cut", "drop")

_ID_COLUMNS = ("id", "prompt_id", "conversation_id", "uuid")
_OASST_COLUMNS = ("message_id", "parent_id", "text", "role", "message_tree_id")
_CHAT_ROLES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "prompter": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "model": "assistant",
    "chatgpt": "assistant",
    "bard": "assistant",
    "bing": "assistant",
}
_TOOL_ROLES = {
    **_CHAT_ROLES,
    "tool": "tool",
    "environment": "tool",
    "observation": "tool",
    "function": "tool",
    "function_response": "tool",
    "ipython": "tool",
}
_CALL_TAGS = ("tool_call", "function_calls")
_TOOLS_TAGS = ("tools", "functions")
_CALL_HINT = 'write each call as {"name": "tool", "arguments": {...}} inside <tool_call></tool_call>'
_TOOLS_HINT = 'list the schemas as JSON: [{"type": "function", "function": {"name": ..., "parameters": {...}}}]'


@dataclass
class ConvertReport:
    """What a conversion did: counts by outcome, for the CLI summary and for tests."""

    kind: str
    source: str
    output: str
    rows_read: int = 0
    valid: int = 0  # episodes that passed validation and the language filter, before max_examples
    episodes_written: int = 0
    rejected: Counter = field(default_factory=Counter)  # reason -> records
    rejected_examples: dict[str, str] = field(default_factory=dict)  # reason -> first problem
    skipped: Counter = field(default_factory=Counter)  # policy drops, e.g. other_language, too_short
    languages: Counter = field(default_factory=Counter)  # written episodes per language ("unknown")
    turns: Counter = field(default_factory=Counter)  # assistant turns per written episode -> episodes
    notes: list[str] = field(default_factory=list)

    def reject(self, source_id: str, problem: EpisodeError) -> None:
        self.rejected[problem.reason] += 1
        if problem.reason not in self.rejected_examples:
            where = f" (field {problem.field})" if problem.field else ""
            self.rejected_examples[problem.reason] = f"{source_id}{where}: {problem.message}"

    def to_dict(self) -> dict:
        return {
            "kind": self.kind,
            "source": self.source,
            "output": self.output,
            "rows_read": self.rows_read,
            "valid": self.valid,
            "episodes_written": self.episodes_written,
            "rejected": dict(self.rejected),
            "rejected_examples": dict(self.rejected_examples),
            "skipped": dict(self.skipped),
            "languages": dict(self.languages),
            "turns": {str(k): v for k, v in sorted(self.turns.items())},
            "notes": list(self.notes),
        }


@dataclass(frozen=True)
class _Options:
    kind: str
    min_depth: int
    system_tools: str
    language_column: bool  # rows carry a "language" column (kinds other than oasst2)
    language_tag: str | None  # the one --languages value tagged on rows without a language column


# One converted row or tree: (0-based row index, source_id, record or the reason it was rejected).
_Item = tuple[int, str, "dict | EpisodeError"]


def convert(
    kind: str,
    source: str,
    output: str,
    *,
    languages: Iterable[str] | None = None,
    max_examples: int | None = None,
    seed: int = 0,
    split: str = "train",
    min_depth: int = 2,
    system_tools: str = "keep",
) -> ConvertReport:
    """Convert SOURCE (local data or a Hub id) of the given kind into native episode JSONL at OUTPUT."""
    if kind not in KINDS:
        raise LossmaskError(f"unknown kind {kind!r}; choose one of {', '.join(KINDS)}")
    if max_examples is not None and max_examples < 1:
        raise LossmaskError(f"--max-examples must be at least 1, got {max_examples}")
    if min_depth < 2:
        raise LossmaskError(f"min_depth must be at least 2 (a prompt and a reply), got {min_depth}")
    if system_tools not in SYSTEM_TOOLS:
        raise LossmaskError(f"unknown system_tools {system_tools!r}; choose one of {', '.join(SYSTEM_TOOLS)}")
    wanted = _normalize_languages(languages)
    report = ConvertReport(kind, str(source), str(output))
    first, rows = _peek(_load_rows(str(source), split, report))
    if first is not None:
        _check_columns(kind, first, str(source))
    has_column = kind != "oasst2" and first is not None and "language" in first
    tag = _language_tag(kind, wanted, has_column, report)
    options = _Options(kind, min_depth, system_tools, has_column, tag)
    filtering = bool(wanted) and (kind == "oasst2" or has_column)
    sampler = _Sampler(max_examples, seed) if max_examples is not None else None
    with atomic_file(output) as out:
        for index, source_id, item in _CONVERTERS[kind](rows, options, report):
            if isinstance(item, EpisodeError):
                report.reject(source_id, item)
                continue
            language = item.get("language")
            if filtering and not _language_matches(language, wanted):
                report.skipped["other_language"] += 1
                continue
            try:
                line, turns = _validated_line(item, kind, source_id, str(source), index)
            except EpisodeError as exc:
                report.reject(source_id, exc)
                continue
            report.valid += 1
            entry = (line, language or "unknown", turns)
            if sampler is None:
                _write(out, entry, report)
            else:
                sampler.offer(index, source_id, entry)
        if sampler is not None:
            for entry in sampler.kept():
                _write(out, entry, report)
            if report.valid > report.episodes_written:
                report.skipped["over_max_examples"] = report.valid - report.episodes_written
    return report


def print_convert_report(report: ConvertReport, console=None) -> None:
    """The end-of-run summary: counts, reasons with a first example, languages and turns per episode."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    console = console or Console()
    title = f"lossmask convert {report.kind} → {report.output}"
    table = Table(title=escape(title), show_header=False, title_justify="left")
    table.add_column("what", style="bold")
    table.add_column("value", justify="right")
    table.add_row("rows read", f"{report.rows_read:,}")
    table.add_row("valid episodes", f"{report.valid:,}")
    table.add_row("episodes written", f"{report.episodes_written:,}")
    table.add_row("rejected", f"{sum(report.rejected.values()):,}")
    for reason, n in sorted(report.rejected.items()):
        table.add_row(f"  {reason}", f"{n:,}")
    for reason, n in sorted(report.skipped.items()):
        table.add_row(f"skipped: {reason}", f"{n:,}")
    languages = escape(", ".join(f"{lang} {n:,}" for lang, n in report.languages.most_common()))
    table.add_row("languages", languages or "-")
    turns = ", ".join(f"{k}: {n:,}" for k, n in sorted(report.turns.items()))
    table.add_row("assistant turns: episodes", turns or "-")
    console.print(table)
    for reason, example in sorted(report.rejected_examples.items()):
        console.print(f"[yellow]{reason}[/], e.g. {escape(example)}", highlight=False)
    for note in report.notes:
        console.print(f"[yellow]note:[/] {escape(note)}", highlight=False)
    if report.episodes_written == 0:
        console.print("[red]no episodes written[/]: check the kind, the --languages filter and the reasons above")


# ---- loading ---------------------------------------------------------------------------------------

_JSON_SUFFIXES = (".jsonl", ".json", ".jsonl.gz", ".json.gz")
_HUB_ID = re.compile(r"[\w.-]+(/[\w.-]+)?(:[\w.-]+)?")


def _load_rows(source: str, split: str, report: ConvertReport) -> Iterator[dict]:
    """The rows of SOURCE as dicts; LossmaskError when it cannot be found or read."""
    try:
        import datasets
    except ImportError as exc:
        raise LossmaskError("lossmask convert needs the datasets package: pip install datasets") from exc
    path = Path(source).expanduser()
    try:
        if path.is_dir():
            return iter(_load_dir(datasets, path, split))
        if path.is_file():
            if split != "train":
                report.notes.append(f"a single file is one split: split {split!r} does not apply")
            return iter(_load_file(datasets, path))
        if _looks_local(source):
            raise LossmaskError(f"{source}: no such file or directory")
        name, _, config = source.partition(":")
        if config:
            return iter(datasets.load_dataset(name, config, split=split))
        return iter(datasets.load_dataset(name, split=split))
    except LossmaskError:
        raise
    except Exception as exc:  # datasets raises many types; the user needs the message, not a traceback
        hint = "" if path.exists() else " (no such local path, so it was looked up on the Hugging Face Hub)"
        raise LossmaskError(f"cannot load {source}{hint}: {type(exc).__name__}: {exc}") from exc


def _load_dir(datasets, path: Path, split: str):
    if (path / "dataset_dict.json").exists():
        splits = datasets.load_from_disk(str(path))
        if split not in splits:
            raise LossmaskError(f"{path} has no split {split!r}; its splits are {', '.join(splits)}")
        return splits[split]
    if (path / "state.json").exists():
        return datasets.load_from_disk(str(path))
    return datasets.load_dataset(str(path), split=split)


def _load_file(datasets, path: Path):
    name = path.name.lower()
    if name.endswith(".arrow"):
        return datasets.Dataset.from_file(str(path))
    builder = next(
        (b for suffixes, b in ((_JSON_SUFFIXES, "json"), ((".parquet",), "parquet"), ((".csv",), "csv"))
         if name.endswith(suffixes)),
        None,
    )
    if builder is None:
        raise LossmaskError(
            f"{path}: unknown file type; convert reads .parquet, .json, .jsonl (.gz), .csv and .arrow files "
            "and directories (save_to_disk or data files)"
        )
    if builder == "csv":  # every cell is text: pandas would turn "2" into a number and "" into NaN
        with open(path, newline="", encoding="utf-8") as f:
            header = next(csv.reader(f), [])
        features = datasets.Features({column: datasets.Value("string") for column in header})
        return datasets.load_dataset("csv", data_files=[str(path)], split="train", features=features, na_filter=False)
    return datasets.load_dataset(builder, data_files=[str(path)], split="train")


def _looks_local(source: str) -> bool:
    name = source.lower()
    return (
        source.startswith((".", "/", "~"))
        or name.endswith((*_JSON_SUFFIXES, ".parquet", ".csv", ".arrow"))
        or not _HUB_ID.fullmatch(source)
    )


def _peek(rows: Iterator[dict]) -> tuple[dict | None, Iterator[dict]]:
    first = next(rows, None)
    if first is None:
        return None, iter(())
    return first, itertools.chain([first], rows)


def _check_columns(kind: str, row: dict, source: str) -> None:
    """Fail before writing anything when SOURCE is plainly not data of this kind."""
    columns = ", ".join(row)
    if kind == "oasst2":
        if isinstance(row.get("prompt"), dict) and "message_id" not in row:
            return
        missing = [c for c in _OASST_COLUMNS if c not in row]
        need = "message rows (" + ", ".join(_OASST_COLUMNS) + ") or trees (a 'prompt' with nested 'replies')"
    elif kind == "alpaca":
        missing = [c for c in ("instruction", "output") if c not in row]
        need = "instruction, output (and optionally input)"
    else:
        keys = ("conversations", "messages") + (("data",) if kind in ("sharegpt", "ultrachat") else ())
        missing = [] if any(k in row for k in keys) else list(keys)
        need = " or ".join(keys)
    if missing:
        raise LossmaskError(
            f"{source} does not look like {kind} data: its columns are {columns}; {kind} needs {need}"
        )


# ---- output ----------------------------------------------------------------------------------------


def _write(out: IO[bytes], entry: tuple[bytes, str, int], report: ConvertReport) -> None:
    line, language, turns = entry
    out.write(line)
    report.episodes_written += 1
    report.languages[language] += 1
    report.turns[turns] += 1


def _validated_line(record: dict, kind: str, source_id: str, source: str, index: int) -> tuple[bytes, int]:
    """The record as its final JSONL line, read back exactly as prepare will; and its assistant turns."""
    ordered = {k: record[k] for k in ("system", "tools", "messages", "language") if record.get(k) is not None}
    ordered["_meta"] = {"converter": kind, "source_id": source_id}
    try:
        text = json.dumps(ordered, ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise EpisodeError("not_json", f"record cannot be written as JSON: {exc}") from None
    try:
        line = text.encode("utf-8") + b"\n"
    except UnicodeEncodeError:
        raise EpisodeError("lone_surrogate", "text holds a lone UTF-16 surrogate, which is not text") from None
    try:
        episode = parse_record(json.loads(text), Source(source, index + 1))
    except InputError as exc:
        p = exc.problem
        raise EpisodeError(p.reason, p.message, p.field, p.hint) from None
    roles = [m.role in TRAINED_BY_DEFAULT for m in episode.messages]
    turns = sum(1 for i, trained in enumerate(roles) if trained and (i == 0 or not roles[i - 1]))
    return line, turns


class _Sampler:
    """Keeps the ``limit`` episodes with the smallest seeded hash: a uniform sample in O(limit) memory."""

    def __init__(self, limit: int, seed: int):
        self.limit = limit
        self.seed = seed
        self.heap: list[tuple[int, int, tuple]] = []  # (-hash, row index, entry): a max-heap on the hash

    def offer(self, index: int, source_id: str, entry: tuple) -> None:
        digest = hashlib.blake2b(f"{self.seed}\0{source_id}\0{index}".encode(), digest_size=8).digest()
        key = int.from_bytes(digest, "big")
        if len(self.heap) < self.limit:
            heapq.heappush(self.heap, (-key, index, entry))
        elif key < -self.heap[0][0]:
            heapq.heapreplace(self.heap, (-key, index, entry))

    def kept(self) -> list[tuple]:
        return [entry for _, _, entry in sorted(self.heap, key=lambda item: item[1])]


# ---- languages -------------------------------------------------------------------------------------


def _normalize_languages(languages: Iterable[str] | None) -> list[str]:
    out: list[str] = []
    for value in languages or ():
        for part in str(value).split(","):
            code = part.strip().lower().replace("_", "-")
            if code and code not in out:
                out.append(code)
    return out


def _language_tag(kind: str, wanted: list[str], has_column: bool, report: ConvertReport) -> str | None:
    """Data without languages cannot be filtered: one wanted language is taken as a tag, more are ignored."""
    if not wanted or kind == "oasst2" or has_column:
        return None
    if len(wanted) > 1:
        report.notes.append("the data has no language column: --languages is ignored")
        return None
    report.notes.append(f"the data has no language column: every episode is tagged {wanted[0]!r}, none filtered")
    return wanted[0]


def _language_matches(language: Any, wanted: list[str]) -> bool:
    if not isinstance(language, str):
        return False
    code = language.strip().lower().replace("_", "-")
    return any(code == w or code.startswith(w + "-") for w in wanted)


# ---- per-row kinds ---------------------------------------------------------------------------------


def _per_row(build: Callable[[dict, _Options, ConvertReport], dict]):
    """A converter that turns each row into one record (or rejects it) and adds the row's language."""

    def run(rows: Iterable[dict], options: _Options, report: ConvertReport) -> Iterator[_Item]:
        for index, row in enumerate(rows):
            report.rows_read += 1
            source_id = _row_id(row, index)
            try:
                record = build(row, options, report)
            except EpisodeError as exc:
                yield index, source_id, exc
                continue
            language = row.get("language") if options.language_column else options.language_tag
            if isinstance(language, str) and language.strip():
                record["language"] = language
            yield index, source_id, record

    return run


def _row_id(row: dict, index: int) -> str:
    for key in _ID_COLUMNS:
        value = row.get(key)
        if isinstance(value, (str, int)) and not isinstance(value, bool) and str(value).strip():
            return str(value)
    return f"row:{index}"


def _alpaca(row: dict, options: _Options, report: ConvertReport) -> dict:
    messages: list[dict] = []
    history = row.get("history")
    if history is not None and not isinstance(history, list):
        raise _bad_type("history", "a list of [user, assistant] pairs", history)
    for i, pair in enumerate(history or ()):
        if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(s, str) for s in pair)):
            raise _bad_type(f"history[{i}]", "a pair of strings [user, assistant]", pair)
        messages += [{"role": "user", "content": pair[0]}, {"role": "assistant", "content": pair[1]}]
    instruction = _string(row, "instruction", required=True)
    extra = _string(row, "input", required=False) or ""
    output = _string(row, "output", required=True)
    user = "\n\n".join(s for s in (instruction, extra) if s.strip())
    if not user:
        raise EpisodeError("empty_prompt", "instruction and input are both empty", "instruction")
    messages += [{"role": "user", "content": user}, {"role": "assistant", "content": output}]
    system = _string(row, "system", required=False)
    return {"system": system if system and system.strip() else None, "messages": messages}


def _chat(row: dict, options: _Options, report: ConvertReport) -> dict:
    key, items = _message_list(row, ("conversations", "messages", "data"))
    system = None
    messages: list[dict] = []
    paths: list[str] = []
    for i, m in enumerate(items):
        path = f"{key}[{i}]"
        if key == "data":
            role, content = ("user" if i % 2 == 0 else "assistant"), _check_text(m, path)
        else:
            role, content = _role_content(m, path, _CHAT_ROLES, options.kind)
        if role == "system":
            if i:
                raise _misplaced_system(path)
            system = content
            continue
        messages.append({"role": role, "content": content})
        paths.append(path)
    dropped = _drop_untrained_tail(messages)
    for j, m in enumerate(messages):
        expected = "user" if j % 2 == 0 else "assistant"
        if m["role"] != expected:
            raise EpisodeError(
                "not_alternating",
                f"message {j} is {m['role']}, expected {expected}: turns must alternate user, assistant",
                paths[j],
                "merge or drop the repeated turn",
            )
    report.skipped["trailing_untrained_messages"] += dropped
    return {"system": system, "messages": messages}


def _tool_xml(row: dict, options: _Options, report: ConvertReport) -> dict:
    key, items = _message_list(row, ("conversations", "messages"))
    tools = _tools_value(row.get("tools"), "tools")
    system = None
    messages: list[dict] = []
    for i, m in enumerate(items):
        path = f"{key}[{i}]"
        role, content = _role_content(m, path, _TOOL_ROLES, options.kind, allow_none=True)
        if role == "system":
            if i:
                raise _misplaced_system(path)
            system, block_tools = _system_tools(_check_text(content, f"{path}.content"), path, options.system_tools)
            tools = tools or _tools_value(m.get("functions"), f"{path}.functions") or block_tools
        elif role == "assistant":
            messages += _assistant_calls(content, m.get("function_calls"), path)
        else:
            messages += _tool_results(_check_text(content, f"{path}.content"), path, role)
    report.skipped["trailing_untrained_messages"] += _drop_untrained_tail(messages)
    return {"system": system, "tools": tools, "messages": messages}


def _message_list(row: dict, keys: tuple[str, ...]) -> tuple[str, list]:
    for key in keys:
        value = row.get(key)
        if value is not None:
            if not isinstance(value, list):
                raise _bad_type(key, "a list of messages", value)
            return key, value
    raise EpisodeError("missing_field", f"the row has none of {', '.join(keys)}", keys[0])


def _role_content(
    m: Any, path: str, roles: dict[str, str], kind: str, allow_none: bool = False
) -> tuple[str, Any]:
    """(native role, content) of a ShareGPT ``from``/``value`` or an OpenAI ``role``/``content`` message."""
    if not isinstance(m, dict):
        raise _bad_type(path, "a message object", m)
    role_key = "from" if m.get("from") is not None else "role"
    raw = m.get(role_key)
    if not isinstance(raw, str):
        hint = 'add "role": "user" or similar'
        raise EpisodeError("missing_role", "message has no role", f"{path}.{role_key}", hint)
    role = roles.get(raw.strip().lower())
    if role is None:
        hint = f"roles read: {', '.join(sorted(roles))}"
        if kind != "tool-xml":
            hint += "; tool messages need kind tool-xml"
        raise EpisodeError("unknown_role", f"unknown role {raw[:40]!r} for kind {kind}", f"{path}.{role_key}", hint)
    content_key = "value" if m.get("value") is not None else "content"
    content = m.get(content_key)
    if content is None and allow_none:
        return role, None
    return role, _check_text(content, f"{path}.{content_key}")


def _check_text(value: Any, path: str) -> str:
    if value is None:
        raise EpisodeError("missing_content", "message has no text", path, "give the message text, or drop the row")
    if not isinstance(value, str):
        raise _bad_type(path, "a string", value)
    return value


def _string(row: dict, key: str, required: bool) -> str | None:
    value = row.get(key)
    if value is None:
        if required:
            raise EpisodeError("missing_field", f"'{key}' is missing", key)
        return None
    if not isinstance(value, str):
        raise _bad_type(key, "a string", value)
    return value


def _drop_untrained_tail(messages: list[dict]) -> int:
    """Remove the messages after the last assistant one (nothing trains on them); return how many."""
    dropped = 0
    while messages and messages[-1]["role"] not in TRAINED_BY_DEFAULT:
        messages.pop()
        dropped += 1
    return dropped


def _misplaced_system(path: str) -> EpisodeError:
    return EpisodeError("misplaced_system", "a system message is allowed only as the first message", path)


def _bad_type(path: str, expected: str, value: Any) -> EpisodeError:
    return EpisodeError("bad_type", f"{path} must be {expected}, got {type(value).__name__}", path)


# ---- tool-xml --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Block:
    tag: str
    start: int  # of the opening tag
    end: int  # after the closing tag
    body: str


def _blocks(text: str, tags: tuple[str, ...], path: str) -> list[_Block]:
    """The ``<tag>...</tag>`` blocks in text, in order; unclosed, nested or stray tags are errors."""
    pattern = re.compile(r"<(/?)(" + "|".join(tags) + r")>")
    out: list[_Block] = []
    open_tag: re.Match | None = None
    for m in pattern.finditer(text):
        if not m.group(1):
            if open_tag is not None:
                raise _unclosed(open_tag.group(2), path)
            open_tag = m
        elif open_tag is None or open_tag.group(2) != m.group(2):
            raise EpisodeError(
                "stray_close_tag",
                f"</{m.group(2)}> at character {m.start()} closes no open <{m.group(2)}>",
                path,
                "remove it, or add the opening tag",
            )
        else:
            out.append(_Block(m.group(2), open_tag.start(), m.end(), text[open_tag.end() : m.start()]))
            open_tag = None
    if open_tag is not None:
        raise _unclosed(open_tag.group(2), path)
    return out


def _unclosed(tag: str, path: str) -> EpisodeError:
    return EpisodeError(
        "unclosed_tag", f"<{tag}> is not closed by </{tag}>", path, "the text may be truncated; fix or drop the row"
    )


def _assistant_calls(content: Any, function_calls: Any, path: str) -> list[dict]:
    """An assistant message with XML tool calls → [assistant text?] + assistant_toolcall messages."""
    if isinstance(function_calls, str) and not function_calls.strip():
        function_calls = None
    text = "" if content is None and function_calls is not None else _check_text(content, f"{path}.content")
    field = f"{path}.content"
    blocks = _blocks(text, _CALL_TAGS, field)
    calls: list[tuple[str, dict]] = []
    for i, block in enumerate(blocks):
        if i and text[blocks[i - 1].end : block.start].strip():
            raise _text_after_call(field)
        calls += _parse_calls(block.body, field)
    if blocks and text[blocks[-1].end :].strip():
        raise _text_after_call(field)
    if function_calls is not None:
        calls += _parse_calls(_check_text(function_calls, f"{path}.function_calls"), f"{path}.function_calls")
    if not calls:
        return [{"role": "assistant", "content": text}]
    before = (text[: blocks[0].start] if blocks else text).strip()
    out = [{"role": "assistant", "content": before}] if before else []
    return out + [{"role": "assistant_toolcall", "name": name, "arguments": args} for name, args in calls]


def _text_after_call(field: str) -> EpisodeError:
    return EpisodeError(
        "text_after_tool_call",
        "assistant text continues after a tool call",
        field,
        "a turn's text must come before its tool calls; split the turn or drop the row",
    )


_NOT_PARSED = object()


def _literal(text: str) -> Any:
    """A JSON document, else a Python literal (single-quoted dicts), else _NOT_PARSED."""
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        pass
    try:
        return ast.literal_eval(text.strip())
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        return _NOT_PARSED


def _parse_calls(body: str, field: str) -> list[tuple[str, dict]]:
    value = _literal(body)
    if value is _NOT_PARSED:
        calls = _python_calls(body, field)
        if calls is None:
            raise EpisodeError(
                "bad_tool_call_json",
                f"tool call is not valid JSON (nor a Python literal or call): {body.strip()[:60]!r}",
                field,
                _CALL_HINT,
            )
        return calls
    items = value if isinstance(value, list) else [value]
    if not items:
        raise EpisodeError("tool_call_not_object", "tool call block holds an empty list", field, _CALL_HINT)
    return [_call_object(item, field) for item in items]


def _call_object(obj: Any, field: str) -> tuple[str, dict]:
    if not isinstance(obj, dict):
        message = f"tool call is {type(obj).__name__}, not an object"
        raise EpisodeError("tool_call_not_object", message, field, _CALL_HINT)
    unknown = sorted(str(k) for k in obj if k not in ("name", "arguments"))
    if unknown:
        raise EpisodeError("bad_tool_call", f"tool call has unknown keys {', '.join(unknown)}", field, _CALL_HINT)
    name = obj.get("name")
    if not isinstance(name, str) or not name.strip():
        raise EpisodeError("missing_tool_name", f"tool call has no name (got {name!r})", field, _CALL_HINT)
    if obj.get("arguments") is None:
        hint = 'use "arguments": {} for a call without arguments'
        raise EpisodeError("missing_tool_arguments", f"call of {name} has no arguments", field, hint)
    return name, _arguments(obj["arguments"], name, field)


def _arguments(value: Any, name: str, field: str) -> dict:
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except (ValueError, RecursionError):
            pass
    if not isinstance(value, dict):
        raise EpisodeError(
            "bad_tool_arguments",
            f"arguments of {name} must be an object, got {type(value).__name__}",
            field,
            'write arguments as an object such as {"city": "Paris"}',
        )
    return value


def _python_calls(body: str, field: str) -> list[tuple[str, dict]] | None:
    """Calls written as Python (``f(a=1)`` per line, or ``[f(a=1), g()]``); None if the body is not that."""
    try:
        tree = ast.parse(body.strip(), mode="exec")
    except (SyntaxError, ValueError, MemoryError, RecursionError):
        return None
    nodes: list[ast.expr] = []
    for stmt in tree.body:
        if not isinstance(stmt, ast.Expr):
            return None
        value = stmt.value
        nodes.extend(value.elts if isinstance(value, (ast.List, ast.Tuple)) else [value])
    if not nodes or not all(isinstance(n, ast.Call) for n in nodes):
        return None
    return [_python_call(n, field) for n in nodes]


def _python_call(node: ast.Call, field: str) -> tuple[str, dict]:
    name = _dotted(node.func)
    if name is None:
        raise EpisodeError("missing_tool_name", "tool call does not call a plain name", field, _CALL_HINT)
    if node.args or any(k.arg is None for k in node.keywords):
        raise EpisodeError(
            "bad_tool_arguments",
            f"call of {name} has positional or ** arguments, which have no names",
            field,
            "write every argument as name=value",
        )
    arguments = {}
    for keyword in node.keywords:
        try:
            arguments[keyword.arg] = ast.literal_eval(keyword.value)
        except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
            raise EpisodeError(
                "bad_tool_arguments",
                f"argument {keyword.arg} of {name} is not a literal value",
                field,
                "arguments must be literals (strings, numbers, lists, dicts, True/False/None)",
            ) from None
    return name, arguments


def _dotted(node: ast.expr) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        base = _dotted(node.value)
        return None if base is None else f"{base}.{node.attr}"
    return None


def _tool_results(text: str, path: str, role: str) -> list[dict]:
    """A tool or user message → toolresult messages for its <tool_response> blocks (user text kept)."""
    field = f"{path}.content"
    blocks = _blocks(text, ("tool_response",), field)
    if not blocks:
        return [_tool_result(text)] if role == "tool" else [{"role": "user", "content": text}]
    out: list[dict] = []
    starts = [b.start for b in blocks] + [len(text)]
    pieces = [text[: blocks[0].start]] + [text[b.end : s] for b, s in zip(blocks, starts[1:])]
    for i, piece in enumerate(pieces):
        if piece.strip():
            if role == "tool":
                raise EpisodeError(
                    "bad_tool_response",
                    "tool message has text outside its <tool_response> blocks",
                    field,
                    "put all of the tool's output inside <tool_response></tool_response>",
                )
            out.append({"role": "user", "content": piece.strip()})
        if i < len(blocks):
            out.append(_tool_result(blocks[i].body))
    return out


def _tool_result(body: str) -> dict:
    content = body.strip()
    parsed = _literal(content) if content.startswith("{") else None
    name = parsed.get("name") if isinstance(parsed, dict) else None
    if isinstance(name, str) and name.strip():
        return {"role": "toolresult", "name": name, "content": content}
    return {"role": "toolresult", "content": content}


def _tools_value(value: Any, field: str) -> list[dict] | None:
    """Tool schemas given as a list or a JSON string (a ``tools`` column, a ``functions`` field).

    A list read from Arrow structs (parquet) carries every key of every row's schemas, the absent ones
    as null (a ``"city": null`` property in a tool that has none): null-valued keys are dropped.
    """
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if isinstance(value, str):
        return _tools_text(value, field)
    if not isinstance(value, list) or not all(isinstance(t, dict) for t in value):
        message = f"tools must be a list of schema objects, got {type(value).__name__}"
        raise EpisodeError("bad_tools", message, field, _TOOLS_HINT)
    return [_without_nulls(t) for t in value] or None


def _without_nulls(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _without_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_without_nulls(v) for v in value]
    return value


def _tools_text(text: str, field: str) -> list[dict]:
    value = _literal(text)
    if value is _NOT_PARSED:  # one schema per line, as Qwen's template writes them
        value = [_literal(line) for line in text.splitlines() if line.strip()]
        if any(v is _NOT_PARSED for v in value):
            message = "tool schemas are not valid JSON (nor Python literals)"
            raise EpisodeError("bad_tools", message, field, _TOOLS_HINT)
    items = value if isinstance(value, list) else [value]
    if not all(isinstance(t, dict) for t in items):
        raise EpisodeError("bad_tools", "every tool schema must be an object", field, _TOOLS_HINT)
    return items


def _system_tools(text: str, path: str, mode: str) -> tuple[str | None, list[dict] | None]:
    """(system text after ``mode``, schemas parsed from its non-blank <tools>/<functions> blocks)."""
    blocks = [b for b in _blocks(text, _TOOLS_TAGS, f"{path}.content") if b.body.strip()]
    if not blocks:
        return text, None
    tools = [t for b in blocks for t in _tools_text(b.body, f"{path}.content")]
    if mode == "drop":
        return None, tools or None
    if mode == "cut":
        ends = [0] + [b.end for b in blocks]
        starts = [b.start for b in blocks] + [len(text)]
        cut = "".join(text[e:s] for e, s in zip(ends, starts)).strip()
        return cut or None, tools or None
    return text, tools or None


# ---- oasst2 ----------------------------------------------------------------------------------------


@dataclass
class _Node:
    index: int  # row of the message (message rows) or of the tree (trees form)
    message_id: str
    parent_id: str | None
    text: Any
    role: Any
    lang: Any
    rank: Any
    removed: str | None  # "deleted" or "failed_review": the message and its replies are not used
    tree_id: str | None
    tree_state: Any


def _oasst2(rows: Iterable[dict], options: _Options, report: ConvertReport) -> Iterator[_Item]:
    nodes: list[_Node] = []
    for index, row in enumerate(rows):
        report.rows_read += 1
        if isinstance(row.get("prompt"), dict) and "message_id" not in row:
            nodes += _flatten_tree(row, index)
        else:
            nodes.append(_node(row, index, row.get("message_tree_id"), row.get("tree_state")))
    children: dict[str, list[_Node]] = defaultdict(list)
    roots: list[_Node] = []
    for node in nodes:
        if node.removed:
            report.skipped[f"{node.removed}_messages"] += 1
        if node.parent_id is None:
            roots.append(node)
        else:
            children[node.parent_id].append(node)
    for root in roots:
        source_id = str(root.tree_id or root.message_id)
        if root.tree_state is not None and root.tree_state != "ready_for_export":
            report.skipped["trees_not_ready"] += 1
        elif root.removed:
            report.skipped["trees_with_removed_prompt"] += 1
        else:
            try:
                path = _best_path(root, children)
            except EpisodeError as exc:
                yield root.index, source_id, exc
                continue
            if len(path) < options.min_depth:
                report.skipped["too_short"] += 1
                continue
            messages = [{"role": "user" if n.role == "prompter" else "assistant", "content": n.text} for n in path]
            language = root.lang if isinstance(root.lang, str) else None
            record = {"messages": messages, "language": language}
            yield root.index, source_id, record


def _best_path(root: _Node, children: dict[str, list[_Node]]) -> list[_Node]:
    """Root → best reply → best reply ..., roles checked; a final unanswered prompt left out."""
    path = [root]
    seen = {root.message_id}
    while True:
        replies = [c for c in children.get(path[-1].message_id, ()) if not c.removed]
        if not replies:
            break
        best = min(replies, key=lambda n: (n.rank is None, n.rank if n.rank is not None else 0, n.message_id))
        if best.message_id in seen:
            raise EpisodeError("bad_tree", f"message {best.message_id} is its own ancestor", "parent_id")
        seen.add(best.message_id)
        path.append(best)
    for depth, node in enumerate(path):
        expected = "prompter" if depth % 2 == 0 else "assistant"
        if node.role != expected:
            raise EpisodeError(
                "bad_tree",
                f"message {node.message_id} at depth {depth} has role {node.role!r}, expected {expected!r}",
                "role",
            )
    if path[-1].role == "prompter":
        path.pop()
    return path


def _node(m: dict, index: int, tree_id: Any, tree_state: Any) -> _Node:
    removed = "deleted" if m.get("deleted") is True else "failed_review" if m.get("review_result") is False else None
    parent = m.get("parent_id")
    return _Node(
        index,
        str(m.get("message_id")),
        None if parent is None else str(parent),
        m.get("text"),
        m.get("role"),
        m.get("lang"),
        m.get("rank"),
        removed,
        None if tree_id is None else str(tree_id),
        tree_state,
    )


def _flatten_tree(row: dict, index: int) -> list[_Node]:
    """The oasst2 trees form (a prompt with nested ``replies``) → message nodes with parent ids."""
    tree_id, state = row.get("message_tree_id"), row.get("tree_state")
    out: list[_Node] = []
    stack: list[tuple[dict, str | None]] = [(row["prompt"], None)]
    while stack:
        message, parent = stack.pop()
        node = _node({**message, "parent_id": parent}, index, tree_id or row["prompt"].get("message_id"), state)
        out.append(node)
        replies = message.get("replies") or []
        stack.extend((r, node.message_id) for r in reversed(replies) if isinstance(r, dict))
    return out


_CONVERTERS: dict[str, Callable[[Iterable[dict], _Options, ConvertReport], Iterator[_Item]]] = {
    "oasst2": _oasst2,
    "alpaca": _per_row(_alpaca),
    "sharegpt": _per_row(_chat),
    "ultrachat": _per_row(_chat),
    "tool-xml": _per_row(_tool_xml),
}
