"""Tool-calling (phase 5) and agentic (phase 6) data: real tool results, grounding, mix, split, rendering."""
from __future__ import annotations

import copy
import json
from collections import Counter

import pytest

from lossmask.episode import Conversation, Source
from lossmask.errors import LossmaskError
from lossmask.generate.format_lock import write_jsonl
from lossmask.generate.tools import (
    PATTERNS,
    TOOL_SYSTEM_PROMPTS,
    THINK,
    generate_agentic,
    generate_toolcall,
    is_held_out_doc,
    is_held_out_fact,
    is_held_out_prompt,
    load_catalogue,
    validate_record,
)
from lossmask.mypt_tokens import add_mypt_tokens
from lossmask.render.base import Label
from lossmask.render.mypt import MyptRenderer, toolcall_json
from lossmask.sources import parse_record, read_episodes
from lossmask.tokenizer import TokenizerInfo, load_tokenizer
from lossmask.workspace import Workspace, check_call, sample_workspace
from tests.conftest import load_test_tokenizer
from tests.tokenizers_cache import tokenizer_dir

WS = Workspace(sample_workspace())
CATALOGUE = load_catalogue(WS)
FACTS = {f.id: f for f in CATALOGUE.facts}
AGENTIC = generate_agentic(500, seed=0, workspace=WS)
TOOLCALL = generate_toolcall(250, seed=0, workspace=WS)
HELD_AGENTIC = generate_agentic(250, seed=0, held_out=True, workspace=WS)
HELD_TOOLCALL = generate_toolcall(100, seed=0, held_out=True, workspace=WS)
EVERY = AGENTIC + TOOLCALL + HELD_AGENTIC + HELD_TOOLCALL


def calls(record: dict) -> list[tuple[str, dict, str]]:
    """(name, arguments, result) of every tool call in a record."""
    ms = record["messages"]
    return [(m["name"], m["arguments"], ms[i + 1]["content"])
            for i, m in enumerate(ms) if m["role"] == "assistant_toolcall"]


def first_user(record: dict) -> str:
    return record["messages"][0]["content"]


def test_same_seed_same_records_other_seed_other_records():
    assert generate_agentic(500, seed=0) == AGENTIC
    assert generate_toolcall(250, seed=0) == TOOLCALL
    assert generate_agentic(50, seed=1) != AGENTIC[:50]
    assert generate_toolcall(0, seed=0) == []


def test_agentic_pattern_mix():
    patterns = Counter(r["_meta"]["pattern"] for r in AGENTIC)
    assert set(patterns) == set(PATTERNS)
    assert patterns["NO_TOOL"] == 100  # 20%: 5 of every shuffled block of 25
    corrections = [r for r in AGENTIC if r["_meta"]["correction"]]
    assert len(corrections) == 40  # 8%
    assert patterns["LIST_SELECT_SUMMARIZE"] == 80 and patterns["ERROR_RECOVERY"] == 80
    assert patterns["SEARCH_ANSWER"] > 100 and patterns["SEARCH_GETDOC_ANSWER"] > 100
    window = Counter(r["_meta"]["pattern"] for r in AGENTIC[:100])
    assert 15 <= window["NO_TOOL"] <= 25  # blocks keep the mix even over short stretches
    wrong_tool = {lang: THINK[lang]["wrong_tool"] for lang in THINK}
    for record in corrections:
        assert record["_meta"]["expected_tools"][:2] == ["workspace.list_docs", "workspace.search"]
        think = record["messages"][3]
        assert think["role"] == "assistant" and think["content"] == ""
        subject = FACTS[record["_meta"]["fact"]].subject
        assert think["think"] in [t.format(subject=subject) for t in wrong_tool[record["language"]]]
        assert record["messages"][4]["name"] == "workspace.search"
    assert Counter(r["language"] for r in AGENTIC) == {"en": 250, "de": 250}
    pairs = {(r["language"], r["_meta"]["pattern"]) for r in AGENTIC}
    assert pairs == {(lang, p) for lang in ("en", "de") for p in PATTERNS}


