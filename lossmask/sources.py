"""Input files → typed episodes (lossmask.episode), with errors that name file, line, field and a fix.

Files are read in binary one line at a time (``.gz`` transparently) and each line is decoded and parsed
on its own: memory does not grow with the file, and a bad line is reported by number without stopping
the others.

Formats (``input_format``). ``auto`` decides per line from the keys present, trying in this order:

1. ``_replay``                    → Replay: ``{"_replay": true, "text": ...}``, accepted in every format
2. ``messages``                   → ``openai`` if a message has role system/developer/tool or a field
                                     tool_calls/tool_call_id/reasoning_content, else ``native``
3. ``conversations``              → ``sharegpt`` (``from``/``value``)
4. ``prompt`` + ``completion``    → ``prompt_completion``: two strings → TextPair; two message lists
                                     (TRL's conversational form, read like openai) → Conversation
5. ``input_text`` + ``full_text`` → ``input_full``: TextPair(input_text, the rest of full_text)
6. ``instruction`` + ``output``   → ``alpaca``
7. ``text``                       → ``marked_text``: MarkedText (the renderer finds the marker)

A forced format only needs its own keys to be present. Policies:

- Top-level keys a format does not read are kept as they are in ``meta``: ``_meta`` lands in
  ``meta["_meta"]``, ``id`` in ``meta["id"]``. Every conversation format reads the optional top-level
  ``system``, ``language`` and ``tools`` (a list of tool schemas or a JSON string of one; [] = no tools).
- Unknown *message* fields are errors, so typos cannot vanish; a field whose value is null counts as absent.
- Content is a string or a list of ``{"type": "text", "text": ...}`` parts, joined with "".
- ``train``/``weight`` override only assistant and assistant_toolcall messages; other roles accept just the
  no-op ``false``/``0``. Both given must agree (``train: false`` with ``weight: 0.5`` is an error).
- An assistant message with blank content and no ``think`` is an error: it would train on nothing.
  An openai assistant message with ``tool_calls`` becomes an assistant message (only when it has content,
  reasoning, context or cite) followed by one assistant_toolcall message per call.
- Tool-call ``arguments`` must be a JSON object or a string holding one; missing arguments are an error.
- alpaca: the user message is ``instruction`` and ``input`` joined by a blank line ("\\n\\n"), a blank one
  left out; ``history`` ([[user, assistant], ...]) turns come first and are trained like the output.
- prompt_completion with message lists: only the completion is trained, unless a prompt message sets
  ``train``/``weight`` itself.
- ``.txt``/``.txt.gz`` files are plain text, read as marked_text: an episode ends at a line that is exactly
  ``episode_separator`` (default ``<|endofepisode|>``; whitespace around it ignored) or at the end of the
  file. Blank lines are not separators, because responses contain them. Blank lines at an episode's
  start and end are dropped; the rest is kept character for character; the episode's line is its first
  non-blank one; ``max_line_bytes`` caps whole episodes too.
- Blank lines are skipped; a UTF-8 byte-order mark at the start of a line is ignored. Problems carry a
  ``reason`` key such as bad_json, bad_utf8, line_too_long, not_object, unknown_format, format_mismatch,
  missing_field, bad_type, unknown_field, missing_role, unknown_role, missing_content, bad_content,
  empty_assistant, bad_weight, conflicting_weight, untrained_role, bad_arguments, missing_arguments,
  bad_toolcall, unknown_tool_call_id, misplaced_system, duplicate_system, bad_tools, no_assistant,
  nothing_to_train, not_a_prefix, empty_completion, empty_text, lone_surrogate.
"""
from __future__ import annotations

import gzip
import json
import math
import zlib
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import IO, Any, Callable, Iterator, Mapping

from lossmask.episode import (
    TRAINED_BY_DEFAULT,
    Conversation,
    Episode,
    MarkedText,
    Message,
    Replay,
    Source,
    TextPair,
)
from lossmask.errors import EpisodeError, InputError, InputProblem, LossmaskError, json_kind

INPUT_FORMATS: tuple[str, ...] = (
    "auto",
    "native",
    "openai",
    "sharegpt",
    "alpaca",
    "prompt_completion",
    "input_full",
    "marked_text",
)
DEFAULT_MAX_LINE_BYTES = 64 << 20
EPISODE_SEPARATOR = "<|endofepisode|>"

# Keys that make a line one format; auto-detection tries them in this order after "messages".
_FORMAT_KEYS: dict[str, tuple[str, ...]] = {
    "native": ("messages",),
    "openai": ("messages",),
    "sharegpt": ("conversations",),
    "prompt_completion": ("prompt", "completion"),
    "input_full": ("input_text", "full_text"),
    "alpaca": ("instruction", "output"),
    "marked_text": ("text",),
}
_DETECT_ORDER = ("sharegpt", "prompt_completion", "input_full", "alpaca", "marked_text")
_FORMATS_HELP = (
    "native/openai (messages), sharegpt (conversations), prompt_completion (prompt, completion), "
    "input_full (input_text, full_text), alpaca (instruction, output), marked_text (text), "
    "replay (_replay, text)"
)

