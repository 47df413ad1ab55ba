"""convert: real dataset shapes (parquet, JSONL, JSON arrays, save_to_disk) → exact native episode lines."""
from __future__ import annotations

import json
from collections import Counter
from io import StringIO
from pathlib import Path

import pytest

datasets = pytest.importorskip("datasets")

from rich.console import Console  # noqa: E402

import lossmask.convert as convert_module  # noqa: E402
from lossmask.convert import convert, print_convert_report  # noqa: E402
from lossmask.episode import Conversation  # noqa: E402
from lossmask.errors import LossmaskError  # noqa: E402
from lossmask.sources import read_episodes  # noqa: E402


@pytest.fixture(autouse=True)
def _private_hf_cache(tmp_path, monkeypatch):
    """Keep the Arrow cache that ``datasets`` writes for local files out of the user's home."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))


def to_parquet(path: Path, rows: list[dict]) -> Path:
    datasets.Dataset.from_list(rows).to_parquet(str(path))
    return path


def to_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def output(path: Path) -> list[dict]:
    """The written records; every line must read back through sources as a Conversation."""
    episodes = list(read_episodes(path))
    assert all(isinstance(e, Conversation) for e in episodes), episodes
    records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    assert len(records) == len(episodes)
    return records


def user(text: str) -> dict:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict:
    return {"role": "assistant", "content": text}


def meta(kind: str, source_id: str) -> dict:
    return {"converter": kind, "source_id": source_id}


# ---- oasst2 ----------------------------------------------------------------------------------------


def msg(mid, parent, role, text, rank=None, lang="en", deleted=False, review=True, tree=None, state="ready_for_export"):
    """One oasst2 message row with the dataset's columns (detoxify/emojis/labels left out)."""
    return {
        "message_id": mid,
        "parent_id": parent,
        "user_id": "u-" + mid,
        "created_date": "2023-02-05T00:00:00+00:00",
        "text": text,
        "role": role,
        "lang": lang,
        "review_count": 3,
        "review_result": review,
        "deleted": deleted,
        "rank": rank,
        "synthetic": False,
        "model_name": None,
        "message_tree_id": tree or mid.split("-")[0],
        "tree_state": state,
    }


OASST_ROWS = [
    # t1: ranks, a failed-review and a deleted reply, an unranked tie, an unanswered final prompt.
    msg("t1-b-x-2", "t1-b-x", "assistant", "6.", rank=1),  # a reply listed before its tree's root
    msg("t1", None, "prompter", "What is 2+2?"),
    msg("t1-a", "t1", "assistant", "4.", rank=1),
    msg("t1-b", "t1", "assistant", "2+2 is 4.", rank=0),
    msg("t1-c", "t1", "assistant", "spam", review=False),
    msg("t1-b-y", "t1-b", "prompter", "Why?"),
    msg("t1-b-x", "t1-b", "prompter", "And 3+3?"),
    msg("t1-b-x-1", "t1-b-x", "assistant", "6!!!", rank=0, deleted=True),
    msg("t1-b-x-1-q", "t1-b-x-1", "prompter", "reply to a deleted message"),
    msg("t1-b-x-2-q", "t1-b-x-2", "prompter", "Thanks"),
    # t2: German, single turn.
    msg("t2", None, "prompter", "Wie spät ist es?", lang="de"),
    msg("t2-a", "t2", "assistant", "Zeit für Tests.", rank=0, lang="de"),
    # t3: a prompt nobody answered.
    msg("t3", None, "prompter", "Anyone?"),
    # t4: a tree that was not finished.
    msg("t4", None, "prompter", "Low grade", state="aborted_low_grade"),
    msg("t4-a", "t4", "assistant", "Answer", rank=0, state="aborted_low_grade"),
    # t5: the prompt itself was deleted.
    msg("t5", None, "prompter", "Deleted prompt", deleted=True),
    msg("t5-a", "t5", "assistant", "Orphaned answer", rank=0),
    # t6: Brazilian Portuguese.
    msg("t6", None, "prompter", "Olá?", lang="pt-BR"),
    msg("t6-a", "t6", "assistant", "Olá!", lang="pt-BR"),
    # t7: ranked before unranked; the rank-0 reply failed review.
    msg("t7", None, "prompter", "Pick one"),
    msg("t7-a", "t7", "assistant", "unranked"),
    msg("t7-b", "t7", "assistant", "ranked second", rank=2),
    msg("t7-c", "t7", "assistant", "ranked first, failed review", rank=0, review=False),
]

