"""Exact text and spans of the text, instruction and myPT renderers, plus myPT tokens on a real tokenizer."""
from __future__ import annotations

import json

import pytest

from lossmask.episode import Conversation, MarkedText, Message, Replay, Source, TextPair
from lossmask.errors import EpisodeError, LossmaskError
from lossmask.mypt_tokens import MYPT_TOKENS, add_mypt_tokens, add_tokens_cli
from lossmask.render.base import Label, Rendered
from lossmask.render.instruction import InstructionRenderer
from lossmask.render.mypt import DEFAULT_WEIGHT_PROFILE, MyptRenderer, load_weight_profile
from lossmask.render.text import render_text_episode
from lossmask.tokenizer import TokenizerInfo, load_tokenizer
from tests.tokenizers_cache import tokenizer_dir

SRC = Source("data.jsonl", 7)
PLAIN = TokenizerInfo(bos=None, eos="<|end|>", special_tokens=("<|end|>",), added_tokens=("<|end|>",))
WITH_BOS = TokenizerInfo(bos="<s>", eos="</s>", special_tokens=("</s>", "<s>"), added_tokens=("</s>", "<s>"))
NO_EOS = TokenizerInfo(bos=None, eos=None, special_tokens=(), added_tokens=())


def one(rendered: list[Rendered]) -> Rendered:
    """The single sequence, after checking the span invariants every renderer promises."""
    assert len(rendered) == 1
    r = rendered[0]
    assert r.source == SRC
    previous_end = 0
    for span in r.spans:
        assert previous_end <= span.start < span.end <= len(r.text)
        previous_end = span.end
    return r


def trained(r: Rendered) -> list[tuple[str, str, float]]:
    return [(r.text[s.start : s.end], s.label.name, s.weight) for s in r.spans if s.weight > 0]


def labelled(r: Rendered) -> list[tuple[str, str]]:
    return [(r.text[s.start : s.end], s.label.name) for s in r.spans if s.weight == 0]


def conv(*messages: Message, system: str | None = None, tools=None) -> Conversation:
    return Conversation(tuple(messages), SRC, system=system, tools=tools)


# --- text episodes -------------------------------------------------------------------------------


def test_replay_trains_every_character_after_bos_and_adds_no_eos():
    r = one(render_text_episode(Replay("Once upon a time.", SRC), WITH_BOS, None))
    assert r.text == "<s>Once upon a time."
    assert trained(r) == [("Once upon a time.", "TEXT", 1.0)]
    assert r.turn_ends == [len(r.text)]
    r = one(render_text_episode(Replay("abc", SRC), PLAIN, None))
    assert r.text == "abc" and trained(r) == [("abc", "TEXT", 1.0)]


def test_text_pair_appends_trained_eos_once():
    r = one(render_text_episode(TextPair("Q: 2+2?\nA:", " 4", SRC), WITH_BOS, None))
    assert r.text == "<s>Q: 2+2?\nA: 4</s>"
    assert labelled(r) == [("Q: 2+2?\nA:", "PROMPT")]
    assert trained(r) == [(" 4", "TEXT", 1.0), ("</s>", "STOP", 1.0)]
    assert r.turn_ends == [len(r.text)]
    r = one(render_text_episode(TextPair("Q:", " 4</s>", SRC), WITH_BOS, None))
    assert r.text == "<s>Q: 4</s>"
    assert trained(r) == [(" 4", "TEXT", 1.0), ("</s>", "STOP", 1.0)]
    r = one(render_text_episode(TextPair("Q:", " 4", SRC), NO_EOS, None))
    assert r.text == "Q: 4" and trained(r) == [(" 4", "TEXT", 1.0)]


def test_marked_text_trains_after_first_marker_and_end_as_stop():
    text = "Instruction: say hi\nResponse: hi\nResponse: again\nEND\n"
    r = one(render_text_episode(MarkedText(text, SRC), PLAIN, "\nResponse:", "\nEND"))
    assert r.text == text
    assert labelled(r) == [("Instruction: say hi\nResponse:", "PROMPT")]
    assert trained(r) == [(" hi\nResponse: again", "ASSISTANT", 1.0), ("\nEND", "STOP", 1.0)]
    assert r.turn_ends == [len(text) - 1]
    assert r.notes == []