def test_toolcall_is_one_search_or_no_tool():
    patterns = Counter(r["_meta"]["pattern"] for r in TOOLCALL)
    assert patterns == {"SEARCH_ANSWER": 200, "NO_TOOL": 50}
    for record in TOOLCALL:
        expected = [] if record["_meta"]["pattern"] == "NO_TOOL" else ["workspace.search"]
        assert [name for name, _, _ in calls(record)] == expected == record["_meta"]["expected_tools"]
        assert [m["role"] for m in record["messages"]] == (
            ["user", "assistant"] if not expected else ["user", "assistant_toolcall", "toolresult", "assistant"]
        )


def test_every_tool_result_is_what_the_tool_returns():
    fresh = Workspace(sample_workspace())
    seen = Counter()
    for record in EVERY:
        for name, arguments, result in calls(record):
            assert check_call(name, arguments) is None
            assert result == fresh.call(name, arguments)
            seen[name, "error" in json.loads(result)] += 1
    assert seen["workspace.get_doc", True] == 80 + sum(r["_meta"]["pattern"] == "ERROR_RECOVERY" for r in HELD_AGENTIC)
    assert seen["workspace.search", False] and seen["workspace.list_docs", False] and seen["workspace.get_doc", False]
    assert not seen["workspace.search", True] and not seen["workspace.list_docs", True]


def test_answers_cite_existing_documents_and_are_grounded_in_tool_results():
    for record in EVERY:
        meta = record["_meta"]
        final = record["messages"][-1]
        assert final["role"] == "assistant" and final["content"].strip()
        assert meta["answer_contains"] and all(s in final["content"] for s in meta["answer_contains"])
        if meta["pattern"] == "NO_TOOL":
            assert meta["cited_docs"] == [] and "cite" not in final and meta["fact"] is None
            continue
        (doc,) = meta["cited_docs"]
        assert WS.has_doc(doc) and final["cite"] == doc
        text = WS.get_doc(doc)["text"]
        assert all(s in text for s in meta["answer_contains"])
        shown = [json.loads(result) for name, _, result in calls(record)]
        for s in meta["answer_contains"]:
            assert any(r.get("doc_id") == doc and s in r["text"] for r in shown if "text" in r) or any(
                hit["doc_id"] == doc and s in hit["snippet"] for r in shown for hit in r.get("results", [])
            )
        if meta["fact"] is not None:
            fact = FACTS[meta["fact"]]
            assert fact.doc == doc and meta["answer_contains"] == [fact.value] and fact.answer in final["content"]
        if meta["pattern"] == "SEARCH_ANSWER":
            assert calls(record)[-1][0] == "workspace.search"


def test_records_parse_and_carry_the_gate_fields():
    for i, record in enumerate(EVERY):
        meta = record["_meta"]
        assert set(meta) == {"generator", "phase", "pattern", "language", "split", "expected_tools", "cited_docs",
                             "answer_contains", "fact", "correction"}
        assert (meta["generator"], meta["phase"]) in {("agentic", "6"), ("toolcall", "5")}
        assert meta["language"] == record["language"]
        assert record["system"] in TOOL_SYSTEM_PROMPTS[record["language"]]
        episode = parse_record(record, Source("tools.jsonl", i + 1), "native")
        assert isinstance(episode, Conversation) and episode.language == record["language"]


def test_held_out_questions_never_appear_in_training():
    for records, held in ((AGENTIC + TOOLCALL, False), (HELD_AGENTIC + HELD_TOOLCALL, True)):
        assert {r["_meta"]["split"] for r in records} == {"held_out" if held else "train"}
        for r in records:
            meta = r["_meta"]
            if meta["fact"] is not None:
                assert is_held_out_fact(FACTS[meta["fact"]]) == held
            elif meta["pattern"] == "LIST_SELECT_SUMMARIZE":
                assert is_held_out_doc(meta["cited_docs"][0]) == held
            else:
                assert is_held_out_prompt(first_user(r)) == held
    train_facts = {r["_meta"]["fact"] for r in AGENTIC + TOOLCALL} - {None}
    held_facts = {r["_meta"]["fact"] for r in HELD_AGENTIC + HELD_TOOLCALL} - {None}
    assert held_facts and train_facts and not held_facts & train_facts
    assert not {first_user(r) for r in HELD_AGENTIC + HELD_TOOLCALL} & {first_user(r) for r in AGENTIC + TOOLCALL}
    summary = {r["_meta"]["cited_docs"][0]: r["_meta"]["split"] for r in AGENTIC + HELD_AGENTIC
               if r["_meta"]["pattern"] == "LIST_SELECT_SUMMARIZE"}
    assert set(summary.values()) == {"train", "held_out"}
    assert train_facts == {f.id for f in CATALOGUE.facts if not is_held_out_fact(f)}  # every fact gets asked
    assert held_facts == {f.id for f in CATALOGUE.facts if is_held_out_fact(f)}
    assert 0.15 < len(held_facts) / len(CATALOGUE.facts) < 0.35
    trained_text = "\n".join(m["content"] + m.get("think", "") for r in AGENTIC + TOOLCALL for m in r["messages"]
                              if m["role"] == "assistant")
    for fact_id in held_facts:  # retrieved documents show held-out facts, but no training answer states one
        assert FACTS[fact_id].answer not in trained_text