_CONVERSATION_KEYS = frozenset({"system", "language", "tools"})
_CONSUMED: dict[str, frozenset[str]] = {
    "messages": _CONVERSATION_KEYS | {"messages"},
    "sharegpt": _CONVERSATION_KEYS | {"conversations"},
    "alpaca": _CONVERSATION_KEYS | {"instruction", "input", "output", "history"},
    "prompt_completion": _CONVERSATION_KEYS | {"prompt", "completion"},
    "text_pair": frozenset({"prompt", "completion"}),
    "input_full": frozenset({"input_text", "full_text"}),
    "marked_text": frozenset({"text"}),
    "replay": frozenset({"_replay", "text"}),
}

_NATIVE_ROLES = {r: r for r in ("user", "assistant", "assistant_toolcall", "toolresult")}
_OPENAI_ROLES = {
    "system": "system",
    "developer": "system",
    "user": "user",
    "assistant": "assistant",
    "tool": "toolresult",
}
_SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "model": "assistant",
    "system": "system",
    "tool": "toolresult",
    "function_response": "toolresult",
    "observation": "toolresult",
    "function_call": "assistant_toolcall",
}
_ROLE_SETS = {"native": _NATIVE_ROLES, "openai": _OPENAI_ROLES, "sharegpt": _SHAREGPT_ROLES}
_OPENAI_ONLY_ROLES = frozenset({"system", "developer", "tool"})
_OPENAI_ONLY_FIELDS = ("tool_calls", "tool_call_id", "reasoning_content")

_WEIGHTS = frozenset({"train", "weight"})
_NATIVE_FIELDS = {
    "user": frozenset({"role", "content", "context"}) | _WEIGHTS,
    "assistant": frozenset({"role", "content", "context", "think", "cite"}) | _WEIGHTS,
    "assistant_toolcall": frozenset({"role", "name", "arguments"}) | _WEIGHTS,
    "toolresult": frozenset({"role", "name", "content"}) | _WEIGHTS,
}
_OPENAI_FIELDS = {
    "system": frozenset({"role", "content"}),
    "user": _NATIVE_FIELDS["user"],
    "assistant": _NATIVE_FIELDS["assistant"] | {"reasoning_content", "tool_calls"},
    "toolresult": frozenset({"role", "name", "content", "tool_call_id"}) | _WEIGHTS,
}
_OPENAI_CALL_FIELDS = frozenset({"id", "type", "function", "index"})
_CALL_FIELDS = frozenset({"name", "arguments"})
_SHAREGPT_FIELDS = frozenset({"from", "value"}) | _WEIGHTS


def read_episodes(
    path: str | Path,
    input_format: str = "auto",
    max_line_bytes: int = DEFAULT_MAX_LINE_BYTES,
    episode_separator: str = EPISODE_SEPARATOR,
) -> Iterator[Episode | InputProblem]:
    """Yield, in file order, an Episode or an InputProblem per non-blank line (per episode for .txt).

    Unreadable files (missing, corrupt gzip) raise LossmaskError; everything wrong inside a line is
    yielded as an InputProblem so the caller can reject that line and go on.
    """
    _check_format_name(input_format)
    name = str(path)
    plain = name.endswith((".txt", ".txt.gz"))
    if plain and input_format not in ("auto", "marked_text"):
        yield InputProblem(
            name,
            1,
            "format_mismatch",
            f"a .txt file is plain text and is read as marked_text, not {input_format}",
            hint="use --input-format auto or marked_text, or convert the file to JSONL",
        )
        return
    with open_input(name) as f:
        if plain:
            yield from _read_txt(name, f, max_line_bytes, episode_separator)
            return
        for lineno, raw, size in read_lines(f, max_line_bytes):
            if raw is None:
                yield too_long(name, lineno, size, max_line_bytes, "line")
            elif not raw.isspace():
                try:
                    yield parse_line(raw, Source(name, lineno), input_format, max_line_bytes)
                except InputError as exc:
                    yield exc.problem


def parse_line(
    raw: bytes,
    source: Source,
    input_format: str = "auto",
    max_line_bytes: int = DEFAULT_MAX_LINE_BYTES,
) -> Episode:
    """Parse one JSONL line (bytes, with or without its newline); raise InputError if it is bad."""
    size = len(raw) - raw.endswith(b"\n")
    if size > max_line_bytes:
        raise InputError(too_long(source.file, source.line, size, max_line_bytes, "line"))
    try:
        return _record(load_line(raw), source, input_format)
    except EpisodeError as exc:
        raise InputError(exc.at(source.file, source.line)) from None


