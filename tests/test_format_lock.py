"""Format-lock data: schema, determinism, correct answers, the held-out split, atomic JSONL."""
from __future__ import annotations

import json
import re
from collections import Counter, defaultdict

import pytest

from lossmask.episode import Conversation, Source
from lossmask.errors import LossmaskError
from lossmask.generate.format_lock import (
    HELD_OUT_EVERY,
    LANGUAGES,
    PATTERNS,
    SYSTEM_PROMPTS,
    generate_format_lock,
    is_held_out,
    prompt_space,
    record_texts,
    write_jsonl,
)
from lossmask.sources import parse_record
from lossmask.tiny_tokenizer import build_tiny_tokenizer

TRAIN = generate_format_lock(3000, seed=0)
SPACE = {lang: prompt_space(lang) for lang in LANGUAGES}


def prompt(record: dict) -> str:
    return record["messages"][0]["content"]


def answer(record: dict) -> str:
    return record["messages"][1]["content"]


def test_records_are_native_episodes_with_short_system_prompts():
    for i, record in enumerate(TRAIN[:300]):
        lang = record["language"]
        meta = record["_meta"]
        assert meta == {"generator": "format_lock", "pattern": meta["pattern"], "language": lang, "split": "train"}
        assert meta["pattern"] in PATTERNS
        assert record["system"] in SYSTEM_PROMPTS[lang]
        episode = parse_record(record, Source("format_lock.jsonl", i + 1), "native")
        assert isinstance(episode, Conversation) and episode.language == lang
        assert [m.role for m in episode.messages] == ["user", "assistant"]
        assert episode.messages[1].content == answer(record) and answer(record).strip() == answer(record)


def test_same_seed_same_records_other_seed_other_records():
    assert generate_format_lock(3000, seed=0) == TRAIN
    assert generate_format_lock(50, seed=1) != TRAIN[:50]
    assert generate_format_lock(0, seed=0) == []


def test_languages_take_turns_and_every_pattern_appears():
    assert [r["language"] for r in TRAIN[:6]] == ["en", "de", "en", "de", "en", "de"]
    counts = Counter((r["language"], r["_meta"]["pattern"]) for r in TRAIN)
    assert set(counts) == {(lang, p) for lang in LANGUAGES for p in PATTERNS}
    assert min(counts.values()) > 3000 / 16 / 2
    german = generate_format_lock(40, seed=0, languages=("de",))
    assert {r["language"] for r in german} == {"de"}
    assert all(r["system"].startswith("Du bist") for r in german)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"n": -1}, "non-negative"),
        ({"n": 2.5}, "non-negative"),
        ({"n": 5, "languages": ("en", "fr")}, "languages must be"),
        ({"n": 5, "languages": ()}, "languages must be"),
    ],
)
def test_bad_arguments_are_clear_errors(kwargs, message):
    with pytest.raises(LossmaskError, match=message):
        generate_format_lock(seed=0, **kwargs)


def test_every_prompt_has_exactly_one_answer():
    answers = defaultdict(set)
    for lang in LANGUAGES:
        for items in SPACE[lang].values():
            for p, a in items:
                answers[p].add(a)
    assert all(len(a) == 1 for a in answers.values())
    assert sum(len(items) for lang in LANGUAGES for items in SPACE[lang].values()) == len(answers)


@pytest.mark.parametrize(
    "lang, question, expected",
    [
        ("en", "What is 3 + 4?", "7"),
        ("en", "Calculate 12 times 12.", "144"),
        ("de", "Was ist 3 + 4?", "7"),
        ("de", "Rechne: 9 minus 2", "7"),
        ("en", "Say 'banana'.", "banana"),
        ("en", "Repeat: blue sky", "blue sky"),
        ("de", "Sag 'Apfel'.", "Apfel"),
        ("de", "Wiederhole: grünes Haus", "grünes Haus"),
        ("en", "Don't repeat 'banana', answer: What colour is a banana?", "yellow"),
        ("de", "Wiederhole nicht 'Banane', sondern antworte: Welche Farbe hat eine Banane?", "gelb"),
        ("en", "What is the capital of Austria?", "Vienna"),
        ("de", "Was ist die Hauptstadt von Österreich?", "Wien"),
        ("en", "What is the opposite of cold?", "hot"),
        ("de", "Was ist das Gegenteil von heiß?", "kalt"),
        ("en", "Translate 'Hund' into English.", "dog"),
        ("de", "Übersetze 'dog' ins Deutsche.", "Hund"),
        ("en", "Is 7 greater than 3?", "Yes"),
        ("de", "Ist 7 kleiner als 3?", "Nein"),
        ("en", "Is a spoon an animal?", "No"),
        ("de", "Ist eine Kuh ein Tier?", "Ja"),
    ],
)
def test_known_prompts_have_the_right_answers(lang, question, expected):
    pairs = dict(p for items in SPACE[lang].values() for p in items)
    assert pairs[question] == expected