def test_marked_text_without_end_marker_trains_to_the_end():
    r = one(render_text_episode(MarkedText("<s>Q ### A: yes\n", SRC), PLAIN, "### A:", "\nEND"))
    assert trained(r) == [(" yes\n", "ASSISTANT", 1.0)]
    assert r.notes == ["no_end_marker"]
    r = one(render_text_episode(MarkedText("Q ### A: yes", SRC), WITH_BOS, "### A:"))
    assert r.text == "<s>Q ### A: yes" and trained(r) == [(" yes", "ASSISTANT", 1.0)] and r.notes == []


def test_marked_text_missing_marker_errors_name_the_marker():
    with pytest.raises(EpisodeError) as err:
        render_text_episode(MarkedText("no marker here", SRC), PLAIN, "\nResponse:")
    assert err.value.reason == "missing_marker"
    assert "'\\nResponse:'" in err.value.message and "'\\nResponse:'" in err.value.hint
    with pytest.raises(EpisodeError) as err:
        render_text_episode(MarkedText("text", SRC), PLAIN, None)
    assert err.value.reason == "missing_marker" and "--response-marker" in err.value.hint


# --- instruction format --------------------------------------------------------------------------


def test_instruction_multi_turn_with_system_and_context():
    episode = conv(
        Message("user", "What is 2+2?", context="Math facts."),
        Message("assistant", "It is 4."),
        Message("user", "Thanks"),
        Message("assistant", "You're welcome!"),
        system="Be brief.",
    )
    r = one(InstructionRenderer(WITH_BOS).render(episode))
    assert r.text == (
        "<s>Be brief.\nInstruction: Math facts.\nWhat is 2+2?\nResponse: It is 4.\nEND\n"
        "Instruction: Thanks\nResponse: You're welcome!\nEND\n"
    )
    assert trained(r) == [
        (" It is 4.", "ASSISTANT", 1.0),
        ("\nEND", "STOP", 1.0),
        (" You're welcome!", "ASSISTANT", 1.0),
        ("\nEND", "STOP", 1.0),
    ]
    assert labelled(r) == [
        ("Be brief.", "SYSTEM"),
        ("Math facts.", "CONTEXT"),
        ("What is 2+2?", "USER"),
        ("Thanks", "USER"),
    ]
    assert [r.text[:end][-4:] for end in r.turn_ends] == ["\nEND", "\nEND"]
    assert len(r.turn_ends) == 2 and r.turn_ends[-1] == len(r.text) - 1


def test_instruction_train_false_and_weight():
    episode = conv(
        Message("user", "a"),
        Message("assistant", "b", train=False),
        Message("user", "c"),
        Message("assistant", "d", weight=0.5),
    )
    renderer = InstructionRenderer(PLAIN, instruction="### Q:", response="### A:", separator="\n")
    r = one(renderer.render(episode))
    assert r.text == "### Q: a\n### A: b\nEND\n### Q: c\n### A: d\nEND\n"
    assert trained(r) == [(" d", "ASSISTANT", 0.5), ("\nEND", "STOP", 0.5)]
    assert ("\nEND", "STOP") in labelled(r) and (" b", "ASSISTANT") in labelled(r)
    assert r.turn_ends == [len(r.text) - 1]
    assert renderer.stop_strings == ("\nEND",)


@pytest.mark.parametrize(
    "message, field",
    [
        (Message("assistant", "x", think="hmm"), "messages[1].think"),
        (Message("assistant", "x", cite="src"), "messages[1].cite"),
        (Message("assistant_toolcall", name="f", arguments={}), "messages[1].role"),
        (Message("toolresult", "out", name="f"), "messages[1].role"),
    ],
)
def test_instruction_rejects_what_it_cannot_show(message, field):
    with pytest.raises(EpisodeError) as err:
        InstructionRenderer(PLAIN).render(conv(Message("user", "q"), message))
    assert err.value.reason == "unsupported_message" and err.value.field == field


def test_instruction_rejects_stop_string_in_content_but_not_lookalikes():
    with pytest.raises(EpisodeError) as err:
        InstructionRenderer(PLAIN).render(conv(Message("user", "q"), Message("assistant", "a\nEND b")))
    assert err.value.reason == "stop_string_in_content" and err.value.field == "messages[1].content"
    r = one(InstructionRenderer(PLAIN).render(conv(Message("user", "q"), Message("assistant", "WEEKEND"))))
    assert trained(r) == [(" WEEKEND", "ASSISTANT", 1.0), ("\nEND", "STOP", 1.0)]