def parse_record(obj: Any, source: Source, input_format: str = "auto") -> Episode:
    """Turn one decoded JSON record into an Episode; raise InputError naming the field at fault."""
    try:
        return _record(obj, source, input_format)
    except EpisodeError as exc:
        raise InputError(exc.at(source.file, source.line)) from None


def detect_format(obj: Mapping[str, Any]) -> str | None:
    """The format ``auto`` reads a record as (by its keys, see the module docstring), or None."""
    if "messages" in obj:
        return "openai" if _looks_openai(obj["messages"]) else "native"
    for fmt in _DETECT_ORDER:
        if all(k in obj for k in _FORMAT_KEYS[fmt]):
            return fmt
    return None


# ---- reading lines ---------------------------------------------------------------------------------


@contextmanager
def open_input(name: str) -> Iterator[IO[bytes]]:
    """``name`` opened for reading bytes (``.gz`` transparently), for the readers of episodes and of pairs.

    One place for what every reader says: a file that cannot be opened, or that fails while it is read
    (I/O error, truncated or corrupt gzip), raises LossmaskError naming it.
    """
    try:
        f = gzip.open(name, "rb") if name.endswith(".gz") else open(name, "rb")
    except OSError as exc:
        raise LossmaskError(f"cannot open {name}: {exc.strerror or exc}") from exc
    with f:
        try:
            yield f
        except (OSError, EOFError, zlib.error) as exc:
            raise LossmaskError(f"cannot read {name}: {exc}") from exc


def read_lines(f: IO[bytes], limit: int) -> Iterator[tuple[int, bytes | None, int]]:
    """(line number, raw bytes or None when over ``limit``, size without the final newline).

    A line over the limit is skipped in chunks, never held whole, so a huge line cannot exhaust memory.
    """
    lineno = 0
    while True:
        raw = f.readline(limit + 1)
        if not raw:
            return
        lineno += 1
        if len(raw) <= limit or raw.endswith(b"\n"):
            yield lineno, raw, len(raw) - raw.endswith(b"\n")
            continue
        size = len(raw)
        while not raw.endswith(b"\n"):
            raw = f.readline(1 << 20)
            if not raw:
                break
            size += len(raw)
        yield lineno, None, size - raw.endswith(b"\n")


def too_long(file: str, line: int, size: int, limit: int, what: str) -> InputProblem:
    """The problem of a line (or .txt episode, ``what``) of ``size`` bytes over the ``limit``."""
    return InputProblem(
        file,
        line,
        "line_too_long",
        f"{what} is {size} bytes, over the limit of {limit} bytes",
        hint="split the episode, or raise the limit with --max-line-bytes",
    )


