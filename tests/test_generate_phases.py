"""Phase 2, 3, 4 and 1b generators, system prompt tiers and the registry: answers checked against the prompts."""
from __future__ import annotations

import re
from collections import Counter
from itertools import pairwise

import pytest

from lossmask.episode import Conversation, Replay, Source
from lossmask.errors import LossmaskError
from lossmask.generate import GENERATORS, PHASES, generate_phase, resolve_phase
from lossmask.generate.chat import fact_by_key, generate_chat
from lossmask.generate.format_lock import SYSTEM_PROMPTS, generate_format_lock, is_held_out, write_jsonl
from lossmask.generate.longctx import CHARS_PER_TOKEN, generate_longctx
from lossmask.generate.multiturn import generate_multiturn
from lossmask.generate.operators import OPERATORS, PAYLOAD_KINDS, generate_operators
from lossmask.generate.prompts import MEDIUM_SYSTEM_PROMPTS, system_prompt
from lossmask.mask import Masker
from lossmask.mypt_tokens import add_mypt_tokens
from lossmask.render.base import Label
from lossmask.render.mypt import MyptRenderer
from lossmask.sources import parse_record, read_episodes
from lossmask.tokenizer import TokenizerInfo, load_tokenizer
from tests.tokenizers_cache import tokenizer_dir

OPS, OPS_H = generate_operators(600, 0), generate_operators(300, 0, held_out=True)
CHAT, CHAT_H = generate_chat(1500, 0), generate_chat(400, 0, held_out=True)
MULTI, MULTI_H = generate_multiturn(1000, 0), generate_multiturn(300, 0, held_out=True)
LONG, LONG_H = generate_longctx(60, 0), generate_longctx(20, 0, held_out=True)
MINE = {"operators": generate_operators, "chat": generate_chat, "multiturn": generate_multiturn,
        "longctx": generate_longctx}
ALL = {"operators": OPS + OPS_H, "chat": CHAT + CHAT_H, "multiturn": MULTI + MULTI_H, "longctx": LONG + LONG_H}
SENTENCE = re.compile(r"(?<=[.!?])\s+")


def users(record: dict) -> list[str]:
    return [m["content"] for m in record["messages"] if m["role"] == "user"]


def answer(record: dict) -> str:
    return record["messages"][-1]["content"]


def n_sentences(text: str) -> int:
    return len([s for s in SENTENCE.split(text.strip()) if s])


def block(context: str, doc_id: str) -> str:
    """The text of one ``[doc:ID] ...`` block of a context."""
    (found,) = [b for b in context.split("\n\n") if b.startswith(f"[{doc_id}] ")]
    return found


@pytest.fixture(scope="module")
def mypt_tokenizer():
    tok = load_tokenizer(str(tokenizer_dir("llama2")))
    add_mypt_tokens(tok)
    return tok


# --- shared behaviour --------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(MINE))
def test_same_seed_same_records_other_seed_other_records(name):
    generate = MINE[name]
    n = 12 if name == "longctx" else 60
    assert generate(n, seed=5) == generate(n, seed=5)
    assert generate(n, seed=6) != generate(n, seed=5)
    assert generate(n, seed=5, held_out=True) != generate(n, seed=5)
    assert generate(0, seed=5) == []


@pytest.mark.parametrize("name", sorted(MINE))
def test_bad_requests_are_clear_errors(name):
    generate = MINE[name]
    with pytest.raises(LossmaskError, match="n must be a non-negative integer"):
        generate(-1, seed=0)
    with pytest.raises(LossmaskError, match="languages must be a non-empty selection of en, de"):
        generate(3, seed=0, languages=("en", "fr"))
    assert {r["language"] for r in generate(9, seed=0, languages=("de",))} == {"de"}


@pytest.mark.parametrize("name", ["chat", "multiturn", "longctx"])
def test_languages_take_turns(name):
    records = ALL[name]
    train = [r for r in records if r["_meta"]["split"] == "train"]
    assert [r["language"] for r in train[:6]] == ["en", "de"] * 3
    counts = Counter(r["language"] for r in train)
    assert abs(counts["en"] - counts["de"]) <= 1


@pytest.mark.parametrize("name", sorted(MINE))
def test_meta_names_generator_phase_split_and_language(name):
    phase = {v: k for k, v in PHASES.items()}[name]
    for records, split in ((ALL[name][:50], "train"), (ALL[name][-10:], "held_out")):
        for r in records:
            meta = r["_meta"]
            assert (meta["generator"], meta["phase"], meta["split"]) == (name, phase, split)
            assert meta["language"] == r["language"] in ("en", "de")