T1 = {
    "messages": [user("What is 2+2?"), assistant("2+2 is 4."), user("And 3+3?"), assistant("6.")],
    "language": "en",
    "_meta": meta("oasst2", "t1"),
}
T2 = {
    "messages": [user("Wie spät ist es?"), assistant("Zeit für Tests.")],
    "language": "de",
    "_meta": meta("oasst2", "t2"),
}
T6 = {"messages": [user("Olá?"), assistant("Olá!")], "language": "pt-BR", "_meta": meta("oasst2", "t6")}
T7 = {"messages": [user("Pick one"), assistant("ranked second")], "language": "en", "_meta": meta("oasst2", "t7")}


def test_oasst2_best_paths_exact(tmp_path):
    src = to_parquet(tmp_path / "oasst2.parquet", OASST_ROWS)
    report = convert("oasst2", str(src), str(tmp_path / "out.jsonl"))
    assert output(tmp_path / "out.jsonl") == [T1, T2, T6, T7]
    assert report.rows_read == len(OASST_ROWS)
    assert report.episodes_written == report.valid == 4
    assert report.rejected == Counter()
    assert report.skipped == Counter(
        deleted_messages=2, failed_review_messages=2, trees_not_ready=1, trees_with_removed_prompt=1, too_short=1
    )
    assert report.languages == Counter({"en": 2, "de": 1, "pt-BR": 1})
    assert report.turns == Counter({1: 3, 2: 1})


@pytest.mark.parametrize(
    ("languages", "expected", "other"),
    [(["en", "de"], [T1, T2, T7], 1), (["PT"], [T6], 3), (["de,fr"], [T2], 3)],
)
def test_oasst2_language_filter(tmp_path, languages, expected, other):
    src = to_parquet(tmp_path / "oasst2.parquet", OASST_ROWS)
    report = convert("oasst2", str(src), str(tmp_path / "out.jsonl"), languages=languages)
    assert output(tmp_path / "out.jsonl") == expected
    assert report.skipped["other_language"] == other


def test_oasst2_min_depth_counts_messages(tmp_path):
    src = to_parquet(tmp_path / "oasst2.parquet", OASST_ROWS)
    report = convert("oasst2", str(src), str(tmp_path / "out.jsonl"), min_depth=4)
    assert output(tmp_path / "out.jsonl") == [T1]
    assert report.skipped["too_short"] == 4
    with pytest.raises(LossmaskError, match="min_depth"):
        convert("oasst2", str(src), str(tmp_path / "x.jsonl"), min_depth=1)


def test_oasst2_trees_form_matches_message_rows(tmp_path):
    by_parent: dict = {}
    for row in OASST_ROWS:
        by_parent.setdefault(row["parent_id"], []).append(row)

    def nested(row: dict) -> dict:
        keep = {k: row[k] for k in ("message_id", "text", "role", "lang", "rank", "deleted", "review_result")}
        return {**keep, "replies": [nested(r) for r in by_parent.get(row["message_id"], [])]}

    trees = [
        {"message_tree_id": r["message_id"], "tree_state": r["tree_state"], "prompt": nested(r)}
        for r in OASST_ROWS
        if r["parent_id"] is None
    ]
    src = to_jsonl(tmp_path / "oasst2.trees.jsonl", trees)
    report = convert("oasst2", str(src), str(tmp_path / "out.jsonl"))
    assert output(tmp_path / "out.jsonl") == [T1, T2, T6, T7]
    assert report.rows_read == 7