def _decode(raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        bad = raw[exc.start : exc.start + 4]
        raise EpisodeError(
            "bad_utf8",
            f"invalid UTF-8 at byte offset {exc.start} of the line (bytes {bad!r}: {exc.reason})",
            hint="save the file as UTF-8, e.g. iconv -f latin1 -t utf-8 in.jsonl > out.jsonl",
        ) from None


def load_line(raw: bytes) -> Any:
    """One raw JSONL line decoded (UTF-8, a leading BOM ignored) and parsed; EpisodeError saying what is wrong."""
    text = _decode(raw).removeprefix("\ufeff")
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        at = min(exc.pos, len(text.rstrip("\r\n")))  # an error at the newline is at the end of the line
        near = text[max(0, at - 20) : at + 20].strip()
        raise EpisodeError(
            "bad_json",
            f"not valid JSON: {exc.msg} at column {at + 1} (near {near!r})",
            hint="each line must be one complete JSON object: check quotes, commas and that newlines "
            "inside strings are escaped as \\n (pretty-printed JSON: rewrite with jq -c)",
        ) from None
    except (ValueError, RecursionError) as exc:
        hint = "write each line as one JSON object, nested less deeply, with numbers under 4300 digits"
        raise EpisodeError("bad_json", f"not valid JSON: {exc}", hint=hint) from None
    if b"\\ud" in raw or b"\\uD" in raw:
        _check_surrogates(obj, "")
    return obj


def _check_surrogates(obj: Any, path: str) -> None:
    """Reject lone UTF-16 surrogates (``"\\ud800"``): text holding one cannot be encoded or tokenized."""
    stack = [(obj, path)]
    while stack:
        value, where = stack.pop()
        if isinstance(value, str):
            if not _encodable(value):
                raise EpisodeError(
                    "lone_surrogate",
                    "string holds a lone UTF-16 surrogate escape (\\ud800-\\udfff), which is not text",
                    where or None,
                    "write the character itself or its complete surrogate pair; the data may be truncated",
                )
        elif isinstance(value, dict):
            for key, item in value.items():
                stack.append((key, where))
                stack.append((item, f"{where}.{key}" if where else key))
        elif isinstance(value, list):
            stack.extend((item, f"{where}[{i}]") for i, item in enumerate(value))


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _read_txt(name: str, f: IO[bytes], limit: int, separator: str) -> Iterator[Episode | InputProblem]:
    sep = separator.strip().encode("utf-8")
    if not sep:
        raise ValueError("the episode separator must not be blank: responses contain blank lines")
    lines: list[str] = []
    first = size = 0  # first: line number where the current episode starts (0 = not started)
    problem: InputProblem | None = None
    for lineno, raw, n in read_lines(f, limit):
        if raw is not None and raw.strip() == sep:
            item = _txt_episode(name, first, lines, problem)
            if item is not None:
                yield item
            lines, first, size, problem = [], 0, 0, None
            continue
        if problem is not None or (not first and raw is not None and raw.isspace()):
            continue
        first = first or lineno
        size += n
        if raw is None or size > limit:
            problem, lines = too_long(name, first, size, limit, "episode"), []
            continue
        try:
            text = _decode(raw)
            lines.append(text.removeprefix("\ufeff") if lineno == 1 else text)
        except EpisodeError as exc:
            problem, lines = exc.at(name, lineno), []
    item = _txt_episode(name, first, lines, problem)
    if item is not None:
        yield item


def _txt_episode(
    name: str, first: int, lines: list[str], problem: InputProblem | None
) -> Episode | InputProblem | None:
    if problem is not None:
        return problem
    while lines and lines[-1].isspace():
        lines.pop()
    if not lines:
        return None
    text = "".join(lines)
    text = text[:-2] if text.endswith("\r\n") else text.removesuffix("\n")
    return MarkedText(text, Source(name, first))


# ---- records ---------------------------------------------------------------------------------------


def _check_format_name(input_format: str) -> None:
    if input_format not in INPUT_FORMATS:
        raise ValueError(f"unknown input format {input_format!r}; choose one of {', '.join(INPUT_FORMATS)}")


def _record(obj: Any, source: Source, input_format: str) -> Episode:
    _check_format_name(input_format)
    if not isinstance(obj, dict):
        hint = "each line must be one JSON object {...}"
        if isinstance(obj, list):
            hint += "; for a JSON array of records write one record per line (jq -c '.[]' file.json)"
        raise EpisodeError("not_object", f"line is {json_kind(obj)}, not a JSON object", hint=hint)
    if "_replay" in obj:
        return _replay(obj, source)
    fmt = input_format
    if fmt == "auto":
        fmt = detect_format(obj)
        if fmt is None:
            raise EpisodeError(
                "unknown_format",
                f"no input format matches the keys {_keys(obj)}",
                hint=f"formats and the keys that mark them: {_FORMATS_HELP}",
            )
    elif not all(k in obj for k in _FORMAT_KEYS[fmt]):
        raise EpisodeError(
            "format_mismatch",
            f"line is not {fmt}: it needs the keys {', '.join(_FORMAT_KEYS[fmt])} and has {_keys(obj)}",
            hint="fix the line, or use --input-format auto to detect the format line by line",
        )
    return _PARSERS[fmt](obj, source)


def _replay(obj: dict, source: Source) -> Replay:
    if obj["_replay"] is not True:
        raise EpisodeError(
            "bad_type",
            f"'_replay' must be true, got {_short(obj['_replay'])}",
            "_replay",
            'use "_replay": true for replay text, or remove the key',
        )
    return Replay(_text(obj), source, _meta(obj, "replay"))


def _native(obj: dict, source: Source) -> Conversation:
    messages = [_native_message(m, f"messages[{i}]") for i, m in enumerate(_list(obj, "messages"))]
    return _conversation(obj, messages, None, "messages", source, "messages")


def _native_message(m: Any, path: str) -> Message:
    role = _role(_object(m, path), "role", path, "native")
    m = _fields(m, _NATIVE_FIELDS[role], path, f"a {role} message")
    train, weight = _train_weight(m, path, role)
    if role == "user":
        return Message("user", _content(m, "content", path), context=_str(m, "context", path))
    if role == "toolresult":
        return Message("toolresult", _content(m, "content", path), name=_str(m, "name", path))
    if role == "assistant_toolcall":
        return _toolcall(m, path, train, weight)
    return _assistant(m, path, "think", train, weight)


def _openai(obj: dict, source: Source) -> Conversation:
    system, messages = _openai_messages(_list(obj, "messages"), "messages", {}, allow_system=True)
    return _conversation(obj, messages, system, "messages", source, "messages")


def _openai_messages(
    items: list, key: str, calls: dict[str, str], allow_system: bool
) -> tuple[str | None, list[Message]]:
    """Openai messages → native ones; ``calls`` maps tool_call ids to names across lists."""
    system = None
    out: list[Message] = []
    for i, m in enumerate(items):
        path = f"{key}[{i}]"
        role = _role(_object(m, path), "role", path, "openai")
        m = _fields(m, _OPENAI_FIELDS[role], path, f"a {m['role']} message")
        if role == "system":
            if i or not allow_system:
                raise _misplaced_system(path)
            system = _content(m, "content", path)
            continue
        train, weight = _train_weight(m, path, role)
        if role == "user":
            out.append(Message("user", _content(m, "content", path), context=_str(m, "context", path)))
        elif role == "toolresult":
            name = _tool_result_name(m, path, calls)
            out.append(Message("toolresult", _content(m, "content", path), name=name))
        else:
            out.extend(_openai_assistant(m, path, calls, train, weight))
    return system, out


def _openai_assistant(
    m: dict, path: str, calls: dict[str, str], train: bool | None, weight: float | None
) -> list[Message]:
    think_key = "reasoning_content" if m.get("reasoning_content") is not None else "think"
    if think_key == "reasoning_content" and m.get("think") is not None:
        raise EpisodeError(
            "unknown_field",
            "both 'reasoning_content' and 'think' are given",
            f"{path}.think",
            "keep one of them: they are the same thing",
        )
    tool_calls = m.get("tool_calls")
    if tool_calls is not None and not isinstance(tool_calls, list):
        raise _bad_type(f"{path}.tool_calls", "a list of tool calls", tool_calls)
    out = []
    if not tool_calls or _says_something(m, think_key):
        out.append(_assistant(m, path, think_key, train, weight))
    for j, call in enumerate(tool_calls or ()):
        cpath = f"{path}.tool_calls[{j}]"
        call = _fields(call, _OPENAI_CALL_FIELDS, cpath, "a tool call")
        if call.get("type", "function") != "function":
            raise EpisodeError(
                "bad_toolcall",
                f"tool call type {_short(call['type'])} is not supported",
                f"{cpath}.type",
                'only function calls are supported: "type": "function"',
            )
        fpath = f"{cpath}.function"
        function = _fields(call.get("function"), _CALL_FIELDS, fpath, "a function")
        message = _toolcall(function, fpath, train, weight)
        call_id = call.get("id")
        if isinstance(call_id, str):
            calls[call_id] = message.name
        out.append(message)
    return out


def _says_something(m: dict, think_key: str) -> bool:
    """Whether an assistant message that makes tool calls has text of its own (else only calls are kept)."""
    for key in ("content", think_key, "context", "cite"):
        value = m.get(key)
        if value and not (isinstance(value, str) and value.isspace()):
            return True
    return False


def _tool_result_name(m: dict, path: str, calls: dict[str, str]) -> str | None:
    name = _str(m, "name", path)
    call_id = m.get("tool_call_id")
    if name is not None or call_id is None:
        return name
    if not isinstance(call_id, str) or call_id not in calls:
        raise EpisodeError(
            "unknown_tool_call_id",
            f"tool_call_id {_short(call_id)} matches no earlier assistant tool call",
            f"{path}.tool_call_id",
            'use the id of a tool call made before this message, or give the tool\'s "name"',
        )
    return calls[call_id]


def _sharegpt(obj: dict, source: Source) -> Conversation:
    system = None
    messages: list[Message] = []
    for i, m in enumerate(_list(obj, "conversations")):
        path = f"conversations[{i}]"
        role = _role(_object(m, path), "from", path, "sharegpt")
        m = _fields(m, _SHAREGPT_FIELDS, path, f"a sharegpt {m['from']} message")
        if role == "system":
            if i:
                raise _misplaced_system(path)
            system = _content(m, "value", path)
            continue
        train, weight = _train_weight(m, path, role)
        if role == "assistant_toolcall":
            messages.extend(_sharegpt_calls(m.get("value"), f"{path}.value", train, weight))
        elif role == "assistant":
            content = _content(m, "value", path)
            _check_trains_something(content, None, f"{path}.value")
            messages.append(Message("assistant", content, train=train, weight=weight))
        else:
            messages.append(Message(role, _content(m, "value", path)))
    return _conversation(obj, messages, system, "conversations", source, "sharegpt")


def _sharegpt_calls(value: Any, field: str, train: bool | None, weight: float | None) -> list[Message]:
    """A function_call value: one call {"name", "arguments"} or a list of them, as JSON text or not."""
    hint = 'write the call as a JSON string {"name": ..., "arguments": {...}}'
    if value is None:
        raise EpisodeError("missing_content", "function_call has no value", field, hint)
    if isinstance(value, str):
        value = _nested_json(value, field, "bad_toolcall", hint)
    if value == []:
        raise EpisodeError("bad_toolcall", "function_call holds no calls", field, "give at least one call")
    calls = value if isinstance(value, list) else [value]
    paths = [f"{field}[{j}]" for j in range(len(calls))] if isinstance(value, list) else [field]
    return [
        _toolcall(_fields(call, _CALL_FIELDS, path, "a function call"), path, train, weight)
        for call, path in zip(calls, paths)
    ]


def _alpaca(obj: dict, source: Source) -> Conversation:
    history = obj.get("history")
    if history is not None and not isinstance(history, list):
        raise _bad_type("history", "a list of [user, assistant] pairs", history)
    messages: list[Message] = []
    for i, pair in enumerate(history or ()):
        if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(s, str) for s in pair)):
            raise _bad_type(f"history[{i}]", "a pair of strings [user, assistant]", pair)
        _check_trains_something(pair[1], None, f"history[{i}][1]")
        messages += [Message("user", pair[0]), Message("assistant", pair[1])]
    instruction = _required_str(obj, "instruction")
    extra = _str(obj, "input", "") or ""
    output = _required_str(obj, "output")
    _check_trains_something(output, None, "output")
    user = "\n\n".join(s for s in (instruction, extra) if s.strip())
    messages += [Message("user", user), Message("assistant", output)]
    return _conversation(obj, messages, None, "output", source, "alpaca")