def test_instruction_delegates_text_episodes_with_its_markers():
    text = "Instruction: hi\nResponse: hello\nEND\n"
    r = one(InstructionRenderer(PLAIN).render(MarkedText(text, SRC)))
    assert r.text == text
    assert trained(r) == [(" hello", "ASSISTANT", 1.0), ("\nEND", "STOP", 1.0)]
    r = one(InstructionRenderer(PLAIN).render(TextPair("p", "c", SRC)))
    assert r.text == "pc<|end|>"


def test_instruction_trained_spans_fall_on_token_boundaries(llama2):
    info = TokenizerInfo.of(llama2)
    episode = conv(Message("user", "Name a color."), Message("assistant", "Blue, mostly."))
    r = one(InstructionRenderer(info).render(episode))
    assert r.text == "<s>Instruction: Name a color.\nResponse: Blue, mostly.\nEND\n"
    enc = llama2(r.text, add_special_tokens=False, return_offsets_mapping=True)
    assert enc["input_ids"][0] == llama2.bos_token_id
    inside = []
    for start, end in enc["offset_mapping"]:
        for span in r.trained_spans:
            if start < span.end and span.start < end:
                assert span.start <= start and end <= span.end, (start, end, span)
                inside.append(r.text[start:end])
    assert "".join(inside) == " Blue, mostly.\nEND"


# --- myPT format ---------------------------------------------------------------------------------


def test_mypt_multi_turn_with_system_and_contexts():
    episode = conv(
        Message("user", "Q1", context="C1"),
        Message("assistant", "A1", context="injected"),
        Message("user", "Q2"),
        Message("assistant", "A2"),
        system="S",
    )
    r = one(MyptRenderer(WITH_BOS).render(episode))
    assert r.text == (
        "<s><myPT_system>S</myPT_system>"
        "<myPT_user><myPT_user_context>C1</myPT_user_context>Q1</myPT_user>"
        "<myPT_assistant><myPT_assistant_context>injected</myPT_assistant_context>A1</myPT_assistant><myPT_eot>"
        "<myPT_user>Q2</myPT_user><myPT_assistant>A2</myPT_assistant><myPT_eot>"
    )
    assert trained(r) == [
        ("A1", "ASSISTANT", 1.0),
        ("</myPT_assistant>", "STOP", 1.0),
        ("<myPT_eot>", "STOP", 1.0),
        ("A2", "ASSISTANT", 1.0),
        ("</myPT_assistant>", "STOP", 1.0),
        ("<myPT_eot>", "STOP", 1.0),
    ]
    assert labelled(r) == [
        ("S", "SYSTEM"),
        ("C1", "CONTEXT"),
        ("Q1", "USER"),
        ("injected", "CONTEXT"),
        ("Q2", "USER"),
    ]
    eot = r.text.index("<myPT_eot>") + len("<myPT_eot>")
    assert r.turn_ends == [eot, len(r.text)]


def test_mypt_think_and_cite_are_trained_with_their_tags():
    episode = conv(Message("user", "q"), Message("assistant", "A", think="T", cite="R"))
    r = one(MyptRenderer(PLAIN).render(episode))
    assert r.text == (
        "<myPT_user>q</myPT_user><myPT_assistant><myPT_think>T</myPT_think>A<myPT_cite>R</myPT_cite>"
        "</myPT_assistant><myPT_eot>"
    )
    assert trained(r) == [
        ("<myPT_think>", "THINK", 1.0),
        ("T", "THINK", 1.0),
        ("</myPT_think>", "THINK", 1.0),
        ("A", "ASSISTANT", 1.0),
        ("<myPT_cite>", "CITE", 1.0),
        ("R", "CITE", 1.0),
        ("</myPT_cite>", "CITE", 1.0),
        ("</myPT_assistant>", "STOP", 1.0),
        ("<myPT_eot>", "STOP", 1.0),
    ]