def test_arithmetic_and_comparison_answers_are_correct():
    ops = {"+": int.__add__, "plus": int.__add__, "-": int.__sub__, "minus": int.__sub__,
           "*": int.__mul__, "times": int.__mul__, "mal": int.__mul__}
    truth = {"Yes": True, "Ja": True, "No": False, "Nein": False}
    checked = 0
    for lang in LANGUAGES:
        for p, a in SPACE[lang]["arithmetic"]:
            x, op, y = re.search(r"(\d+) (\S+) (\d+)", p).groups()
            assert int(a) == ops[op](int(x), int(y)) >= 0, p
            checked += 1
        for p, a in SPACE[lang]["yes_no"]:
            found = re.search(r"(\d+) (?:is )?(greater|less|größer|kleiner) \S+ (\d+)", p)
            if found:
                x, rel, y = int(found[1]), found[2], int(found[3])
                assert truth[a] == (x > y if rel in ("greater", "größer") else x < y), p
                checked += 1
    assert checked > 5000


def test_held_out_prompts_never_appear_in_training_whatever_the_seed():
    held = [r for seed in range(3) for r in generate_format_lock(100, seed=seed, held_out=True)]
    train = {prompt(r) for seed in range(3) for r in generate_format_lock(3000, seed=seed)}
    assert {prompt(r) for r in held}.isdisjoint(train)
    assert all(is_held_out(prompt(r)) and r["_meta"]["split"] == "held_out" for r in held)
    assert not any(is_held_out(p) for p in train)
    assert {r["language"] for r in held} == {"en", "de"}


def test_split_reserves_about_one_in_eight_of_every_pool():
    for lang in LANGUAGES:
        for pattern, items in SPACE[lang].items():
            held = sum(is_held_out(p) for p, _ in items)
            assert 0 < held < len(items), (lang, pattern)
        total = [p for items in SPACE[lang].values() for p, _ in items]
        share = sum(map(is_held_out, total)) / len(total)
        assert abs(share - 1 / HELD_OUT_EVERY) < 0.02


def test_a_prompt_repeats_only_after_its_pool_is_used_up():
    held = generate_format_lock(400, seed=5, held_out=True)
    by_pool = defaultdict(list)
    for r in held:
        by_pool[(r["language"], r["_meta"]["pattern"])].append(prompt(r))
    for (lang, pattern), prompts in by_pool.items():
        pool = sum(is_held_out(p) for p, _ in SPACE[lang][pattern])
        assert len(set(prompts)) == min(len(prompts), pool), (lang, pattern)
        assert prompts[:pool] == list(dict.fromkeys(prompts))[:pool]


def test_answers_are_one_to_five_tokens_for_a_tokenizer_trained_on_the_data(tmp_path):
    tok = build_tiny_tokenizer(record_texts(TRAIN), tmp_path / "tok")
    answers = {a for lang in LANGUAGES for items in SPACE[lang].values() for _, a in items}
    lengths = {a: len(tok.encode(a, add_special_tokens=False)) for a in answers}
    assert all(1 <= n <= 5 for n in lengths.values()), {a: n for a, n in lengths.items() if n > 5}


def test_record_texts_yields_system_user_and_assistant_text():
    record = TRAIN[0]
    assert list(record_texts([record])) == [record["system"], prompt(record), answer(record)]


def test_write_jsonl_round_trips_utf8_and_replaces_atomically(tmp_path):
    path = tmp_path / "sub" / "data.jsonl"
    records = generate_format_lock(30, seed=2, languages=("de",))
    assert write_jsonl(records, path) == 30
    raw = path.read_text(encoding="utf-8")
    assert raw.endswith("\n") and len(raw.splitlines()) == 30
    assert [json.loads(line) for line in raw.splitlines()] == records
    assert "\\u00" not in raw
    assert write_jsonl(records[:3], path) == 3
    assert [json.loads(line) for line in path.read_text().splitlines()] == records[:3]
    assert [p.name for p in path.parent.iterdir()] == ["data.jsonl"]


def test_write_jsonl_failure_keeps_the_old_file_and_leaves_no_temp(tmp_path):
    path = tmp_path / "data.jsonl"
    write_jsonl(TRAIN[:2], path)
    before = path.read_bytes()
    with pytest.raises(TypeError):
        write_jsonl([TRAIN[0], {"bad": object()}], path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["data.jsonl"]