def _prompt_completion(obj: dict, source: Source) -> Episode:
    prompt, completion = obj["prompt"], obj["completion"]
    if isinstance(prompt, str) and isinstance(completion, str):
        _check_completion(completion, "completion")
        return TextPair(prompt, completion, source, _meta(obj, "text_pair"))
    if isinstance(prompt, list) and isinstance(completion, list):
        calls: dict[str, str] = {}
        system, asked = _openai_messages(prompt, "prompt", calls, allow_system=True)
        _, answered = _openai_messages(completion, "completion", calls, allow_system=False)
        untrained = [
            replace(m, train=False) if m.loss_weight and m.train is None and m.weight is None else m
            for m in asked
        ]
        return _conversation(obj, untrained + answered, system, "completion", source, "prompt_completion")
    field = "prompt" if not isinstance(prompt, (str, list)) else "completion"
    raise EpisodeError(
        "bad_type",
        "prompt and completion must both be strings or both be message lists, "
        f"got {json_kind(prompt)} and {json_kind(completion)}",
        field,
        'write "prompt": "...", "completion": "..." or TRL\'s conversational form with two lists of messages',
    )


def _input_full(obj: dict, source: Source) -> TextPair:
    prompt = _required_str(obj, "input_text")
    full = _required_str(obj, "full_text")
    if not full.startswith(prompt):
        at = next((i for i, (a, b) in enumerate(zip(prompt, full)) if a != b), min(len(prompt), len(full)))
        line = prompt.count("\n", 0, at) + 1
        raise EpisodeError(
            "not_a_prefix",
            f"input_text is not a prefix of full_text: they first differ at character {at} "
            f"(text line {line}): input_text has {_short(prompt[at:at + 20])}, "
            f"full_text has {_short(full[at:at + 20])}",
            "full_text",
            "full_text must start with input_text exactly (same whitespace and line endings)",
        )
    completion = full[len(prompt) :]
    _check_completion(completion, "full_text")
    return TextPair(prompt, completion, source, _meta(obj, "input_full"))


