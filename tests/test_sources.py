"""sources: every input format read from real files into exact episodes, and every bad line reported."""
from __future__ import annotations

import gzip
import json
import tracemalloc
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lossmask.episode import Conversation, MarkedText, Message, Replay, Source, TextPair
from lossmask.errors import InputError, InputProblem, LossmaskError
from lossmask.sources import INPUT_FORMATS, parse_line, parse_record, read_episodes


def write_jsonl(path: Path, *records) -> Path:
    """One line per record: dicts are dumped as JSON, str/bytes written as they are (blank lines too)."""
    with open(path, "wb") as f:
        for record in records:
            if isinstance(record, bytes):
                f.write(record + b"\n")
            elif isinstance(record, str):
                f.write(record.encode("utf-8") + b"\n")
            else:
                f.write(json.dumps(record).encode("utf-8") + b"\n")
    return path


def read(path: Path, **kwargs) -> list:
    return list(read_episodes(path, **kwargs))


def one(path: Path, **kwargs):
    items = read(path, **kwargs)
    assert len(items) == 1, items
    return items[0]


GOOD = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}


# ---- native ----------------------------------------------------------------------------------------


def test_native_every_field(tmp_path):
    tools = [{"type": "function", "function": {"name": "weather", "parameters": {"type": "object"}}}]
    record = {
        "system": "Be brief.",
        "language": "en",
        "tools": tools,
        "messages": [
            {"role": "user", "content": "Weather in Paris?", "context": "Paris is in France."},
            {"role": "assistant", "content": "Checking.", "think": "Use the tool.", "context": "[injected]"},
            {"role": "assistant_toolcall", "name": "weather", "arguments": {"city": "Paris"}},
            {"role": "toolresult", "name": "weather", "content": "18C"},
            {"role": "assistant", "content": "18C [1]", "cite": "[1] weather", "weight": 0.5},
            {"role": "user", "content": "Thanks", "train": False, "weight": 0},
            {"role": "assistant", "content": "Bye", "train": False},
            {"role": "assistant_toolcall", "name": "log", "arguments": '{"n": 1}', "weight": 2},
        ],
        "id": "row-7",
        "_meta": {"origin": "unit"},
    }
    path = write_jsonl(tmp_path / "native.jsonl", record)
    episode = one(path)
    assert episode == Conversation(
        messages=(
            Message("user", "Weather in Paris?", context="Paris is in France."),
            Message("assistant", "Checking.", think="Use the tool.", context="[injected]"),
            Message("assistant_toolcall", name="weather", arguments={"city": "Paris"}),
            Message("toolresult", "18C", name="weather"),
            Message("assistant", "18C [1]", cite="[1] weather", weight=0.5),
            Message("user", "Thanks"),
            Message("assistant", "Bye", train=False),
            Message("assistant_toolcall", name="log", arguments={"n": 1}, weight=2.0),
        ),
        source=Source(str(path), 1),
        system="Be brief.",
        language="en",
        tools=tuple(tools),
    )
    assert episode.meta == {"id": "row-7", "_meta": {"origin": "unit"}}
    assert [m.loss_weight for m in episode.messages] == [0.0, 1.0, 1.0, 0.0, 0.5, 0.0, 0.0, 2.0]


def test_native_think_only_assistant_and_null_fields(tmp_path):
    record = {
        "messages": [
            {"role": "user", "content": "2+2?", "context": None},
            {"role": "assistant", "think": "4", "cite": None},
        ]
    }
    episode = one(write_jsonl(tmp_path / "t.jsonl", record))
    assert episode.messages == (Message("user", "2+2?"), Message("assistant", "", think="4"))


def test_replay_line_and_tools_as_json_string(tmp_path):
    path = write_jsonl(
        tmp_path / "r.jsonl",
        {"_replay": True, "text": "Some pretraining text.", "id": 3},
        {**GOOD, "tools": '[{"a": 1}]'},
    )
    replay, conv = read(path)
    assert replay == Replay("Some pretraining text.", Source(str(path), 1))
    assert replay.meta == {"id": 3}
    assert conv.tools == ({"a": 1},)