def test_languages_can_be_chosen():
    german = generate_agentic(50, seed=2, languages=("de",))
    assert {r["language"] for r in german} == {"de"}
    assert all(FACTS[r["_meta"]["fact"]].language == "de" for r in german if r["_meta"]["fact"])


@pytest.fixture(scope="module")
def mypt_tokenizer():
    load_test_tokenizer("llama2")  # skips (or fails in CI) when the test tokenizer is unavailable
    tok = load_tokenizer(str(tokenizer_dir("llama2")))
    add_mypt_tokens(tok)
    return tok


def test_every_record_renders_in_mypt_with_trained_tool_calls_only(mypt_tokenizer):
    renderer = MyptRenderer(TokenizerInfo.of(mypt_tokenizer), weighted=True)
    untrained = {Label.SYSTEM, Label.USER, Label.TOOLRESULT, Label.CONTEXT}
    for i, record in enumerate(AGENTIC[:150] + TOOLCALL[:50]):
        episode = parse_record(record, Source("tools.jsonl", i + 1), "native")
        (rendered,) = renderer.render(episode)
        text = rendered.text
        trained = "".join(text[s.start:s.end] for s in rendered.spans if s.weight > 0)
        messages = [m for m in episode.messages if m.role == "assistant_toolcall"]
        for message, (name, arguments, result) in zip(messages, calls(record), strict=True):
            assert (message.name, message.arguments) == (name, arguments)
            call_text = toolcall_json(message, 0)
            assert f"<myPT_toolcall>{call_text}</myPT_toolcall>" in text and call_text in trained
            assert f"<myPT_toolresult>{result}</myPT_toolresult>" in text
        for span in rendered.spans:
            if span.label in untrained:
                assert span.weight == 0
        assert text.count("<myPT_eot>") == 1 and text.endswith("</myPT_assistant><myPT_eot>")
        assert record["messages"][-1]["content"] in trained
        if record["messages"][-1].get("cite"):
            assert f"<myPT_cite>{record['messages'][-1]['cite']}</myPT_cite>" in text


def test_validate_record_rejects_broken_episodes():
    search = next(r for r in AGENTIC if r["_meta"]["pattern"] == "SEARCH_ANSWER" and not r["_meta"]["correction"])
    validate_record(search, WS)

    def broken(change) -> dict:
        record = copy.deepcopy(search)
        change(record)
        return record

    cases = {
        "not what the tool returns": lambda r: r["messages"][2].update(
            content=r["messages"][2]["content"].replace("snippet", "text")
        ),
        "do not exist": lambda r: (r["_meta"].update(cited_docs=["handbook/nope"]),
                                   r["messages"][-1].update(cite="handbook/nope")),
        "does not contain": lambda r: r["messages"][-1].update(content="I do not know."),
        "does not fit the tool schemas": lambda r: r["messages"][1].update(arguments={"q": "hotel"}),
        "differ from expected_tools": lambda r: r["_meta"].update(expected_tools=[]),
        "does not match cited_docs": lambda r: r["messages"][-1].pop("cite"),
        "no tool result of a cited document": lambda r: r["_meta"].update(answer_contains=["Zanzibar"])
        or r["messages"][-1].update(content=r["messages"][-1]["content"] + " Zanzibar"),
        "do not fit the pattern": lambda r: r["_meta"].update(pattern="SEARCH_GETDOC_ANSWER"),
    }
    for message, change in cases.items():
        with pytest.raises(LossmaskError, match=message):
            validate_record(broken(change), WS)