def _marked_text(obj: dict, source: Source) -> MarkedText:
    return MarkedText(_text(obj), source, _meta(obj, "marked_text"))


def _text(obj: dict) -> str:
    text = _required_str(obj, "text")
    if not text.strip():
        hint = "give the text to train on, or drop the line"
        raise EpisodeError("empty_text", "text is empty", "text", hint)
    return text


_PARSERS: dict[str, Callable[[dict, Source], Episode]] = {
    "native": _native,
    "openai": _openai,
    "sharegpt": _sharegpt,
    "alpaca": _alpaca,
    "prompt_completion": _prompt_completion,
    "input_full": _input_full,
    "marked_text": _marked_text,
}


# ---- shared pieces ---------------------------------------------------------------------------------


def _conversation(
    obj: dict, messages: list[Message], system: str | None, container: str, source: Source, fmt: str
) -> Conversation:
    top = _str(obj, "system", "")
    if top is not None:
        if system is not None:
            raise EpisodeError(
                "duplicate_system",
                "the system prompt is given twice: in the top-level 'system' field and as a system message",
                "system",
                "keep only one of them",
            )
        system = top
    if not any(m.role in TRAINED_BY_DEFAULT for m in messages):
        raise EpisodeError(
            "no_assistant",
            "conversation has no assistant message: nothing to train",
            container,
            "add the assistant's reply, or drop the line",
        )
    if not any(m.loss_weight > 0 for m in messages):
        raise EpisodeError(
            "nothing_to_train",
            "every assistant message has train: false or weight 0: nothing to train",
            container,
            "train at least one assistant message, or drop the line",
        )
    language = _str(obj, "language", "")
    return Conversation(tuple(messages), source, system, language, _tools(obj), _meta(obj, fmt))