def test_oasst2_bad_role_order_is_rejected(tmp_path):
    rows = [msg("r1", None, "prompter", "q"), msg("r1-a", "r1", "prompter", "q again", rank=0)]
    rows += [msg("r2", None, "prompter", "q"), msg("r2-a", "r2", "assistant", "a", rank=0)]
    report = convert("oasst2", str(to_parquet(tmp_path / "o.parquet", rows)), str(tmp_path / "out.jsonl"))
    assert [r["_meta"]["source_id"] for r in output(tmp_path / "out.jsonl")] == ["r2"]
    assert report.rejected == Counter(bad_tree=1)
    assert "r1-a" in report.rejected_examples["bad_tree"]


# ---- alpaca ----------------------------------------------------------------------------------------

ALPACA_ROWS = [
    {"instruction": "Übersetze ins Deutsche.", "input": "Good morning", "output": "Guten Morgen"},
    {"instruction": "Nenne eine Farbe.", "input": "", "output": "Blau."},
    {"instruction": "Sag hallo.", "input": "   ", "output": ""},
    {"instruction": "", "input": "", "output": "Nichts."},
]


def test_alpaca_exact_and_language_hint(tmp_path):
    src = to_parquet(tmp_path / "alpaca-gpt4_de.parquet", ALPACA_ROWS)
    report = convert("alpaca", str(src), str(tmp_path / "out.jsonl"), languages=["de"])
    assert output(tmp_path / "out.jsonl") == [
        {
            "messages": [user("Übersetze ins Deutsche.\n\nGood morning"), assistant("Guten Morgen")],
            "language": "de",
            "_meta": meta("alpaca", "row:0"),
        },
        {
            "messages": [user("Nenne eine Farbe."), assistant("Blau.")],
            "language": "de",
            "_meta": meta("alpaca", "row:1"),
        },
    ]
    assert report.rejected == Counter(empty_assistant=1, empty_prompt=1)
    assert report.rejected_examples["empty_prompt"].startswith("row:3")
    assert any("tagged 'de'" in note for note in report.notes)


def test_alpaca_language_column_filters_and_several_hints_are_ignored(tmp_path):
    rows = [
        {"id": "a", "instruction": "Hi", "input": "", "output": "Hello", "language": "en"},
        {"id": "b", "instruction": "Hallo", "input": "", "output": "Servus", "language": "de"},
        {"id": "c", "instruction": "?", "input": "", "output": "!", "language": None},
    ]
    src = to_jsonl(tmp_path / "a.jsonl", rows)
    report = convert("alpaca", str(src), str(tmp_path / "out.jsonl"), languages=["de"])
    assert [(r["_meta"]["source_id"], r["language"]) for r in output(tmp_path / "out.jsonl")] == [("b", "de")]
    assert report.skipped["other_language"] == 2

    plain = to_parquet(tmp_path / "plain.parquet", ALPACA_ROWS[:2])
    report = convert("alpaca", str(plain), str(tmp_path / "out2.jsonl"), languages=["de", "en"])
    assert all("language" not in r for r in output(tmp_path / "out2.jsonl"))
    assert report.notes == ["the data has no language column: --languages is ignored"]


def test_alpaca_history_system_and_csv(tmp_path):
    src = tmp_path / "a.jsonl"
    to_jsonl(src, [{"system": "Be terse.", "history": [["Hi", "Hello"]], "instruction": "Bye", "output": "Ciao"}])
    convert("alpaca", str(src), str(tmp_path / "out.jsonl"))
    assert output(tmp_path / "out.jsonl") == [
        {
            "system": "Be terse.",
            "messages": [user("Hi"), assistant("Hello"), user("Bye"), assistant("Ciao")],
            "_meta": meta("alpaca", "row:0"),
        }
    ]
    csv = tmp_path / "a.csv"
    csv.write_text('instruction,input,output\n"Add 1+1","","2"\n', encoding="utf-8")
    convert("alpaca", str(csv), str(tmp_path / "csv.jsonl"))
    assert output(tmp_path / "csv.jsonl") == [
        {"messages": [user("Add 1+1"), assistant("2")], "_meta": meta("alpaca", "row:0")}
    ]


# ---- sharegpt / ultrachat --------------------------------------------------------------------------


