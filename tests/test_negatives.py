"""Negatives (five kinds) from SFT answers, and balanced, deduplicated pair sets built from them."""
from __future__ import annotations

import json
import random
import re
from pathlib import Path

import pytest

from lossmask.episode import Conversation, Message, Source
from lossmask.errors import LossmaskError
from lossmask.negatives import (
    FORMAT_VIOLATIONS,
    KINDS,
    REFUSALS,
    _Answered,
    _Corpus,
    _corrupt,
    _negative,
    build_negatives,
    build_pairs,
    language_of,
    looks_like_refusal,
    print_pair_composition,
)
from lossmask.pairs import parse_pair

EPISODES = [
    ("en", "What is the capital of France?", "The capital of France is Paris."),
    ("en", "How many legs does a spider have?", "A spider has 8 legs."),
    ("en", "Is ice cold?", "Yes, ice is cold."),
    ("en", "Who wrote Hamlet?", "Hamlet was written by William Shakespeare."),
    ("de", "Was ist die Hauptstadt von Italien?", "Die Hauptstadt von Italien ist Rom."),
    ("de", "Ist Schnee weiß?", "Ja"),
    ("en", "Say hello.", "hello"),
]


def records(episodes=EPISODES) -> list[dict]:
    return [{"system": "Be brief.", "language": lang,
             "messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
            for lang, q, a in episodes]


def write(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def answered(episodes=EPISODES) -> list[_Answered]:
    out = []
    for i, (lang, q, a) in enumerate(episodes):
        conv = Conversation((Message("user", q), Message("assistant", a)), Source("sft.jsonl", i + 1), language=lang)
        out.append(_Answered(conv, 0, lang, str(i)))
    return out


def test_negatives_file_holds_every_kind_labelled(tmp_path):
    sft = write(tmp_path / "sft.jsonl", records())
    report = build_negatives([str(sft)], str(tmp_path / "neg.jsonl"), seed=5)
    rows = read(tmp_path / "neg.jsonl")
    assert len(rows) == sum(report.written.values()) and report.episodes == 7
    by_kind: dict[str, list] = {}
    for row in rows:
        meta = row["_meta"]
        by_kind.setdefault(meta["negative_kind"], []).append(row)
        origin = EPISODES[meta["negative_of"]["line"] - 1]
        assert row["messages"][0] == {"role": "user", "content": origin[1]} and row["system"] == "Be brief."
        assert row["messages"][-1]["content"] != origin[2] or meta.get("omit_stop")
    assert set(by_kind) == set(KINDS)
    # every refusal comes from the templates of the episode's language
    for row in by_kind["refusal"]:
        assert row["messages"][-1]["content"] in REFUSALS[row["language"]]
    # a truncated answer is a strict prefix of the answer, marked to lose its stop
    for row in by_kind["truncated"]:
        answer = EPISODES[row["_meta"]["negative_of"]["line"] - 1][2]
        cut = row["messages"][-1]["content"]
        assert answer.startswith(cut) and 0 < len(cut) < len(answer) and row["_meta"]["omit_stop"] is True
    assert report.written["truncated"] == 7  # "Ja" and "hello" are cut after half their characters
    # an off-topic answer is another episode's answer
    for row in by_kind["off_topic"]:
        own = EPISODES[row["_meta"]["negative_of"]["line"] - 1]
        others = [a for lang, q, a in EPISODES if q != own[1]]
        assert row["messages"][-1]["content"] in others
    # factual: "hello" has no number, yes/no or entity to corrupt
    assert report.not_applicable["factual"] == 1 and report.written["factual"] == 6


def test_factual_corruptions():
    corpus = _Corpus(answered())
    rng = random.Random(0)
    seen = set()
    for _ in range(40):
        text, how = _corrupt("A spider has 8 legs.", corpus.entities["en"], rng)
        number = re.search(r"\d+", text)
        assert how == "number" and number and number.group() != "8" and text.replace(number.group(), "8") == \
            "A spider has 8 legs."
    for _ in range(40):
        text, how = _corrupt("Ja", corpus.entities["de"], rng)
        assert (text, how) == ("Nein", "polarity")
    for _ in range(40):
        text, how = _corrupt("The capital of France is Paris.", corpus.entities["en"], rng)
        swapped = set(text.split()) - set("The capital of France is Paris.".split())
        assert how == "entity" and len(swapped) == 1
        seen.add(swapped.pop().rstrip("."))
    assert seen <= set(corpus.entities["en"]) and len(seen) > 2 and "The" not in seen
    assert "Rom" not in corpus.entities["en"] and "Rom" in corpus.entities["de"]  # swaps stay in their language
    assert _corrupt("hello", corpus.entities["en"], rng) is None


def test_format_violations_each_variant():
    corpus = _Corpus(answered())
    a = corpus.answered[0]
    made = {}
    for seed in range(60):
        message, labels = _negative("format", a, corpus, random.Random(seed))
        made[labels["format_violation"]] = (message["content"], labels)
    assert set(made) == set(FORMAT_VIOLATIONS)
    answer = "The capital of France is Paris."
    assert made["missing_stop"] == (answer, {"omit_stop": True, "format_violation": "missing_stop"})
    assert made["end_inline"][0] == answer + " END"
    assert made["foreign_tags"][0] == f"<answer>{answer}</answer>"
    body, question = made["continues"][0].split("\nUser: ")
    assert body == answer and question in [q for _, q, _ in EPISODES[1:]]


def test_language_and_refusal_pattern():
    for templates in REFUSALS.values():
        assert all(looks_like_refusal(t) for t in templates)
    assert not any(looks_like_refusal(a) for _, _, a in EPISODES)
    assert not looks_like_refusal("I can tell you: Paris.")
    german = Conversation((Message("user", "Was ist das?"), Message("assistant", "Das ist ein Hund.")), Source("f", 1))
    assert language_of(german) == "de"
    assert language_of(Conversation((Message("user", "What is it?"), Message("assistant", "A dog.")),
                                    Source("f", 1))) == "en"


def test_negatives_are_deterministic_and_atomic(tmp_path):
    sft = write(tmp_path / "sft.jsonl", records())
    build_negatives([str(sft)], str(tmp_path / "a.jsonl"), seed=1)
    build_negatives([str(sft)], str(tmp_path / "b.jsonl"), seed=1)
    build_negatives([str(sft)], str(tmp_path / "c.jsonl"), seed=2)
    assert (tmp_path / "a.jsonl").read_bytes() == (tmp_path / "b.jsonl").read_bytes()
    assert (tmp_path / "a.jsonl").read_bytes() != (tmp_path / "c.jsonl").read_bytes()
    bad = write(tmp_path / "bad.jsonl", [*records(), "{oops"])
    with pytest.raises(LossmaskError, match="bad.jsonl:8"):
        build_negatives([str(bad)], str(tmp_path / "d.jsonl"))
    assert not (tmp_path / "d.jsonl").exists() and not list(tmp_path.glob(".d.jsonl*"))
    report = build_negatives([str(bad)], str(tmp_path / "d.jsonl"), on_error="skip", kinds=["refusal"])
    assert report.rejected == {"bad_json": 1} and report.written == {"refusal": 7}


def test_pairs_are_balanced_deduplicated_and_parse(tmp_path, capsys):
    sft = write(tmp_path / "sft.jsonl", records())
    build_negatives([str(sft)], str(tmp_path / "neg.jsonl"), seed=0)
    negatives = [str(tmp_path / "neg.jsonl")] * 2  # every negative twice: the second copies are duplicates
    report = build_pairs([str(sft)], negatives, str(tmp_path / "pairs.jsonl"), seed=0)
    pairs = read(tmp_path / "pairs.jsonl")
    kinds = [p["_meta"]["negative_kind"] for p in pairs]
    assert report.per_kind == 6 and {k: kinds.count(k) for k in KINDS} == dict.fromkeys(KINDS, 6)
    assert (report.kinds["refusal"].negatives, report.kinds["refusal"].duplicates) == (14, 7)
    assert report.kinds["factual"].available == 6 and report.kinds["truncated"].available == 7
    keys = [json.dumps({k: p[k] for k in ("prompt", "chosen", "rejected")}, sort_keys=True) for p in pairs]
    assert len(set(keys)) == len(keys)
    for i, p in enumerate(pairs):
        pair = parse_pair(p, Source("pairs.jsonl", i + 1))
        assert pair.omit_stop == (p["_meta"].get("omit_stop") is True)
        assert pair.chosen.messages[:-1] == pair.rejected.messages[:-1]
    capped = build_pairs([str(sft)], [str(tmp_path / "neg.jsonl")], str(tmp_path / "few.jsonl"), seed=0, per_kind=2,
                         kinds=["refusal", "truncated"])
    assert capped.pairs == 4 and len(read(tmp_path / "few.jsonl")) == 4
    again = build_pairs([str(sft)], [str(tmp_path / "neg.jsonl")], str(tmp_path / "again.jsonl"), seed=0, per_kind=2,
                        kinds=["refusal", "truncated"])
    assert (tmp_path / "again.jsonl").read_bytes() == (tmp_path / "few.jsonl").read_bytes() and again.pairs == 4
    print_pair_composition(report)
    table = capsys.readouterr().out
    assert all(kind in table for kind in KINDS) and "6 pairs per kind, 30 pairs" in table
    # negatives are joined by content: another SFT file gives nothing to join
    other = write(tmp_path / "other.jsonl", records([("en", "Unrelated?", "Yes.")]))
    with pytest.raises(LossmaskError, match="no negative could be joined"):
        build_pairs([str(other)], [str(tmp_path / "neg.jsonl")], str(tmp_path / "x.jsonl"))


def test_pairs_drop_negatives_equal_to_the_answer_or_with_another_prompt(tmp_path):
    from lossmask.negatives import episode_sha256
    from lossmask.sources import read_episodes

    sft = write(tmp_path / "sft.jsonl", records())
    episodes = list(read_episodes(sft))
    rows = []
    for i, episode in enumerate(episodes[:3]):
        row = records()[i]
        row["_meta"] = {"negative_kind": "refusal", "negative_of": {"episode_sha256": episode_sha256(episode)}}
        rows.append(row)
    rows[1]["messages"][0]["content"] = "Another question?"  # its prompt is not its SFT episode's
    rows[2]["messages"][-1]["content"] = "A refusal."
    rows.append({**records()[3], "_meta": {"negative_kind": "refusal", "negative_of": {"episode_sha256": "0" * 64}}})
    rows.append(records()[4])  # not a negative
    report = build_pairs([str(sft)], [str(write(tmp_path / "neg.jsonl", rows))], str(tmp_path / "pairs.jsonl"))
    count = report.kinds["refusal"]
    assert (count.negatives, count.identical, count.available, count.selected) == (2, 1, 1, 1)
    assert (report.prompt_differs, report.unmatched, report.not_negatives) == (1, 1, 1)
    (pair,) = read(tmp_path / "pairs.jsonl")
    assert pair["rejected"] == {"role": "assistant", "content": "A refusal."} and pair["chosen"]["content"] == \
        EPISODES[2][2]