def _assistant(m: dict, path: str, think_key: str, train: bool | None, weight: float | None) -> Message:
    content = _content(m, "content", path, required=False)
    think = _str(m, think_key, path)
    if content is None and think is None:
        raise EpisodeError(
            "missing_content",
            "assistant message has no 'content'",
            f"{path}.content",
            'add "content": "..." with the reply',
        )
    _check_trains_something(content, think, f"{path}.content")
    return Message(
        "assistant",
        content or "",
        context=_str(m, "context", path),
        think=think,
        cite=_str(m, "cite", path),
        train=train,
        weight=weight,
    )


def _check_trains_something(content: str | None, think: str | None, field: str) -> None:
    if (content or "").strip() or (think or "").strip():
        return
    raise EpisodeError(
        "empty_assistant",
        "assistant message is empty (no content, no think): it would train on nothing",
        field,
        "fill in the reply, or drop the message",
    )


def _check_completion(completion: str, field: str) -> None:
    if not completion.strip():
        raise EpisodeError(
            "empty_completion",
            "the completion is empty: it would train on nothing",
            field,
            "give the text the model should produce, or drop the line",
        )


def _toolcall(m: dict, path: str, train: bool | None, weight: float | None) -> Message:
    name = m.get("name")
    if not isinstance(name, str) or not name.strip():
        raise EpisodeError(
            "missing_field" if name is None else "bad_type",
            f"tool call needs a non-empty string 'name', got {_short(name)}",
            f"{path}.name",
            'give the called tool\'s name: "name": "get_weather"',
        )
    arguments = _arguments(m.get("arguments"), f"{path}.arguments")
    return Message("assistant_toolcall", name=name, arguments=arguments, train=train, weight=weight)


def _arguments(value: Any, field: str) -> dict[str, Any]:
    hint = 'write arguments as a JSON object such as {"city": "Paris"}, or {} for none'
    if value is None:
        raise EpisodeError("missing_arguments", "tool call has no 'arguments'", field, hint)
    if isinstance(value, str):
        value = _nested_json(value, field, "bad_arguments", hint)
    if not isinstance(value, dict):
        raise EpisodeError("bad_arguments", f"arguments must be an object, got {json_kind(value)}", field, hint)
    return value