def test_replay_accepted_whatever_the_forced_format(tmp_path):
    path = write_jsonl(tmp_path / "r.jsonl", {"_replay": True, "text": "abc"})
    assert one(path, input_format="sharegpt") == Replay("abc", Source(str(path), 1))


# ---- openai ----------------------------------------------------------------------------------------


def test_openai_system_tool_calls_reasoning_and_tool_names(tmp_path):
    record = {
        "messages": [
            {"role": "system", "content": "You call tools."},
            {
                "role": "user",
                "content": [{"type": "text", "text": "Paris "}, {"type": "text", "text": "and Rome?"}],
            },
            {
                "role": "assistant",
                "content": "Let me look.",
                "reasoning_content": "Two calls.",
                "tool_calls": [
                    {
                        "id": "c1",
                        "type": "function",
                        "function": {"name": "weather", "arguments": '{"city": "Paris"}'},
                    },
                    {
                        "id": "c2",
                        "type": "function",
                        "function": {"name": "time", "arguments": {"city": "Rome"}},
                    },
                ],
                "refusal": None,
            },
            {"role": "tool", "tool_call_id": "c2", "content": "noon"},
            {"role": "tool", "name": "weather_v2", "tool_call_id": "c1", "content": "sunny"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [{"function": {"name": "end", "arguments": "{}"}}],
            },
            {"role": "tool", "content": "ok"},
            {"role": "assistant", "content": "Sunny, noon.", "weight": 0},
            {"role": "assistant", "content": "Done.", "tool_calls": []},
        ]
    }
    path = write_jsonl(tmp_path / "openai.jsonl", record)
    assert one(path) == Conversation(
        messages=(
            Message("user", "Paris and Rome?"),
            Message("assistant", "Let me look.", think="Two calls."),
            Message("assistant_toolcall", name="weather", arguments={"city": "Paris"}),
            Message("assistant_toolcall", name="time", arguments={"city": "Rome"}),
            Message("toolresult", "noon", name="time"),
            Message("toolresult", "sunny", name="weather_v2"),
            Message("assistant_toolcall", name="end", arguments={}),
            Message("toolresult", "ok"),
            Message("assistant", "Sunny, noon.", weight=0.0),
            Message("assistant", "Done."),
        ),
        source=Source(str(path), 1),
        system="You call tools.",
    )


def test_openai_weight_applies_to_text_and_calls(tmp_path):
    record = {
        "messages": [
            {"role": "user", "content": "q"},
            {
                "role": "assistant",
                "content": "",
                "reasoning_content": "why",
                "weight": 0.25,
                "tool_calls": [{"type": "function", "function": {"name": "f", "arguments": "{}"}}],
            },
        ]
    }
    episode = one(write_jsonl(tmp_path / "o.jsonl", record))
    assert episode.messages[1:] == (
        Message("assistant", "", think="why", weight=0.25),
        Message("assistant_toolcall", name="f", arguments={}, weight=0.25),
    )


def test_openai_developer_role_is_the_system_prompt(tmp_path):
    record = {
        "messages": [
            {"role": "developer", "content": "D"},
            {"role": "user", "content": "u"},
            {"role": "assistant", "content": "a"},
        ]
    }
    episode = one(write_jsonl(tmp_path / "o.jsonl", record))
    assert episode.system == "D"
    assert episode.messages == (Message("user", "u"), Message("assistant", "a"))


# ---- sharegpt ----------------------------------------------------------------------------------------