def test_sharegpt_exact_and_rejections(tmp_path):
    def turn(who, text):
        return {"from": who, "value": text}

    rows = [
        {"id": "s1", "conversations": [
            turn("system", "You are kind."), turn("human", "Hi"), turn("gpt", "Hello!"),
            turn("human", "How are you?"), turn("gpt", "Fine."), turn("human", "unanswered"),
        ]},
        {"id": "s2", "conversations": [turn("human", "a"), turn("human", "b"), turn("gpt", "c")]},
        {"id": "s3", "conversations": [turn("human", "a"), turn("tool", "b"), turn("gpt", "c")]},
        {"id": "s4", "conversations": [turn("human", "a"), turn("gpt", "b"), turn("system", "late")]},
        {"id": "s5", "conversations": [turn("gpt", "I start"), turn("human", "b"), turn("gpt", "c")]},
    ]
    src = to_jsonl(tmp_path / "sharegpt.jsonl", rows)
    report = convert("sharegpt", str(src), str(tmp_path / "out.jsonl"))
    assert output(tmp_path / "out.jsonl") == [
        {
            "system": "You are kind.",
            "messages": [user("Hi"), assistant("Hello!"), user("How are you?"), assistant("Fine.")],
            "_meta": meta("sharegpt", "s1"),
        }
    ]
    assert report.rejected == Counter(not_alternating=2, unknown_role=1, misplaced_system=1)
    assert report.skipped["trailing_untrained_messages"] == 1
    assert report.turns == Counter({2: 1})


def test_ultrachat_200k_messages_and_original_data_lists(tmp_path):
    rows = [{
        "prompt": "Name a prime.",
        "prompt_id": "p-1",
        "messages": [
            {"role": "user", "content": "Name a prime."}, {"role": "assistant", "content": "7"},
            {"role": "user", "content": "Another?"}, {"role": "assistant", "content": "11"},
        ],
    }]
    src = to_parquet(tmp_path / "train_sft.parquet", rows)
    convert("ultrachat", str(src), str(tmp_path / "out.jsonl"))
    assert output(tmp_path / "out.jsonl") == [{
        "messages": [user("Name a prime."), assistant("7"), user("Another?"), assistant("11")],
        "_meta": meta("ultrachat", "p-1"),
    }]
    original = to_jsonl(tmp_path / "ultrachat.jsonl", [{"id": "0", "data": ["q1", "a1", "q2", "a2", "q3"]}])
    report = convert("ultrachat", str(original), str(tmp_path / "out2.jsonl"))
    assert output(tmp_path / "out2.jsonl") == [{
        "messages": [user("q1"), assistant("a1"), user("q2"), assistant("a2")],
        "_meta": meta("ultrachat", "0"),
    }]
    assert report.turns == Counter({2: 1})


# ---- tool-xml --------------------------------------------------------------------------------------

HERMES_SYSTEM = (
    "You are a function calling AI model. You are provided with function signatures within <tools> </tools> "
    "XML tags. You may call one or more functions to assist with the user query.\n<tools>\n"
    "[{'type': 'function', 'function': {'name': 'get_weather', 'description': 'Weather now', 'parameters': "
    "{'type': 'object', 'properties': {'city': {'type': 'string'}}, 'required': ['city']}}}, "
    "{'type': 'function', 'function': {'name': 'get_time', 'parameters': {'type': 'object', 'properties': "
    "{'tz': {'type': 'string'}}}}}]\n</tools>\n"
    "For each function call return a json object with function name and arguments within <tool_call> </tool_call> "
    "tags with the following schema:\n<tool_call>\n{'arguments': <args-dict>, 'name': <function-name>}\n</tool_call>\n"
)
HERMES_TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Weather now", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}},
    {"type": "function", "function": {"name": "get_time", "parameters": {
        "type": "object", "properties": {"tz": {"type": "string"}}}}},
]


def hermes_row(row_id: str, *turns: tuple[str, str]) -> dict:
    return {"id": row_id, "conversations": [{"from": f, "value": v} for f, v in turns], "category": "Weather"}