def _nested_json(text: str, field: str, reason: str, hint: str) -> Any:
    """A JSON document stored inside a string field (tool arguments, sharegpt calls, tools)."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        message = f"string is not valid JSON: {exc.msg} at character {exc.pos}"
        raise EpisodeError(reason, message, field, hint) from None
    except (ValueError, RecursionError) as exc:
        raise EpisodeError(reason, f"string is not valid JSON: {exc}", field, hint) from None
    if "\\ud" in text or "\\uD" in text:
        _check_surrogates(value, field)
    return value


def _tools(obj: dict) -> tuple[dict[str, Any], ...] | None:
    tools = obj.get("tools")
    hint = 'give a list of schemas: [{"type": "function", "function": {"name": ..., "parameters": {...}}}]'
    if isinstance(tools, str):
        tools = _nested_json(tools, "tools", "bad_tools", hint)
    if tools is None or tools == []:
        return None
    if not isinstance(tools, list):
        raise EpisodeError("bad_tools", f"tools must be a list of schemas, got {json_kind(tools)}", "tools", hint)
    for i, tool in enumerate(tools):
        if not isinstance(tool, dict):
            raise EpisodeError("bad_tools", f"tool {i} is {json_kind(tool)}, not an object", f"tools[{i}]", hint)
    return tuple(tools)


def _train_weight(m: dict, path: str, role: str) -> tuple[bool | None, float | None]:
    """Validate ``train``/``weight``; only trained roles keep them (on others they can only be no-ops)."""
    train = m.get("train")
    raw = m.get("weight")
    if train is not None and not isinstance(train, bool):
        raise _bad_type(f"{path}.train", "true or false", train)
    weight = None
    if raw is not None:
        if isinstance(raw, (int, float)) and not isinstance(raw, bool):
            try:
                weight = float(raw)
            except OverflowError:
                weight = math.inf
        if weight is None or not math.isfinite(weight) or weight < 0:
            raise EpisodeError(
                "bad_weight",
                f"weight must be a finite number >= 0, got {_short(raw)}",
                f"{path}.weight",
                "use a number such as 0.5 (0 = not trained, 1 = the default)",
            )
    if role not in TRAINED_BY_DEFAULT:
        if train or (weight or 0.0) > 0:
            field = f"{path}.train" if train else f"{path}.weight"
            raise EpisodeError(
                "untrained_role",
                f"a {role} message is never trained; train/weight apply to assistant messages only",
                field,
                "remove train/weight from this message (system, user and tool text never carry loss)",
            )
        return None, None
    if train is not None and weight is not None and train != (weight > 0):
        raise EpisodeError(
            "conflicting_weight",
            f"train: {str(train).lower()} contradicts weight: {raw}",
            f"{path}.weight",
            "give only one of train and weight, or make them agree",
        )
    return train, weight


def _role(m: dict, key: str, path: str, fmt: str) -> str:
    roles = _ROLE_SETS[fmt]
    value = m.get(key)
    if value is None:
        hint = f'add "{key}": one of {", ".join(roles)}'
        if key == "from" and "role" in m:
            hint = 'these messages use role/content: put them under "messages" instead of "conversations"'
        raise EpisodeError("missing_role", f"message has no '{key}'", f"{path}.{key}", hint)
    role = roles.get(value) if isinstance(value, str) else None
    if role is None:
        hint = f"{fmt} {key} values are: {', '.join(roles)}"
        others = [f for f, rs in _ROLE_SETS.items() if f != fmt and isinstance(value, str) and value in rs]
        if others:
            hint += f"; {value!r} is {' or '.join(others)}: use --input-format auto or {others[0]}"
        message = f"unknown {key} {_short(value)} in a {fmt} message"
        raise EpisodeError("unknown_role", message, f"{path}.{key}", hint)
    return role


def _fields(value: Any, allowed: frozenset[str], path: str, what: str) -> dict:
    """``value`` as an object whose keys are all allowed (a null-valued key counts as absent)."""
    m = _object(value, path)
    for key, item in m.items():
        if key not in allowed and item is not None:
            raise EpisodeError(
                "unknown_field",
                f"unknown field {_short(key)} in {what}",
                f"{path}.{key}",
                f"fields allowed here: {', '.join(sorted(allowed))}; rename or remove {_short(key)}",
            )
    return m


def _content(m: dict, key: str, path: str, required: bool = True) -> str | None:
    value = m.get(key)
    field = f"{path}.{key}"
    if value is None:
        if not required:
            return None
        hint = f'add "{key}": "..." with the message text'
        raise EpisodeError("missing_content", f"message has no '{key}'", field, hint)
    if isinstance(value, str):
        return value
    if not isinstance(value, list):
        raise EpisodeError(
            "bad_content",
            f"content must be a string or a list of text parts, got {json_kind(value)}",
            field,
            f'write the text as a JSON string: "{key}": "..."',
        )
    parts = []
    for j, part in enumerate(value):
        if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
            raise EpisodeError(
                "bad_content",
                f"content part {j} is not a text part: {_short(part)}",
                f"{field}[{j}]",
                'only text is supported: {"type": "text", "text": "..."} parts, or a plain string',
            )
        parts.append(part["text"])
    return "".join(parts)


def _str(obj: dict, key: str, path: str) -> str | None:
    value = obj.get(key)
    if value is None or isinstance(value, str):
        return value
    raise _bad_type(f"{path}.{key}" if path else key, "a string", value)


def _required_str(obj: dict, key: str) -> str:
    value = _str(obj, key, "")
    if value is None:
        raise EpisodeError("missing_field", f"'{key}' is missing", key, f'add "{key}": "..."')
    return value


def _list(obj: dict, key: str) -> list:
    value = obj[key]
    if not isinstance(value, list):
        raise _bad_type(key, "a list of messages", value)
    return value


def _object(value: Any, path: str) -> dict:
    if isinstance(value, dict):
        return value
    if value is None:
        raise EpisodeError("missing_field", f"{path} is missing", path, "give it as a JSON object {...}")
    raise _bad_type(path, "a JSON object", value)


def _bad_type(field: str, expected: str, value: Any) -> EpisodeError:
    message = f"{field} must be {expected}, got {json_kind(value)}"
    return EpisodeError("bad_type", message, field, f"write {field} as {expected}")


def _misplaced_system(path: str) -> EpisodeError:
    return EpisodeError(
        "misplaced_system",
        "a system message is allowed only as the first message",
        path,
        "move the system prompt to the first message (or the top-level 'system' field) and keep only one",
    )


def _looks_openai(messages: Any) -> bool:
    if not isinstance(messages, list):
        return False
    for m in messages:
        if isinstance(m, dict):
            role = m.get("role")
            if isinstance(role, str) and role in _OPENAI_ONLY_ROLES:
                return True
            if any(k in m for k in _OPENAI_ONLY_FIELDS):
                return True
    return False


def _meta(obj: dict, fmt: str) -> dict[str, Any]:
    consumed = _CONSUMED[fmt]
    return {k: v for k, v in obj.items() if k not in consumed}


def _keys(obj: dict) -> str:
    keys = list(obj)
    shown = ", ".join(_short(k) for k in keys[:10])
    return f"[{shown}{', ...' if len(keys) > 10 else ''}]"


def _short(value: Any) -> str:
    """A short printable form of a user value for messages (never the whole of a large value)."""
    if isinstance(value, str):
        return repr(value[:60]) + ("..." if len(value) > 60 else "")
    if isinstance(value, (list, dict)):
        return json_kind(value)
    return repr(value)