def test_sharegpt_roles_and_function_calls(tmp_path):
    record = {
        "conversations": [
            {"from": "system", "value": "Sys"},
            {"from": "human", "value": "Weather?"},
            {"from": "function_call", "value": '{"name": "weather", "arguments": {"city": "Oslo"}}'},
            {"from": "observation", "value": "cold"},
            {"from": "gpt", "value": "It is cold."},
            {"from": "user", "value": "Both?"},
            {
                "from": "function_call",
                "value": [{"name": "a", "arguments": "{}"}, {"name": "b", "arguments": {}}],
            },
            {"from": "function_response", "value": "1"},
            {"from": "tool", "value": "2"},
            {"from": "model", "value": "Done.", "weight": 0.5},
            {"from": "assistant", "value": "Extra.", "train": False},
        ],
        "tools": '[{"name": "weather"}]',
        "source": "sg",
    }
    path = write_jsonl(tmp_path / "sharegpt.jsonl", record)
    episode = one(path)
    assert episode == Conversation(
        messages=(
            Message("user", "Weather?"),
            Message("assistant_toolcall", name="weather", arguments={"city": "Oslo"}),
            Message("toolresult", "cold"),
            Message("assistant", "It is cold."),
            Message("user", "Both?"),
            Message("assistant_toolcall", name="a", arguments={}),
            Message("assistant_toolcall", name="b", arguments={}),
            Message("toolresult", "1"),
            Message("toolresult", "2"),
            Message("assistant", "Done.", weight=0.5),
            Message("assistant", "Extra.", train=False),
        ),
        source=Source(str(path), 1),
        system="Sys",
        tools=({"name": "weather"},),
    )
    assert episode.meta == {"source": "sg"}


# ---- alpaca ----------------------------------------------------------------------------------------


def test_alpaca_input_joined_with_blank_line_and_history(tmp_path):
    path = write_jsonl(
        tmp_path / "alpaca.jsonl",
        {"instruction": "Translate.", "input": "chat", "output": "cat"},
        {"instruction": "Say hi.", "input": "", "output": "hi"},
        {"instruction": "Say hi.", "output": "hi", "input": "  \n"},
        {"instruction": "Next?", "output": "3", "history": [["1?", "1"], ["2?", "2"]], "system": "S", "k": 1},
    )
    items = read(path)
    assert [e.messages for e in items] == [
        (Message("user", "Translate.\n\nchat"), Message("assistant", "cat")),
        (Message("user", "Say hi."), Message("assistant", "hi")),
        (Message("user", "Say hi."), Message("assistant", "hi")),
        (
            Message("user", "1?"),
            Message("assistant", "1"),
            Message("user", "2?"),
            Message("assistant", "2"),
            Message("user", "Next?"),
            Message("assistant", "3"),
        ),
    ]
    assert [e.source.line for e in items] == [1, 2, 3, 4]
    assert items[3].system == "S" and items[3].meta == {"k": 1}


# ---- prompt/completion, input/full, marked text -------------------------------------------------------


def test_prompt_completion_strings_and_trl_conversational(tmp_path):
    path = write_jsonl(
        tmp_path / "pc.jsonl",
        {"prompt": "Q: 2+2\nA:", "completion": " 4", "id": 1},
        {
            "prompt": [
                {"role": "system", "content": "S"},
                {"role": "user", "content": "a"},
                {"role": "assistant", "content": "b"},
                {"role": "user", "content": "c"},
            ],
            "completion": [{"role": "assistant", "content": "d"}],
        },
    )
    pair, conv = read(path)
    assert pair == TextPair("Q: 2+2\nA:", " 4", Source(str(path), 1))
    assert pair.meta == {"id": 1}
    assert conv == Conversation(
        messages=(
            Message("user", "a"),
            Message("assistant", "b", train=False),
            Message("user", "c"),
            Message("assistant", "d"),
        ),
        source=Source(str(path), 2),
        system="S",
    )


def test_input_full_splits_at_the_prefix(tmp_path):
    path = write_jsonl(tmp_path / "if.jsonl", {"input_text": "Q: hi\nA:", "full_text": "Q: hi\nA: hello"})
    assert one(path) == TextPair("Q: hi\nA:", " hello", Source(str(path), 1))


def test_marked_text_jsonl(tmp_path):
    path = write_jsonl(tmp_path / "m.jsonl", {"text": "### Q\nhi\n### A\nhello", "x": 1})
    episode = one(path)
    assert episode == MarkedText("### Q\nhi\n### A\nhello", Source(str(path), 1))
    assert episode.meta == {"x": 1}