@pytest.mark.parametrize("name", sorted(MINE))
def test_every_record_parses_renders_and_masks_exactly(name, mypt_tokenizer):
    renderer = MyptRenderer(TokenizerInfo.of(mypt_tokenizer))
    masker = Masker(mypt_tokenizer)
    records = ALL[name]
    episodes = [parse_record(r, Source(f"{name}.jsonl", i + 1), "auto") for i, r in enumerate(records)]
    rendered = [renderer.render(e)[0] for e in episodes]
    for r, episode, out in zip(records, episodes, rendered):
        assert "<myPT" not in str(r)  # no tag inside any content: the tags are the format's alone
        if r.get("_replay"):
            assert isinstance(episode, Replay) and out.text == "<s>" + r["text"]  # llama2 writes BOS
            continue
        assert isinstance(episode, Conversation) and episode.language == r["language"]
        final = episode.messages[-1]
        assert final.role == "assistant" and final.content == answer(r) == answer(r).strip() != ""
        trained = "".join(out.text[s.start : s.end] for s in out.spans if s.weight > 0)
        cite = "" if final.cite is None else f"<myPT_cite>{final.cite}</myPT_cite>"
        assert trained.endswith(f"{answer(r)}{cite}</myPT_assistant><myPT_eot>")
        assert sum(1 for s in out.spans if s.label == Label.STOP) == 2 * len(users(r))
    sample = rendered[:: max(1, len(rendered) // 40)]
    examples = masker.mask(sample)
    assert all(not isinstance(e, Exception) for e in examples), [e for e in examples if isinstance(e, Exception)]
    eot = mypt_tokenizer.convert_tokens_to_ids("<myPT_eot>")
    for e, r in zip(examples, sample):
        trained_ids = e.input_ids[e.weights > 0].tolist()
        if "</myPT_assistant>" in r.text:
            assert trained_ids[-1] == eot and e.input_ids.tolist().count(eot) == trained_ids.count(eot)


def test_generated_files_read_back_without_problems(tmp_path):
    path = tmp_path / "mixed.jsonl"
    records = OPS[:20] + CHAT[:20] + MULTI[:20] + LONG[:6]
    assert write_jsonl(records, path) == len(records)
    items = list(read_episodes(path))
    assert len(items) == len(records) and all(isinstance(i, (Conversation, Replay)) for i in items)


# --- system prompts ----------------------------------------------------------------------------------


def test_system_prompt_tiers(qwen3, llama3):
    import random

    rng = random.Random(0)
    assert {system_prompt("short", "de", rng) for _ in range(60)} == set(SYSTEM_PROMPTS["de"])
    assert {system_prompt("medium", "en", rng) for _ in range(80)} == set(MEDIUM_SYSTEM_PROMPTS["en"])
    for tok in (qwen3, llama3):
        for lang, prompts in MEDIUM_SYSTEM_PROMPTS.items():
            for p in prompts:
                assert 15 <= len(tok.encode(p, add_special_tokens=False)) <= 20, (lang, p)
    with pytest.raises(LossmaskError, match="unknown system prompt tier 'long'; choose one of short, medium, tools"):
        system_prompt("long", "en", rng)
    with pytest.raises(LossmaskError, match="no medium system prompts in language 'fr'"):
        system_prompt("medium", "fr", rng)
    assert {r["system"] for r in OPS} <= set(SYSTEM_PROMPTS["en"] + SYSTEM_PROMPTS["de"])
    medium = set(MEDIUM_SYSTEM_PROMPTS["en"] + MEDIUM_SYSTEM_PROMPTS["de"])
    assert {r["system"] for r in MULTI} <= medium
    assert {r["system"] for r in CHAT if r["_meta"]["system_rule"] is None} <= medium


def test_tool_tier_comes_from_the_tools_module():
    import random

    from lossmask.generate import prompts, tools

    assert prompts.TOOL_SYSTEM_PROMPTS is tools.TOOL_SYSTEM_PROMPTS
    assert system_prompt("tools", "en", random.Random(0)) in tools.TOOL_SYSTEM_PROMPTS["en"]


# --- phase 2: operators ------------------------------------------------------------------------------

_WRAP_WORDS = (("curly", "{}"), ("geschweift", "{}"), ("parenthes", "()"), ("runde", "()"), ("quotes", '""'),
               ("Anführungszeichen", '""'), ("bracket", "[]"), ("eckige", "[]"))


def expected_from_prompt(operator: str, prompt: str) -> str:
    """The operator's answer worked out from the instruction text alone."""
    if operator == "COPY":
        return prompt.split(": ", 1)[1]
    if operator == "WRAP":
        instruction, payload = prompt.split(": ", 1)
        left, right = next(pair for word, pair in _WRAP_WORDS if word in instruction)
        return left + payload + right
    if "\n" in prompt:
        return prompt.split("\n")[-1].split(": ", 1)[1]
    quoted = re.findall(r'"([^"]*)"', prompt)
    if quoted:
        (only,) = quoted
        return only
    (number,) = re.findall(r"\d+", prompt)
    return number


def test_operator_answers_are_the_transformation_of_the_prompt():
    for r in OPS + OPS_H:
        meta = r["_meta"]
        (prompt,) = users(r)
        assert answer(r) == meta["expected"] == expected_from_prompt(meta["operator"], prompt), r
        assert meta["payload"] in prompt
        assert r["messages"][0]["role"] == "user" and len(r["messages"]) == 2
    counts = Counter((r["_meta"]["operator"], r["_meta"]["variant"]) for r in OPS)
    assert {op for op, _ in counts} == set(OPERATORS)
    assert {v for op, v in counts if op == "EXTRACT"} == {"number", "quotes", "colon"}
    assert {v for op, v in counts if op == "WRAP"} == {"square", "round", "quotes", "curly"}
    assert {r["_meta"]["payload_kind"] for r in OPS} == set(PAYLOAD_KINDS)


def test_operator_groups_contrast_one_payload_under_all_operators():
    for start in range(0, len(OPS), 3):
        group = OPS[start : start + 3]
        assert len({r["_meta"]["group"] for r in group}) == 1
        assert len({r["_meta"]["payload"] for r in group}) == 1
        assert len({r["language"] for r in group}) == 1
        assert sorted(r["_meta"]["operator"] for r in group) == sorted(OPERATORS)
    assert [OPS[i]["language"] for i in (0, 3, 6, 9)] == ["en", "de", "en", "de"]
    assert len(generate_operators(7, 1)) == 7


def test_operator_held_out_payloads_are_never_trained():
    train = {r["_meta"]["payload"] for r in generate_operators(3000, 1)}
    held = {r["_meta"]["payload"] for r in OPS_H}
    assert not train & held
    assert all(is_held_out(p) for p in held) and not any(is_held_out(p) for p in train)
    assert {r["_meta"]["split"] for r in OPS_H} == {"held_out"}


# --- phase 3: chat -----------------------------------------------------------------------------------


def test_chat_knowledge_answers_and_anti_echo_come_from_the_fact():
    for r in CHAT + CHAT_H:
        meta, lang = r["_meta"], r["language"]
        (prompt,) = users(r)
        if meta["pattern"] == "knowledge":
            fact = fact_by_key(meta["fact"])
            assert prompt in fact.questions[lang] and answer(r) == fact.answer(lang)
        elif meta["pattern"] == "anti_echo":
            assert answer(r) == fact_by_key(meta["fact"]).answer(lang) and answer(r) not in prompt
            assert any(prompt.endswith(q) for q in fact_by_key(meta["fact"]).questions[lang])
        elif meta["pattern"] == "echo":
            assert prompt.split(": ", 1)[1] == answer(r)
        if meta["system_rule"] is None:
            assert 1 <= n_sentences(answer(r)) <= 3 and meta["expected_language"] == lang


def test_chat_answers_obey_the_system_rule():
    rules = Counter()
    for r in CHAT + CHAT_H:
        meta, lang, system = r["_meta"], r["language"], r["system"]
        rule = meta["system_rule"]
        if rule is None:
            continue
        rules[rule] += 1
        fact = fact_by_key(meta["fact"])
        if rule == "one_sentence":
            assert n_sentences(answer(r)) == 1 < n_sentences(fact.answer(lang))
            assert answer(r) == fact.sentences[lang][0]
            assert any(words in system for words in ("one sentence", "single sentence", "einem Satz"))
        elif rule == "start_with":
            prefix = meta["required_prefix"]
            assert answer(r) == f"{prefix} {fact.answer(lang)}" and f"'{prefix}'" in system
        else:
            target = rule.removeprefix("answer_in_")
            assert meta["expected_language"] == target and answer(r) == fact.answer(target)
            assert {"en": ("English", "Englisch"), "de": ("German", "Deutsch")}[target][lang == "de"] in system
    assert set(rules) == {"one_sentence", "start_with", "answer_in_en", "answer_in_de"}
    assert any(r["_meta"]["expected_language"] != r["language"] for r in CHAT)


def test_chat_context_answers_use_and_cite_the_context():
    retrieval = [r for r in CHAT + CHAT_H if r["_meta"]["pattern"] == "retrieval"]
    thinks = 0
    for r in retrieval:
        meta = r["_meta"]
        user, reply = r["messages"]
        doc = reply["cite"]
        assert meta["has_context"] is True and meta["cited_docs"] == [doc] and doc.startswith("doc:")
        fact_block = block(user["context"], doc)
        assert meta["answer_fact"] in fact_block and meta["answer_fact"] in reply["content"]
        assert n_sentences(reply["content"]) == 1
        if "think" in reply:
            thinks += 1
            assert doc in reply["think"] and "\n" not in reply["think"]
    assert 0.25 < thinks / len(retrieval) < 0.55
    assert Counter(len(r["messages"][0]["context"].split("\n\n")) for r in retrieval).keys() == {1, 2, 3}
    for r in CHAT + CHAT_H:
        if r["_meta"]["pattern"] != "retrieval":
            assert r["_meta"]["has_context"] is False and r["_meta"]["cited_docs"] == []
            assert "context" not in r["messages"][0] and "cite" not in r["messages"][1]


def test_chat_held_out_prompts_are_never_trained():
    train = {p for r in generate_chat(4000, 1) for p in users(r)}
    held = {p for r in CHAT_H for p in users(r)}
    assert not train & held
    assert set(Counter(r["_meta"]["pattern"] for r in CHAT_H)) == set(Counter(r["_meta"]["pattern"] for r in CHAT))


# --- phase 4: multiturn ------------------------------------------------------------------------------


def test_multiturn_turns_alternate_and_are_counted():
    for r in MULTI + MULTI_H:
        roles = [m["role"] for m in r["messages"]]
        turns = r["_meta"]["turns"]
        assert roles == ["user", "assistant"] * turns and 2 <= turns <= 4
    counts = Counter((r["_meta"]["pattern"], r["_meta"]["turns"]) for r in MULTI)
    assert {t for _, t in counts} == {2, 3, 4}
    assert {p for p, _ in counts} == {"follow_up", "clarification", "topic_switch", "carry_over"}


def test_multiturn_carry_over_fact_is_needed_in_the_last_turn():
    carried = [r for r in MULTI + MULTI_H if r["_meta"]["pattern"] == "carry_over"]
    assert {r["_meta"]["carry_kind"] for r in carried} == {"name", "city", "number"}
    for r in carried:
        meta, texts = r["_meta"], users(r)
        fact = meta["carry_fact"]
        assert meta["turns"] == meta["carry_to_turn"] >= 3 and meta["carry_from_turn"] == 1
        assert re.search(rf"\b{re.escape(fact)}\b", texts[0])
        assert re.search(rf"\b{re.escape(fact)}\b", answer(r))
        assert not any(re.search(rf"\b{re.escape(fact)}\b", t) for t in texts[1:])
        if meta["carry_kind"] == "number":
            k, m, total = map(int, re.findall(r"\d+", answer(r))[-3:])
            assert k == int(fact) and k + m == total and str(m) in texts[-1]


def test_multiturn_clarification_follow_up_and_topic_switch_shapes():
    for r in MULTI + MULTI_H:
        meta = r["_meta"]
        replies = [m["content"] for m in r["messages"] if m["role"] == "assistant"]
        if meta["pattern"] == "clarification":
            assert replies[0].endswith("?") and not replies[1].endswith("?")
            assert len(users(r)[1]) < 40  # the user only names what was meant
        elif meta["pattern"] == "follow_up":
            assert len(set(replies)) == len(replies)  # every follow-up asks about something new
            assert all(len(u) < 45 for u in users(r)[1:])  # elliptical: "And what about Spain?"
        elif meta["pattern"] == "topic_switch":
            topics = meta["topics"]
            assert len(topics) == meta["turns"] and all(a != b for a, b in pairwise(topics))


def test_multiturn_held_out_conversations_are_never_trained():
    train = {tuple(users(r)) for r in generate_multiturn(3000, 1)}
    held = {tuple(users(r)) for r in MULTI_H}
    assert not train & held
    assert all(is_held_out("\n".join(u)) for u in held)


# --- phase 1b: long context --------------------------------------------------------------------------


def test_longctx_fact_is_in_the_cited_document_at_varying_positions():
    qa = [r for r in LONG + LONG_H if r["_meta"]["pattern"] == "long_qa"]
    positions = []
    for r in qa:
        meta = r["_meta"]
        user, reply = r["messages"]
        context, doc = user["context"], reply["cite"]
        assert meta["cited_docs"] == [doc] and meta["has_context"] is True
        assert meta["answer_fact"] in block(context, doc) and meta["answer_fact"] in reply["content"]
        ids = re.findall(r"^\[(doc:[^\]]+)\] ", context, flags=re.MULTILINE)
        assert len(ids) == len(set(ids)) == meta["documents"] and doc in ids
        assert meta["fact_position"] == round(context.index(f"[{doc}]") / len(context), 4)
        target = 3000 * CHARS_PER_TOKEN[r["language"]]
        assert 0.95 * target <= len(context) <= target + 600
        positions.append(meta["fact_position"])
    assert min(positions) < 0.15 and max(positions) > 0.85 and len(set(positions)) == len(positions)


def test_longctx_replay_share_length_and_held_out(qwen3):
    replay = [r for r in LONG if r.get("_replay")]
    assert 0.1 <= len(replay) / len(LONG) <= 0.5
    for r in replay:
        assert r["_meta"]["pattern"] == "replay" and "[doc:" not in r["text"]
        assert 0.45 * 3000 * CHARS_PER_TOKEN[r["language"]] <= len(r["text"]) <= 3000 * CHARS_PER_TOKEN["en"] + 600
    assert not any(r.get("_replay") for r in LONG_H)
    assert not any(r.get("_replay") for r in generate_longctx(10, 0, replay_share=0.0))
    assert all(r.get("_replay") for r in generate_longctx(10, 0, replay_share=1.0))
    for r in [r for r in LONG if not r.get("_replay")][:4]:
        tokens = len(qwen3.encode(r["messages"][0]["context"], add_special_tokens=False))
        assert 2500 <= tokens <= 3500
    short = generate_longctx(4, 0, target_tokens=500, replay_share=0.0)
    assert all(len(r["messages"][0]["context"]) < 500 * 3.6 + 600 for r in short)
    with pytest.raises(LossmaskError, match="target_tokens must be an integer >= 100"):
        generate_longctx(1, 0, target_tokens=50)
    with pytest.raises(LossmaskError, match="replay_share must be a number from 0 to 1"):
        generate_longctx(1, 0, replay_share=2)


def test_longctx_held_out_questions_are_never_trained():
    train = {users(r)[0] for r in generate_longctx(80, 1, target_tokens=200, replay_share=0.0)}
    held = {users(r)[0] for r in LONG_H}
    assert not train & held and all(is_held_out(q) for q in held)


# --- registry ----------------------------------------------------------------------------------------


def test_registry_maps_phases_to_generators():
    assert PHASES == {"1": "format_lock", "2": "operators", "3": "chat", "4": "multiturn", "5": "toolcall",
                      "6": "agentic", "1b": "longctx"}
    assert set(PHASES.values()) == set(GENERATORS) and all(callable(g) for g in GENERATORS.values())
    assert GENERATORS["operators"] is generate_operators and GENERATORS["format_lock"] is generate_format_lock
    assert resolve_phase("2") == resolve_phase(2) == resolve_phase("operators") == "operators"
    assert resolve_phase("1B") == "longctx"
    assert generate_phase("3", 10, 4) == generate_chat(10, 4)
    assert generate_phase("multiturn", 6, 4, languages=["de"], held_out=True) == generate_multiturn(
        6, 4, ("de",), held_out=True
    )
    assert generate_phase(1, 5, 2) == generate_format_lock(5, 2)
    assert generate_phase("1b", 3, 0, target_tokens=200) == generate_longctx(3, 0, target_tokens=200)


def test_registry_errors_name_the_valid_choices():
    with pytest.raises(LossmaskError) as exc:
        generate_phase("7", 1, 0)
    message = str(exc.value)
    assert message.startswith("unknown phase '7'")
    assert "1 (format_lock)" in message and "2 (operators)" in message and "1b (longctx)" in message
    with pytest.raises(LossmaskError, match=r"generator 'longctx' has no option 'target'; its options: "
                                            r"target_tokens, replay_share"):
        generate_phase("1b", 1, 0, target=10)
    with pytest.raises(LossmaskError, match=r"generator 'chat' has no option 'target_tokens'; its options: none"):
        generate_phase("chat", 1, 0, target_tokens=10)