def call(name: str, **arguments) -> dict:
    return {"role": "assistant_toolcall", "name": name, "arguments": arguments}


def test_tool_xml_hermes_exact(tmp_path):
    rows = [
        hermes_row(
            "h1",
            ("system", HERMES_SYSTEM),
            ("human", "Weather and time in Paris?"),
            ("gpt", "<tool_call>\n{'arguments': {'city': 'Paris'}, 'name': 'get_weather'}\n</tool_call>\n"
                    '<tool_call>\n{"name": "get_time", "arguments": {"tz": "CET"}}\n</tool_call>\n'),
            ("tool", '<tool_response>\n{"name": "get_weather", "content": {"temp": 18}}\n</tool_response>\n'
                     "<tool_response>\n12:00\n</tool_response>\n"),
            ("gpt", "18 °C, and it is noon."),
        ),
        hermes_row(
            "h2",
            ("human", "Rome?"),
            # arguments double-encoded as a JSON string
            ("gpt", 'Let me check.\n<tool_call>\n{"name": "get_weather", '
                    '"arguments": "{\\"city\\": \\"Rome\\"}"}\n</tool_call>'),
        ),
    ]
    src = tmp_path / "func-calling.json"  # the Hermes files are JSON arrays, not JSONL
    src.write_text(json.dumps(rows), encoding="utf-8")
    report = convert("tool-xml", str(src), str(tmp_path / "out.jsonl"))
    assert output(tmp_path / "out.jsonl") == [
        {
            "system": HERMES_SYSTEM,
            "tools": HERMES_TOOLS,
            "messages": [
                user("Weather and time in Paris?"),
                call("get_weather", city="Paris"),
                call("get_time", tz="CET"),
                {
                    "role": "toolresult",
                    "name": "get_weather",
                    "content": '{"name": "get_weather", "content": {"temp": 18}}',
                },
                {"role": "toolresult", "content": "12:00"},
                assistant("18 °C, and it is noon."),
            ],
            "_meta": meta("tool-xml", "h1"),
        },
        {
            "messages": [user("Rome?"), assistant("Let me check."), call("get_weather", city="Rome")],
            "_meta": meta("tool-xml", "h2"),
        },
    ]
    assert report.turns == Counter({2: 1, 1: 1})


@pytest.mark.parametrize(
    ("mode", "system"),
    [
        (
            "cut",
            "You are a function calling AI model. You are provided with function signatures within <tools> </tools> "
            "XML tags. You may call one or more functions to assist with the user query.\n\n"
            "For each function call return a json object with function name and arguments within <tool_call> "
            "</tool_call> tags with the following schema:\n<tool_call>\n{'arguments': <args-dict>, "
            "'name': <function-name>}\n</tool_call>",
        ),
        ("drop", None),
    ],
)
def test_tool_xml_system_tools_modes(tmp_path, mode, system):
    rows = [hermes_row("h", ("system", HERMES_SYSTEM), ("human", "Hi"), ("gpt", "Hello"))]
    src = to_jsonl(tmp_path / "h.jsonl", rows)
    convert("tool-xml", str(src), str(tmp_path / "out.jsonl"), system_tools=mode)
    (record,) = output(tmp_path / "out.jsonl")
    assert record.get("system") == system
    assert record["tools"] == HERMES_TOOLS