def test_mypt_tool_call_shares_the_block_and_has_no_eot():
    episode = conv(
        Message("user", "weather?"),
        Message("assistant", "Checking."),
        Message("assistant_toolcall", name="get_weather", arguments={"city": "Zürich", "unit": "C"}),
        Message("toolresult", '{"temp": 3}', name="get_weather"),
        Message("assistant_toolcall", name="log", arguments=None),
        Message("toolresult", "ok", name="log"),
        Message("assistant", "3 °C."),
        tools=({"name": "get_weather"},),
    )
    r = one(MyptRenderer(PLAIN).render(episode))
    call = '{"name": "get_weather", "arguments": {"city": "Zürich", "unit": "C"}}'
    assert r.text == (
        "<myPT_user>weather?</myPT_user>"
        f"<myPT_assistant>Checking.<myPT_toolcall>{call}</myPT_toolcall></myPT_assistant>"
        '<myPT_toolresult>{"temp": 3}</myPT_toolresult>'
        '<myPT_assistant><myPT_toolcall>{"name": "log", "arguments": {}}</myPT_toolcall></myPT_assistant>'
        "<myPT_toolresult>ok</myPT_toolresult>"
        "<myPT_assistant>3 °C.</myPT_assistant><myPT_eot>"
    )
    assert [t for t, _, _ in trained(r)] == [
        "Checking.",
        "<myPT_toolcall>",
        call,
        "</myPT_toolcall>",
        "</myPT_assistant>",
        "<myPT_toolcall>",
        '{"name": "log", "arguments": {}}',
        "</myPT_toolcall>",
        "</myPT_assistant>",
        "3 °C.",
        "</myPT_assistant>",
        "<myPT_eot>",
    ]
    assert {label for _, label, _ in trained(r)} == {"ASSISTANT", "TOOLCALL", "STOP"}
    assert labelled(r) == [("weather?", "USER"), ('{"temp": 3}', "TOOLRESULT"), ("ok", "TOOLRESULT")]
    assert r.text.count("<myPT_eot>") == 1
    assert [r.text[:end][-17:] for end in r.turn_ends[:2]] == ["</myPT_assistant>"] * 2
    assert r.turn_ends[2] == len(r.text)
    assert r.notes == ["tools_not_rendered"]


def test_mypt_tool_call_without_name_is_an_episode_error():
    with pytest.raises(EpisodeError) as err:
        MyptRenderer(PLAIN).render(conv(Message("user", "q"), Message("assistant_toolcall", arguments={})))
    assert err.value.reason == "missing_field" and err.value.field == "messages[1].name"


def test_mypt_train_false_and_message_weight_scale_the_profile():
    episode = conv(
        Message("user", "q"),
        Message("assistant", "no", train=False),
        Message("user", "q2"),
        Message("assistant", "yes", think="t", weight=0.5),
    )
    r = one(MyptRenderer(PLAIN, weighted=True).render(episode))
    assert trained(r) == [
        ("<myPT_think>", "THINK", 0.75),
        ("t", "THINK", 0.5),
        ("</myPT_think>", "THINK", 0.75),
        ("yes", "ASSISTANT", 0.5),
        ("</myPT_assistant>", "STOP", 1.0),
        ("<myPT_eot>", "STOP", 1.0),
    ]
    assert labelled(r)[1:4] == [("no", "ASSISTANT"), ("</myPT_assistant>", "STOP"), ("<myPT_eot>", "STOP")]
    assert r.turn_ends == [len(r.text)]


def test_mypt_weighted_default_profile():
    episode = conv(
        Message("user", "q"),
        Message("assistant", "A", think="T", cite="R"),
        Message("assistant_toolcall", name="f", arguments={"x": 1}),
    )
    r = one(MyptRenderer(PLAIN, weighted=True).render(episode))
    assert [(t, w) for t, _, w in trained(r)] == [
        ("<myPT_think>", 1.5),
        ("T", 1.0),
        ("</myPT_think>", 1.5),
        ("A", 1.0),
        ("<myPT_cite>", 1.5),
        ("R", 1.0),
        ("</myPT_cite>", 1.5),
        ("<myPT_toolcall>", 2.0),
        ('{"name": "f", "arguments": {"x": 1}}', 1.0),
        ("</myPT_toolcall>", 2.0),
        ("</myPT_assistant>", 2.0),
    ]
    assert "<myPT_eot>" not in r.text


def test_mypt_weight_profile_overrides_and_validation(tmp_path):
    episode = conv(Message("user", "q"), Message("assistant", "A"))
    r = one(MyptRenderer(PLAIN, weight_profile={"eot": 3, "assistant": 0.25}).render(episode))
    assert [(t, w) for t, _, w in trained(r)] == [("A", 0.25), ("</myPT_assistant>", 2.0), ("<myPT_eot>", 3.0)]
    with pytest.raises(LossmaskError, match="'system'"):
        MyptRenderer(PLAIN, weight_profile={"system": 0.0})
    with pytest.raises(LossmaskError, match="'eot'"):
        MyptRenderer(PLAIN, weight_profile={"eot": -1})
    path = tmp_path / "profile.json"
    path.write_text(json.dumps({"think_tags": 4}))
    assert load_weight_profile(path) == {**DEFAULT_WEIGHT_PROFILE, "think_tags": 4.0}
    path.write_text("{not json")
    with pytest.raises(LossmaskError, match="profile.json"):
        load_weight_profile(path)