def test_jsonl_round_trip(tmp_path):
    path = tmp_path / "agentic.jsonl"
    assert write_jsonl(AGENTIC[:40], path) == 40
    episodes = list(read_episodes(path))
    assert all(isinstance(e, Conversation) for e in episodes)
    assert [e.meta["_meta"] for e in episodes] == [r["_meta"] for r in AGENTIC[:40]]


# ---- a user's own workspace ----------------------------------------------------------------------


def user_workspace(tmp_path, facts: list[dict]) -> Workspace:
    (tmp_path / "ops").mkdir()
    (tmp_path / "ops" / "kettle.md").write_text(
        "# Kitchen Rules\n\nThe kettle is descaled every Tuesday by Morgan Lee. Milk goes in the left fridge.\n",
        encoding="utf-8",
    )
    (tmp_path / "ops" / "garage.md").write_text(
        "# Garage\n\nThe garage door code is 4711. Bikes are parked along the north wall.\n", encoding="utf-8"
    )
    documents = {"ops/kettle": {"language": "en", "topic": "kitchen rules", "summary": "Rules for the kitchen."},
                 "ops/garage": {"language": "en"}}
    (tmp_path / "facts.json").write_text(json.dumps({"documents": documents, "facts": facts}), encoding="utf-8")
    return Workspace(tmp_path)


KETTLE = {"doc": "ops/kettle", "kind": "person", "subject": "the person who descales the kettle",
          "value": "Morgan Lee", "answer": "Morgan Lee descales the kettle every Tuesday.", "query": "kettle descaled"}
GARAGE = {"doc": "ops/garage", "kind": "value", "subject": "the garage door code", "value": "4711",
          "answer": "The garage door code is 4711."}


def test_generators_run_on_a_user_workspace(tmp_path):
    ws = user_workspace(tmp_path, [KETTLE, GARAGE])
    assert [is_held_out_fact(f) for f in load_catalogue(ws).facts] == [False, False]
    records = generate_toolcall(20, seed=0, languages=("en",), workspace=tmp_path)
    tool_records = [r for r in records if r["_meta"]["pattern"] != "NO_TOOL"]
    assert tool_records and {r["_meta"]["cited_docs"][0] for r in tool_records} <= {"ops/kettle", "ops/garage"}
    for record in tool_records:
        for name, arguments, result in calls(record):
            assert result == ws.call(name, arguments)
    with pytest.raises(LossmaskError, match="no training items for '.*' in 'de'"):
        generate_agentic(25, seed=0, languages=("de",), workspace=ws)


@pytest.mark.parametrize(
    "fact, message",
    [
        ({**GARAGE, "value": "1234", "answer": "The code is 1234."},
         r"facts\[0\]\): no sentence of ops/garage contains"),
        ({**GARAGE, "answer": "It is secret."}, r"the answer must contain the value '4711'"),
        ({**GARAGE, "kind": "colour"}, r"kind 'colour' is not one of"),
        ({**GARAGE, "doc": "ops/nope"}, r"document 'ops/nope' has no entry"),
        ({**GARAGE, "query": "bicycle"}, r"searching 'bicycle' does not return ops/garage"),
    ],
)
def test_bad_facts_files_are_clear_errors(tmp_path, fact, message):
    ws = user_workspace(tmp_path, [fact])
    with pytest.raises(LossmaskError, match=message):
        load_catalogue(ws)


def test_missing_facts_file_and_bad_arguments(tmp_path):
    (tmp_path / "a.md").write_text("# A\n\nText.\n", encoding="utf-8")
    with pytest.raises(LossmaskError, match="facts.json not found"):
        generate_agentic(5, seed=0, workspace=tmp_path)
    with pytest.raises(LossmaskError, match="non-negative"):
        generate_toolcall(-1, seed=0)
    with pytest.raises(LossmaskError, match="languages must be"):
        generate_agentic(5, seed=0, languages=("fr",))