def test_tool_xml_dolci_messages_with_function_calls(tmp_path):
    schema = {"name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}
    functions = json.dumps([schema])
    rows = [{
        "id": "d1",
        "messages": [
            {"role": "system", "content": "You are a helpful function-calling AI assistant.", "functions": functions,
             "function_calls": None},
            {"role": "user", "content": "Weather in Boston and Oslo?", "functions": None, "function_calls": None},
            {"role": "assistant", "content": "", "functions": None,
             "function_calls": 'get_weather(city="Boston")\nget_weather(city="Oslo", units=["C", "F"])'},
            {"role": "environment", "content": '{"temp_f": 54}', "functions": None, "function_calls": None},
            {"role": "environment", "content": '{"temp_f": 40}', "functions": None, "function_calls": None},
            {"role": "assistant", "content": "54F in Boston, 40F in Oslo.", "functions": None, "function_calls": ""},
        ],
    }]
    src = to_parquet(tmp_path / "dolci.parquet", rows)
    convert("tool-xml", str(src), str(tmp_path / "out.jsonl"))
    assert output(tmp_path / "out.jsonl") == [{
        "system": "You are a helpful function-calling AI assistant.",
        "tools": [schema],
        "messages": [
            user("Weather in Boston and Oslo?"),
            call("get_weather", city="Boston"),
            call("get_weather", city="Oslo", units=["C", "F"]),
            {"role": "toolresult", "content": '{"temp_f": 54}'},
            {"role": "toolresult", "content": '{"temp_f": 40}'},
            assistant("54F in Boston, 40F in Oslo."),
        ],
        "_meta": meta("tool-xml", "d1"),
    }]


def test_tool_xml_python_call_syntax(tmp_path):
    rows = [
        hermes_row("ok", ("human", "q"), ("gpt", "On it.\n<function_calls>[lookup(q='x'), now()]</function_calls>")),
        hermes_row("positional", ("human", "q"), ("gpt", "<function_calls>lookup('x')</function_calls>")),
        hermes_row("not_literal", ("human", "q"), ("gpt", "<function_calls>lookup(q=x + 1)</function_calls>")),
        hermes_row("not_a_call", ("human", "q"), ("gpt", "<function_calls>lookup</function_calls>")),
    ]
    report = convert("tool-xml", str(to_jsonl(tmp_path / "c.jsonl", rows)), str(tmp_path / "out.jsonl"))
    assert output(tmp_path / "out.jsonl") == [{
        "messages": [user("q"), assistant("On it."), call("lookup", q="x"), call("now")],
        "_meta": meta("tool-xml", "ok"),
    }]
    assert report.rejected == Counter(bad_tool_arguments=2, bad_tool_call_json=1)


def test_tool_xml_tools_column_from_parquet_structs(tmp_path):
    weather = {"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}}}}
    clock = {"type": "function", "function": {"name": "get_time", "parameters": {
        "type": "object", "properties": {"tz": {"type": "string", "default": "UTC"}}}}}
    rows = [
        {"tools": [weather], "messages": [{"role": "user", "content": "Paris?"},
                                          {"role": "assistant", "content": "Sure, checking."}]},
        {"tools": [clock], "messages": [{"role": "user", "content": "Time?"},
                                        {"role": "assistant", "content": "Noon."}]},
    ]
    src = to_parquet(tmp_path / "tools.parquet", rows)
    convert("tool-xml", str(src), str(tmp_path / "out.jsonl"))
    assert [r["tools"] for r in output(tmp_path / "out.jsonl")] == [[weather], [clock]]


BAD_TOOL_ROWS = {
    "bad_tool_call_json": ("gpt", '<tool_call>\n{"name": "f", "arguments": {"a": 1}\n</tool_call>'),
    "missing_tool_name": ("gpt", '<tool_call>{"arguments": {}}</tool_call>'),
    "bad_tool_arguments": ("gpt", '<tool_call>{"name": "f", "arguments": [1, 2]}</tool_call>'),
    "missing_tool_arguments": ("gpt", '<tool_call>{"name": "f"}</tool_call>'),
    "tool_call_not_object": ("gpt", '<tool_call>"f"</tool_call>'),
    "bad_tool_call": ("gpt", '<tool_call>{"name": "f", "arguments": {}, "id": "c1"}</tool_call>'),
    "unclosed_tag": ("gpt", 'Sure.\n<tool_call>{"name": "f", "arguments": {}}'),
    "stray_close_tag": ("gpt", "Done.</tool_call>"),
    "text_after_tool_call": ("gpt", '<tool_call>{"name": "f", "arguments": {}}</tool_call>\nand then more text'),
    "bad_tool_response": ("tool", "note <tool_response>ok</tool_response>"),
}


def test_tool_xml_every_rejection_rejects_the_whole_record(tmp_path):
    good_call = ("gpt", '<tool_call>{"name": "g", "arguments": {}}</tool_call>')
    good_result = ("tool", "<tool_response>r</tool_response>")
    rows = [hermes_row("good", ("human", "q"), good_call, good_result, ("gpt", "done"))]
    for reason, bad in BAD_TOOL_ROWS.items():
        # a valid call first: a rejected record must not be half-converted
        rows.append(hermes_row(reason, ("human", "q"), good_call, ("tool", "r"), bad, ("gpt", "end")))
    rows.append(hermes_row("bad_tools", ("system", "<tools>[{'name': 'f'</tools>"), ("human", "q"), ("gpt", "a")))
    src = to_jsonl(tmp_path / "tools.jsonl", rows)
    report = convert("tool-xml", str(src), str(tmp_path / "out.jsonl"))
    assert output(tmp_path / "out.jsonl") == [{
        "messages": [user("q"), call("g"), {"role": "toolresult", "content": "r"}, assistant("done")],
        "_meta": meta("tool-xml", "good"),
    }]
    assert report.rejected == Counter({reason: 1 for reason in [*BAD_TOOL_ROWS, "bad_tools"]})
    assert all(report.rejected_examples[r].startswith(f"{r} (field conversations[") for r in report.rejected)


# ---- max-examples ----------------------------------------------------------------------------------


def _numbered(tmp_path: Path) -> Path:
    rows = [
        {"id": f"c{i:02d}", "data": [f"q{i}", f"a{i}"], "language": "de" if i % 3 == 0 else "en"}
        for i in range(60)
    ]
    return to_jsonl(tmp_path / "many.jsonl", rows)


def test_max_examples_is_a_deterministic_seeded_sample_in_source_order(tmp_path):
    src = str(_numbered(tmp_path))
    convert("ultrachat", src, str(tmp_path / "all.jsonl"))
    everything = (tmp_path / "all.jsonl").read_bytes().splitlines()
    runs = {}
    for name, seed in (("a", 1), ("b", 1), ("c", 2)):
        report = convert("ultrachat", src, str(tmp_path / f"{name}.jsonl"), max_examples=10, seed=seed)
        assert (report.valid, report.episodes_written, report.skipped["over_max_examples"]) == (60, 10, 50)
        runs[name] = (tmp_path / f"{name}.jsonl").read_bytes()
    assert runs["a"] == runs["b"]
    assert runs["a"] != runs["c"]
    for run in runs.values():
        lines = run.splitlines()
        positions = [everything.index(line) for line in lines]
        assert positions == sorted(positions) and len(set(positions)) == 10
    report = convert("ultrachat", src, str(tmp_path / "few.jsonl"), max_examples=100)
    assert report.episodes_written == 60 and "over_max_examples" not in report.skipped


def test_max_examples_applies_after_the_language_filter(tmp_path):
    src = str(_numbered(tmp_path))
    report = convert("ultrachat", src, str(tmp_path / "de.jsonl"), languages=["de"], max_examples=5)
    records = output(tmp_path / "de.jsonl")
    assert len(records) == 5 and {r["language"] for r in records} == {"de"}
    assert (report.valid, report.skipped["other_language"]) == (20, 40)


# ---- sources and output ----------------------------------------------------------------------------

CHAT_ROWS = [
    {"id": "x1", "messages": [{"role": "user", "content": "one"}, {"role": "assistant", "content": "1"}]},
    {"id": "x2", "messages": [{"role": "user", "content": "two"}, {"role": "assistant", "content": "2"}]},
]


def _ids(path: Path) -> list[str]:
    return [r["_meta"]["source_id"] for r in output(path)]


def test_local_sources_save_to_disk_directories_and_arrow(tmp_path):
    ds = datasets.Dataset.from_list(CHAT_ROWS)
    ds.save_to_disk(str(tmp_path / "saved"))
    datasets.DatasetDict({"train": ds.select([0]), "validation": ds.select([1])}).save_to_disk(str(tmp_path / "dict"))
    (tmp_path / "hub" / "data").mkdir(parents=True)
    to_parquet(tmp_path / "hub" / "data" / "train-00000-of-00001.parquet", CHAT_ROWS[:1])
    to_parquet(tmp_path / "hub" / "data" / "test-00000-of-00001.parquet", CHAT_ROWS[1:])
    arrow = next((tmp_path / "saved").glob("*.arrow"))
    out = tmp_path / "out.jsonl"
    for source, split, expected in [
        (tmp_path / "saved", "train", ["x1", "x2"]),
        (tmp_path / "dict", "validation", ["x2"]),
        (tmp_path / "hub", "test", ["x2"]),
        (tmp_path / "hub", "train", ["x1"]),
        (arrow, "train", ["x1", "x2"]),
    ]:
        convert("sharegpt", str(source), str(out), split=split)
        assert _ids(out) == expected, source
    with pytest.raises(LossmaskError, match="no split 'test'; its splits are train, validation"):
        convert("sharegpt", str(tmp_path / "dict"), str(out), split="test")


def test_hub_ids_go_to_load_dataset_and_bad_sources_fail_clearly(tmp_path, monkeypatch):
    calls = []

    def fake_load_dataset(*args, **kwargs):
        calls.append((args, kwargs))
        return datasets.Dataset.from_list(CHAT_ROWS)

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    out = tmp_path / "out.jsonl"
    convert("ultrachat", "HuggingFaceH4/ultrachat_200k", str(out), split="train_sft")
    convert("tool-xml", "NousResearch/hermes-function-calling-v1:func_calling", str(out))
    assert calls == [
        (("HuggingFaceH4/ultrachat_200k",), {"split": "train_sft"}),
        (("NousResearch/hermes-function-calling-v1", "func_calling"), {"split": "train"}),
    ]
    assert _ids(out) == ["x1", "x2"]
    for source, message in [
        (str(tmp_path / "missing.parquet"), "no such file or directory"),
        ("data/missing.jsonl", "no such file or directory"),
        (str(to_jsonl(tmp_path / "rows.txt", CHAT_ROWS)), "unknown file type"),
    ]:
        with pytest.raises(LossmaskError, match=message):
            convert("sharegpt", source, str(out))


def test_wrong_kind_fails_before_writing(tmp_path):
    src = to_jsonl(tmp_path / "chat.jsonl", CHAT_ROWS)
    with pytest.raises(LossmaskError, match="does not look like alpaca data: its columns are id, messages"):
        convert("alpaca", str(src), str(tmp_path / "out" / "out.jsonl"))
    assert not (tmp_path / "out").exists()
    with pytest.raises(LossmaskError, match="unknown kind"):
        convert("dolly", str(src), str(tmp_path / "out.jsonl"))


def test_output_is_atomic(tmp_path, monkeypatch):
    src = str(to_jsonl(tmp_path / "chat.jsonl", CHAT_ROWS * 3))
    out = tmp_path / "out.jsonl"
    out.write_text("previous output\n")
    real = convert_module._validated_line
    seen = []

    def failing(*args):
        seen.append(args)
        if len(seen) == 3:
            raise RuntimeError("disk on fire")
        return real(*args)

    monkeypatch.setattr(convert_module, "_validated_line", failing)
    with pytest.raises(RuntimeError, match="disk on fire"):
        convert("sharegpt", src, str(out))
    assert out.read_text() == "previous output\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["chat.jsonl", "hf-cache", "out.jsonl"]
    monkeypatch.setattr(convert_module, "_validated_line", real)
    report = convert("sharegpt", src, str(out))
    assert report.episodes_written == 6 and len(output(out)) == 6


def test_print_report(tmp_path):
    src = to_parquet(tmp_path / "oasst2.parquet", OASST_ROWS)
    report = convert("oasst2", str(src), str(tmp_path / "out.jsonl"), languages=["de"])
    console = Console(file=StringIO(), width=200, color_system=None)
    print_convert_report(report, console)
    text = console.file.getvalue()
    for expected in ("rows read", " 23 ", "episodes written", "other_language", "de 1", "1: 1"):
        assert expected in text, text
    assert report.to_dict()["turns"] == {"1": 1}