def test_txt_file_episodes_end_at_separator_lines(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_bytes(
        b"\xef\xbb\xbf### Q\nfirst\n\n### A\npara 1\n\npara 2\n<|endofepisode|>\n"
        b"\n\n### Q\nsecond\n### A\nx  \n\n  <|endofepisode|>  \n<|endofepisode|>\n"
        b"### Q\nthird\n### A\nlast"
    )
    assert read(path) == [
        MarkedText("### Q\nfirst\n\n### A\npara 1\n\npara 2", Source(str(path), 1)),
        MarkedText("### Q\nsecond\n### A\nx  ", Source(str(path), 11)),
        MarkedText("### Q\nthird\n### A\nlast", Source(str(path), 18)),
    ]


def test_txt_custom_separator_bad_utf8_and_forced_format(tmp_path):
    path = tmp_path / "c.txt"
    path.write_bytes(b"one\nEND\ntw\xc3o\nstill two\nEND\nthree\n")
    first, bad, third = read(path, episode_separator="END")
    assert first == MarkedText("one", Source(str(path), 1))
    assert (bad.line, bad.reason) == (3, "bad_utf8")
    assert "byte offset 2" in bad.message and "UTF-8" in bad.hint
    assert third == MarkedText("three", Source(str(path), 6))
    (problem,) = read(path, input_format="openai")
    assert (problem.line, problem.reason) == (1, "format_mismatch")
    assert "marked_text" in problem.hint


def test_txt_episode_over_the_limit(tmp_path):
    path = tmp_path / "c.txt"
    path.write_bytes(b"short\n<|endofepisode|>\n" + b"0123456789\n" * 5 + b"<|endofepisode|>\nok\n")
    items = read(path, max_line_bytes=30)
    assert items[0] == MarkedText("short", Source(str(path), 1))
    assert (items[1].line, items[1].reason) == (3, "line_too_long")
    assert "over the limit of 30 bytes" in items[1].message
    assert items[2] == MarkedText("ok", Source(str(path), 9))


def test_gzip_jsonl(tmp_path):
    path = tmp_path / "d.jsonl.gz"
    with gzip.open(path, "wb") as f:
        f.write(b'{"prompt": "p", "completion": "c"}\n\n{"text": "t"}\n')
    assert read(path) == [TextPair("p", "c", Source(str(path), 1)), MarkedText("t", Source(str(path), 3))]


# ---- detection and forced formats -------------------------------------------------------------------


def test_detection_order_and_forced_format(tmp_path):
    record = {"prompt": "p", "completion": "c", "text": "t", "instruction": "i", "output": "o"}
    path = write_jsonl(tmp_path / "d.jsonl", record)
    assert isinstance(one(path), TextPair)
    assert isinstance(one(path, input_format="marked_text"), MarkedText)
    assert isinstance(one(path, input_format="alpaca"), Conversation)
    problem = one(path, input_format="sharegpt")
    assert (problem.line, problem.reason, problem.field) == (1, "format_mismatch", None)
    assert "conversations" in problem.message and "--input-format auto" in problem.hint


def test_input_formats_choices():
    assert INPUT_FORMATS[0] == "auto"
    assert set(INPUT_FORMATS) == {
        "auto",
        "native",
        "openai",
        "sharegpt",
        "alpaca",
        "prompt_completion",
        "input_full",
        "marked_text",
    }
    with pytest.raises(ValueError, match="unknown input format"):
        parse_record({"text": "t"}, Source("x", 1), "jsonl")


def test_parse_record_and_parse_line_api():
    source = Source("mem", 9)
    record = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    assert parse_record(record, source) == Conversation(
        (Message("user", "q"), Message("assistant", "a")), source
    )
    assert parse_line(json.dumps(record).encode() + b"\r\n", source) == parse_record(record, source)
    with pytest.raises(InputError) as info:
        parse_record({"messages": [{"role": "user", "content": "q"}]}, source)
    assert info.value.problem == InputProblem(
        "mem", 9, "no_assistant", info.value.problem.message, "messages", info.value.problem.hint
    )
    with pytest.raises(InputError) as info:
        parse_line(b'{"text": "' + b"x" * 50 + b'"}', source, max_line_bytes=20)
    assert info.value.problem.reason == "line_too_long" and "62 bytes" in info.value.problem.message


# ---- bad input ---------------------------------------------------------------------------------------


def conv(*messages, **top) -> dict:
    return {"messages": list(messages), **top}


def ua(**assistant) -> dict:
    return conv({"role": "user", "content": "q"}, {"role": "assistant", **assistant})


BAD = [
    # (line, reason, field, text in message, text in hint)
    ('{"messages": [', "bad_json", None, "column 15", "one complete JSON object"),
    ('[{"text": "a"}]', "not_object", None, "an array", "jq -c"),
    ("42", "not_object", None, "a number", "JSON object"),
    ({"foo": 1, "bar": 2}, "unknown_format", None, "'foo', 'bar'", "sharegpt (conversations)"),
    (conv({"content": "q"}), "missing_role", "messages[0].role", "no 'role'", "assistant_toolcall"),
    (conv({"role": "bot", "content": "q"}), "unknown_role", "messages[0].role", "'bot'", "user, assistant"),
    (
        conv({"role": ["user"], "content": "q"}),
        "unknown_role",
        "messages[0].role",
        "an array",
        "user, assistant",
    ),
    (
        conv({"role": "user"}, {"role": "assistant", "content": "a"}),
        "missing_content",
        "messages[0].content",
        "no 'content'",
        '"content": "..."',
    ),
    (ua(), "missing_content", "messages[1].content", "no 'content'", '"content"'),
    (
        ua(content=" \n"),
        "empty_assistant",
        "messages[1].content",
        "would train on nothing",
        "fill in the reply",
    ),
    (
        ua(content="", think="  "),
        "empty_assistant",
        "messages[1].content",
        "train on nothing",
        "drop the message",
    ),
    (ua(content=5), "bad_content", "messages[1].content", "a number", "JSON string"),
    (
        ua(content=[{"type": "text", "text": "a"}, {"type": "image_url", "image_url": "u"}]),
        "bad_content",
        "messages[1].content[1]",
        "not a text part",
        '"type": "text"',
    ),
    (ua(content="a", thinking="x"), "unknown_field", "messages[1].thinking", "'thinking'", "think"),
    (ua(content="a", think=3), "bad_type", "messages[1].think", "a number", "a string"),
    (
        conv({"role": "user", "content": "q", "train": True}, {"role": "assistant", "content": "a"}),
        "untrained_role",
        "messages[0].train",
        "never trained",
        "remove train/weight",
    ),
    (
        conv(
            {"role": "user", "content": "q"},
            {"role": "toolresult", "content": "r", "weight": 0.5},
            {"role": "assistant", "content": "a"},
        ),
        "untrained_role",
        "messages[1].weight",
        "never trained",
        "remove",
    ),
    (
        ua(content="a", weight=float("nan")),  # written as JSON's non-standard NaN
        "bad_weight",
        "messages[1].weight",
        "nan",
        "0.5",
    ),
    (
        ua(content="a", weight=float("inf")),  # written as JSON's non-standard Infinity
        "bad_weight",
        "messages[1].weight",
        "inf",
        "0.5",
    ),
    (ua(content="a", weight=-1), "bad_weight", "messages[1].weight", "-1", "0 = not trained"),
    (ua(content="a", weight="0.5"), "bad_weight", "messages[1].weight", "'0.5'", "a number"),
    (ua(content="a", weight=True), "bad_weight", "messages[1].weight", "True", "a number"),
    (ua(content="a", train="no"), "bad_type", "messages[1].train", "a string", "true or false"),
    (
        ua(content="a", train=False, weight=0.5),
        "conflicting_weight",
        "messages[1].weight",
        "contradicts",
        "make them agree",
    ),
    (
        conv({"role": "user", "content": "q"}, {"role": "assistant_toolcall", "name": "f", "arguments": [1]}),
        "bad_arguments",
        "messages[1].arguments",
        "an array",
        "JSON object",
    ),
    (
        conv(
            {"role": "user", "content": "q"}, {"role": "assistant_toolcall", "name": "f", "arguments": "{x"}
        ),
        "bad_arguments",
        "messages[1].arguments",
        "not valid JSON",
        "JSON object",
    ),
    (
        conv({"role": "user", "content": "q"}, {"role": "assistant_toolcall", "name": "f"}),
        "missing_arguments",
        "messages[1].arguments",
        "no 'arguments'",
        "{} for none",
    ),
    (
        conv({"role": "user", "content": "q"}, {"role": "assistant_toolcall", "arguments": {}}),
        "missing_field",
        "messages[1].name",
        "'name'",
        "get_weather",
    ),
    (
        conv(
            {"role": "user", "content": "q"},
            {"role": "assistant_toolcall", "name": "f", "arguments": {}, "content": "x"},
        ),
        "unknown_field",
        "messages[1].content",
        "'content'",
        "arguments, name",
    ),
    (
        conv({"role": "user", "content": "q"}),
        "no_assistant",
        "messages",
        "nothing to train",
        "add the assistant",
    ),
    (ua(content="a", train=False), "nothing_to_train", "messages", "nothing to train", "train at least one"),
    (conv(), "no_assistant", "messages", "no assistant", "add the assistant"),
    ({"messages": "hi"}, "bad_type", "messages", "a string", "a list of messages"),
    (
        conv("hello", {"role": "assistant", "content": "a"}),
        "bad_type",
        "messages[0]",
        "a string",
        "JSON object",
    ),
    (
        conv(
            {"role": "user", "content": "q"},
            {"role": "system", "content": "s"},
            {"role": "assistant", "content": "a"},
        ),
        "misplaced_system",
        "messages[1]",
        "only as the first message",
        "move the system prompt",
    ),
    (
        {
            **conv(
                {"role": "system", "content": "s"},
                {"role": "user", "content": "q"},
                {"role": "assistant", "content": "a"},
            ),
            "system": "t",
        },
        "duplicate_system",
        "system",
        "given twice",
        "keep only one",
    ),
    (
        conv(
            {"role": "user", "content": "q"},
            {"role": "tool", "tool_call_id": "zz", "content": "r"},
            {"role": "assistant", "content": "a"},
        ),
        "unknown_tool_call_id",
        "messages[1].tool_call_id",
        "'zz'",
        "id of a tool call",
    ),
    (
        conv({"role": "user", "content": "q"}, {"role": "assistant", "tool_calls": [{"type": "retrieval"}]}),
        "bad_toolcall",
        "messages[1].tool_calls[0].type",
        "'retrieval'",
        '"type": "function"',
    ),
    (
        conv(
            {"role": "user", "content": "q"},
            {"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": {}, "args": 1}}]},
        ),
        "unknown_field",
        "messages[1].tool_calls[0].function.args",
        "'args'",
        "arguments, name",
    ),
    (
        conv(
            {"role": "user", "content": "q"},
            {"role": "assistant", "content": "a", "reasoning_content": "r", "think": "t"},
        ),
        "unknown_field",
        "messages[1].think",
        "both",
        "keep one",
    ),
    ({**GOOD, "tools": {"name": "f"}}, "bad_tools", "tools", "an object", "list of schemas"),
    ({**GOOD, "tools": [1]}, "bad_tools", "tools[0]", "a number", "list of schemas"),
    ({**GOOD, "system": ["s"]}, "bad_type", "system", "an array", "a string"),
    (
        {"conversations": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},
        "missing_role",
        "conversations[0].from",
        "no 'from'",
        'under "messages"',
    ),
    (
        {"conversations": [{"from": "human", "value": "q"}, {"from": "bot", "value": "a"}]},
        "unknown_role",
        "conversations[1].from",
        "'bot'",
        "gpt",
    ),
    (
        {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a", "markdown": "a"}]},
        "unknown_field",
        "conversations[1].markdown",
        "'markdown'",
        "from, train, value",
    ),
    (
        {"conversations": [{"from": "human", "value": "q"}, {"from": "function_call", "value": "get(1)"}]},
        "bad_toolcall",
        "conversations[1].value",
        "not valid JSON",
        '{"name": ..., "arguments": {...}}',
    ),
    (
        {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": ""}]},
        "empty_assistant",
        "conversations[1].value",
        "train on nothing",
        "fill in",
    ),
    (
        {"conversations": [{"from": "human", "value": "q"}, {"from": "system", "value": "s"}]},
        "misplaced_system",
        "conversations[1]",
        "first message",
        "move",
    ),
    ({"instruction": "i", "output": "  "}, "empty_assistant", "output", "train on nothing", "fill in"),
    ({"instruction": 3, "output": "o"}, "bad_type", "instruction", "a number", "a string"),
    (
        {"instruction": "i", "output": "o", "history": [["q"]]},
        "bad_type",
        "history[0]",
        "an array",
        "[user, assistant]",
    ),
    (
        {"prompt": "p", "completion": ""},
        "empty_completion",
        "completion",
        "train on nothing",
        "give the text",
    ),
    (
        {"prompt": "p", "completion": [{"role": "assistant", "content": "a"}]},
        "bad_type",
        "completion",
        "a string and an array",
        "TRL's conversational form",
    ),
    (
        {"prompt": [{"role": "user", "content": "q"}], "completion": [{"role": "system", "content": "s"}]},
        "misplaced_system",
        "completion[0]",
        "first message",
        "move",
    ),
    (
        {"input_text": "Q: a\nQ: b", "full_text": "Q: a\nQ: c!"},
        "not_a_prefix",
        "full_text",
        "character 8 (text line 2): input_text has 'b', full_text has 'c!'",
        "start with input_text exactly",
    ),
    (
        {"input_text": "abc", "full_text": "abc"},
        "empty_completion",
        "full_text",
        "train on nothing",
        "give the text",
    ),
    ({"text": ""}, "empty_text", "text", "empty", "give the text"),
    ({"text": 1}, "bad_type", "text", "a number", "a string"),
    ({"_replay": 1, "text": "t"}, "bad_type", "_replay", "must be true", '"_replay": true'),
    ({"_replay": True}, "missing_field", "text", "'text' is missing", '"text"'),
    ('{"text": "a\\udc00b"}', "lone_surrogate", "text", "surrogate", "surrogate pair"),
    (
        '{"messages": [{"role": "user", "content": "q"}, {"role": "assistant_toolcall", "name": "f", '
        '"arguments": "{\\"a\\": \\"\\\\ud800\\"}"}]}',
        "lone_surrogate",
        "messages[1].arguments.a",
        "surrogate",
        "surrogate pair",
    ),
]


@pytest.mark.parametrize(
    "line, reason, field, in_message, in_hint", BAD, ids=[f"{b[1]}-{i}" for i, b in enumerate(BAD)]
)
def test_bad_line_reported_with_line_field_and_fix(tmp_path, line, reason, field, in_message, in_hint):
    path = write_jsonl(tmp_path / "in.jsonl", GOOD, "", line, GOOD)
    first, problem, last = read(path)
    assert first.source == Source(str(path), 1) and last.source == Source(str(path), 4)
    assert isinstance(problem, InputProblem)
    assert (problem.file, problem.line, problem.reason, problem.field) == (str(path), 3, reason, field)
    assert in_message in problem.message
    assert problem.hint and in_hint in problem.hint


def test_forced_native_rejects_openai_roles_with_a_hint(tmp_path):
    record = conv(
        {"role": "system", "content": "s"},
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": "a"},
    )
    path = write_jsonl(tmp_path / "n.jsonl", record)
    problem = one(path, input_format="native")
    assert (problem.reason, problem.field) == ("unknown_role", "messages[0].role")
    assert "--input-format auto or openai" in problem.hint
    assert one(path).system == "s"


def test_invalid_utf8_names_line_and_byte(tmp_path):
    path = write_jsonl(tmp_path / "u.jsonl", GOOD, b'{"text": "caf\xe9 au lait"}')
    good, problem = read(path)
    assert good.source.line == 1
    assert (problem.line, problem.reason, problem.field) == (2, "bad_utf8", None)
    assert "byte offset 13" in problem.message and "\\xe9" in problem.message
    assert "iconv" in problem.hint


def test_broken_second_line_still_yields_the_first(tmp_path):
    path = tmp_path / "two.jsonl"
    path.write_bytes(json.dumps(GOOD).encode() + b'\n{"messages": [{"role": "user", "con')
    first, problem = read(path)
    assert first == Conversation((Message("user", "q"), Message("assistant", "a")), Source(str(path), 1))
    assert (problem.line, problem.reason) == (2, "bad_json")


def test_huge_line_is_skipped_with_its_size(tmp_path):
    big = {"text": "x" * 5000}
    path = write_jsonl(tmp_path / "big.jsonl", GOOD, big, GOOD)
    first, problem, last = read(path, max_line_bytes=1000)
    assert (problem.line, problem.reason) == (2, "line_too_long")
    assert "is 5012 bytes, over the limit of 1000 bytes" in problem.message
    assert "--max-line-bytes" in problem.hint
    assert (first.source.line, last.source.line) == (1, 3)
    at_limit = write_jsonl(tmp_path / "edge.jsonl", '{"text": "' + "y" * 988 + '"}')
    assert one(at_limit, max_line_bytes=1000) == MarkedText("y" * 988, Source(str(at_limit), 1))


def test_empty_and_blank_files_give_nothing(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_bytes(b"")
    blank = tmp_path / "blank.jsonl"
    blank.write_bytes(b"\n  \n\r\n\t\n")
    assert read(empty) == [] and read(blank) == []


def test_byte_order_mark_and_crlf(tmp_path):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"text": "a"}\r\n{"text": "b"}\r\n')
    assert read(path) == [MarkedText("a", Source(str(path), 1)), MarkedText("b", Source(str(path), 2))]


def test_unreadable_files_raise_lossmask_error(tmp_path):
    with pytest.raises(LossmaskError, match="cannot open"):
        read(tmp_path / "missing.jsonl")
    corrupt = tmp_path / "bad.jsonl.gz"
    corrupt.write_bytes(b"not gzip at all")
    with pytest.raises(LossmaskError, match="cannot read"):
        read(corrupt)


def test_memory_does_not_grow_with_the_file(tmp_path):
    line = json.dumps({"prompt": "p" * 400, "completion": "c" * 400}).encode() + b"\n"
    path = tmp_path / "many.jsonl"
    path.write_bytes(line * 6000)  # ~5 MB
    tracemalloc.start()
    try:
        count = sum(1 for _ in read_episodes(path))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert count == 6000
    assert peak < 1_000_000


# ---- robustness ----------------------------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)
roles = st.sampled_from(
    ["user", "assistant", "assistant_toolcall", "toolresult", "system", "tool", "developer", "x"]
)
message_keys = st.sampled_from(
    [
        "role",
        "content",
        "think",
        "context",
        "cite",
        "train",
        "weight",
        "name",
        "arguments",
        "tool_calls",
        "tool_call_id",
        "reasoning_content",
        "from",
        "value",
    ]
)
messages = st.lists(
    st.dictionaries(
        message_keys, st.one_of(roles, json_values, st.just([{"type": "text", "text": "t"}])), max_size=5
    ),
    max_size=4,
)
top_keys = st.sampled_from(
    [
        "messages",
        "conversations",
        "prompt",
        "completion",
        "input_text",
        "full_text",
        "instruction",
        "input",
        "output",
        "history",
        "text",
        "_replay",
        "system",
        "tools",
        "language",
    ]
)
records = st.dictionaries(top_keys, st.one_of(messages, json_values, st.text(max_size=5)), max_size=5)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    raw=st.binary(max_size=64) | records.map(lambda r: json.dumps(r).encode()),
    fmt=st.sampled_from(INPUT_FORMATS),
)
def test_any_line_gives_an_episode_or_an_input_error(raw, fmt):
    try:
        episode = parse_line(raw, Source("h", 1), fmt)
    except InputError as exc:
        assert exc.problem.reason and exc.problem.message and exc.problem.hint
    else:
        assert episode.source == Source("h", 1)


@settings(max_examples=200, deadline=None)
@given(obj=records | json_values, fmt=st.sampled_from(INPUT_FORMATS))
def test_any_record_gives_an_episode_or_an_input_error(obj, fmt):
    try:
        parse_record(obj, Source("h", 2), fmt)
    except InputError as exc:
        assert exc.problem.line == 2 and exc.problem.hint


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(max_size=300))
def test_any_file_reads_to_episodes_and_problems(tmp_path, data):
    for name in ("any.jsonl", "any.txt"):
        path = tmp_path / name
        path.write_bytes(data)
        for item in read_episodes(path):
            assert isinstance(item, (Conversation, TextPair, MarkedText, Replay, InputProblem))