def test_mypt_delegates_text_episodes():
    r = one(MyptRenderer(WITH_BOS).render(TextPair("p", "c", SRC)))
    assert r.text == "<s>pc</s>" and trained(r) == [("c", "TEXT", 1.0), ("</s>", "STOP", 1.0)]
    r = one(MyptRenderer(PLAIN, response_marker="<myPT_assistant>").render(MarkedText("u<myPT_assistant>a", SRC)))
    assert trained(r) == [("a", "ASSISTANT", 1.0)]


# --- myPT tokens on a real tokenizer -------------------------------------------------------------


@pytest.fixture(scope="module")
def llama2_mypt():
    """A fresh llama2 tokenizer with the myPT tokens (the session fixture stays untouched)."""
    tok = load_tokenizer(str(tokenizer_dir("llama2")))
    add_mypt_tokens(tok)
    return tok


def test_add_mypt_tokens_one_id_per_tag_and_padded_vocab(llama2, llama2_mypt):
    assert len(MYPT_TOKENS) == 19 and len(set(MYPT_TOKENS)) == 19
    assert len(llama2_mypt) == 32064 and len(llama2_mypt) % 64 == 0
    ids = [llama2_mypt.encode(tag, add_special_tokens=False) for tag in MYPT_TOKENS]
    assert all(len(i) == 1 for i in ids)
    assert sorted(i[0] for i in ids) == list(range(len(llama2), len(llama2) + 19))
    assert add_mypt_tokens(llama2_mypt) == 32064
    assert len(llama2) == 32000
    tagged = llama2_mypt.encode("<myPT_think>x</myPT_think>", add_special_tokens=False)
    assert llama2_mypt.decode(tagged, skip_special_tokens=True).strip() == "x"


def test_rendered_mypt_stop_tags_are_single_trained_tokens(llama2_mypt):
    info = TokenizerInfo.of(llama2_mypt)
    episode = conv(
        Message("user", "Hi"),
        Message("assistant", "Hello!", think="greet"),
        Message("user", "Bye"),
        Message("assistant", "See you."),
        system="Friendly.",
    )
    r = one(MyptRenderer(info, weighted=True).render(episode))
    assert r.text.startswith("<s><myPT_system>")
    enc = llama2_mypt(r.text, add_special_tokens=False, return_offsets_mapping=True)
    close, eot = llama2_mypt.convert_tokens_to_ids(["</myPT_assistant>", "<myPT_eot>"])
    found = []
    for token_id, (start, end) in zip(enc["input_ids"], enc["offset_mapping"]):
        if token_id in (close, eot):
            span = next(s for s in r.spans if s.start <= start and end <= s.end)
            assert r.text[start:end] == r.text[span.start : span.end]
            assert span.label == Label.STOP and span.weight == 2.0
            found.append(r.text[start:end])
    assert found == ["</myPT_assistant>", "<myPT_eot>"] * 2
    assert enc["input_ids"].count(close) == 2 and enc["input_ids"].count(eot) == 2


def test_add_tokens_cli_saves_atomically_and_refuses_to_clobber(tmp_path):
    out = tmp_path / "tok"
    result = add_tokens_cli(str(tokenizer_dir("llama2")), out)
    assert (result.before, result.after, result.out_dir) == (32000, 32064, out)
    reloaded = load_tokenizer(str(out))
    assert len(reloaded) == 32064
    eot = reloaded.convert_tokens_to_ids("<myPT_eot>")
    assert reloaded.encode("<myPT_eot>", add_special_tokens=False) == [eot]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tok"]
    with pytest.raises(LossmaskError, match="--overwrite"):
        add_tokens_cli(str(tokenizer_dir("llama2")), out)
    (out / "stale.txt").write_text("x")
    add_tokens_cli(str(out), out, overwrite=True)
    assert not (out / "stale.txt").exists() and len(load_tokenizer(str(out))) == 32064
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tok"]
