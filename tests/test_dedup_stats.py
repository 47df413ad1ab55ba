"""lossmask dedup (exact / user duplicates, first kept) and lossmask stats (counts, diversity), streaming."""
from __future__ import annotations

import io
import json
import tracemalloc
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from rich.console import Console

from lossmask.dedup import dedup, normalize_user, print_dedup_report
from lossmask.errors import InputError
from lossmask.stats import (
    DistinctCounter,
    TopCounter,
    bucket_label,
    bucket_of,
    compute_stats,
    print_stats,
    template_of,
)


def chat(user: str, answer: str, system: str | None = None, context: str | None = None) -> dict:
    record: dict = {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]}
    if context is not None:
        record["messages"][0]["context"] = context
    if system is not None:
        record["system"] = system
    return record


def write_lines(path: Path, lines: list) -> Path:
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x, ensure_ascii=False)) + "\n" for x in lines),
                    encoding="utf-8")
    return path


def rendered(print_fn, report) -> str:
    buf = io.StringIO()
    print_fn(report, Console(file=buf, width=250))
    return buf.getvalue()


# ---- dedup -----------------------------------------------------------------------------------------


def test_dedup_exact_and_user_duplicates_keep_the_first(tmp_path):
    lines = [
        '{"messages": [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"}]}',
        '{"messages":[{"content":"What is 2+2?","role":"user"},{"content":"4","role":"assistant"}]}',  # exact
        chat("  what IS   2+2 ", "Four."),  # user
        chat("What is 2+2?", "4", system="Be brief."),  # user: the system prompt is not part of the key
        chat("What is 2+2?", "4", context="Arithmetic notes."),  # new: another context
        {"conversations": [{"from": "human", "value": "WHAT is 2+2"}, {"from": "gpt", "value": "4!"}]},  # user
        {"instruction": "Name a colour", "output": "Red"},
        {"instruction": "name a colour.", "input": "", "output": "Blue"},  # user (alpaca)
        {"prompt": "Say hi", "completion": " hi"},
        {"prompt": "say hi!", "completion": " hello"},  # user (a text pair's prompt)
        {"text": "### Response: same"},
        {"text": "### Response: same"},  # exact (no user side)
        {"text": "### Response: other"},
    ]
    path = write_lines(tmp_path / "in.jsonl", lines)
    out = tmp_path / "out.jsonl"
    report = dedup(path, out)
    kept = out.read_text(encoding="utf-8").splitlines()
    source = path.read_text(encoding="utf-8").splitlines()
    assert kept == [source[i] for i in (0, 4, 6, 8, 10, 12)]  # byte for byte
    assert (report.read, report.kept, dict(report.duplicates)) == (13, 6, {"exact": 2, "user": 5})
    assert report.no_user == 3
    assert report.examples["exact"] == [f"{path}:2", f"{path}:12"]
    assert report.examples["user"][:2] == [f"{path}:3", f"{path}:4"]

    report = dedup(path, out, by="exact")
    assert (report.kept, dict(report.duplicates)) == (11, {"exact": 2})
    report = dedup(path, out, by="user")
    assert (report.kept, dict(report.duplicates)) == (7, {"user": 6})  # marked text all kept under "user"


def test_dedup_across_inputs_and_exact_counted_before_user(tmp_path):
    a = write_lines(tmp_path / "a.jsonl", [chat("Hi", "Hello"), chat("Bye", "Ciao")])
    b = write_lines(tmp_path / "b.jsonl", ["", chat("hi", "Hey"), chat("Bye", "Ciao"), chat("New", "One")])
    out = tmp_path / "out.jsonl"
    report = dedup([a, b], out)
    assert [json.loads(x)["messages"][0]["content"] for x in out.read_text().splitlines()] == ["Hi", "Bye", "New"]
    assert dict(report.duplicates) == {"user": 1, "exact": 1} and report.examples["exact"] == [f"{b}:3"]


def test_dedup_bad_lines_name_file_and_line_or_are_skipped(tmp_path):
    path = write_lines(tmp_path / "in.jsonl", [chat("a", "b"), "{broken", {"messages": [{"role": "user"}]}])
    out = tmp_path / "out.jsonl"
    with pytest.raises(InputError) as err:
        dedup(path, out)
    assert str(err.value).startswith(f"{path}:2: not valid JSON")
    assert not out.exists()
    report = dedup(path, out, on_error="skip")
    assert report.skipped == 2 and report.kept == 1
    assert [(p.line, p.reason) for p in report.problems] == [(2, "bad_json"), (3, "missing_content")]
    assert dedup(path, out, by="exact", on_error="skip").kept == 2  # exact needs JSON only


def test_normalize_user():
    assert normalize_user("  ¿Qué   HORA es?\n") == "qué hora es"
    assert normalize_user("ＦＵＬＬ width Straße!!") == "full width strasse"
    assert normalize_user("\"quoted\" text…") == "quoted\" text"
    assert normalize_user("2+2=?") == "2+2="  # symbols are not punctuation


def test_dedup_memory_grows_with_unique_episodes_not_lines(tmp_path):
    lines = [chat(f"Question {i % 50}", f"Answer {i % 50}. " + "x" * 300) for i in range(20_000)]
    path = write_lines(tmp_path / "in.jsonl", lines)  # about 7 MB, 50 distinct episodes
    dedup(write_lines(tmp_path / "warm.jsonl", lines[:100]), tmp_path / "warm-out.jsonl")  # first-use allocations
    tracemalloc.start()
    try:
        report = dedup(path, tmp_path / "out.jsonl")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert (report.kept, report.duplicates["exact"]) == (50, 19_950)
    assert peak < 500_000, f"peak {peak:,} bytes"


def test_print_dedup_report(tmp_path):
    path = write_lines(tmp_path / "in.jsonl", [chat("Hi", "a"), chat("hi", "b"), chat("Hi", "a")])
    text = rendered(print_dedup_report, dedup(path, tmp_path / "o.jsonl"))
    assert "exact duplicates │ 1" in text and "user duplicates  │ 1" in text and "kept             │ 1" in text


# ---- stats -----------------------------------------------------------------------------------------


def test_stats_counts(tmp_path):
    lines = [
        chat("Hello there", "Hi!", system="Be kind."),
        {"messages": [
            {"role": "user", "content": "Weather?"},
            {"role": "assistant_toolcall", "name": "w", "arguments": {"c": 1}},
            {"role": "toolresult", "name": "w", "content": "sunny"},
            {"role": "assistant", "content": "Sunny.", "think": "look"},
            {"role": "user", "content": "Thanks"},
            {"role": "assistant", "content": "You are welcome."},
        ]},
        {"prompt": "Q:", "completion": " A"},
        {"_replay": True, "text": "Some pretraining text."},
        "{not json",
        {"messages": [{"role": "robot", "content": "x"}]},
    ]
    path = write_lines(tmp_path / "in.jsonl", lines)
    stats = compute_stats(path)
    assert stats.episodes == 4
    assert stats.kinds == Counter({"conversation": 2, "text_pair": 1, "replay": 1})
    assert stats.rejected == Counter({"bad_json": 1, "unknown_role": 1})
    assert stats.turns == Counter({1: 1, 2: 1})
    got = {role: (r.count, r.chars, r.max_chars) for role, r in stats.roles.items()}
    assert got == {
        "system": (1, 8, 8),
        "user": (3, 11 + 8 + 6, 11),
        "assistant": (3, 3 + 6 + 16, 16),
        "think": (1, 4, 4),
        "assistant_toolcall": (1, len('w{"c": 1}'), 9),
        "toolresult": (1, 5, 5),
        "prompt": (1, 2, 2),
        "completion": (1, 2, 2),
        "replay": (1, 22, 22),
    }
    assert stats.roles["user"].histogram == Counter({1: 3}) and stats.diversity is None
    text = rendered(print_stats, stats)
    assert "bad_json" in text and "unknown_role" in text and "assistant_toolcall" in text


def test_distinct_n_is_exact_and_does_not_cross_messages(tmp_path):
    path = write_lines(tmp_path / "in.jsonl", [chat("Tell me", "A b A"), chat("tell ME", "a b c")])
    div = compute_stats(path, diversity=True).diversity
    got = {n: (d.distinct, d.total, d.exact) for n, d in div.distinct["assistant"].items()}
    # words a b a | a b c: 1-grams 3 of 6; 2-grams ab ba ab bc: 3 of 4 (no "a a" across the messages)
    assert got == {1: (3, 6, True), 2: (3, 4, True), 3: (2, 2, True)}
    assert div.distinct["user"][2].ratio == 0.5 and div.distinct["user"][3].total == 0


def test_distinct_counter_switches_to_an_estimate_past_the_exact_limit():
    rng = np.random.default_rng(0)
    hashes = rng.integers(0, 2**63, size=200_000, dtype=np.uint64) * np.uint64(2)
    counter = DistinctCounter(exact_limit=10_000)
    for part in np.array_split(np.concatenate([hashes, hashes[:50_000]]), 9):
        counter.add(part)
    assert counter.total == 250_000 and not counter.exact
    assert abs(counter.distinct() - 200_000) < 0.03 * 200_000
    exact = DistinctCounter(exact_limit=1 << 20)
    exact.add(hashes[:1000])
    exact.add(hashes[:1500])
    assert (exact.distinct(), exact.total, exact.exact) == (1500, 2500, True)


def test_user_templates(tmp_path):
    assert template_of('What is 12 + 7?') == "What is # + #?"
    assert template_of('Translate  "cat" into German.') == 'Translate "…" into German.'
    assert template_of("Don't say 'yes' or „ja“ or «oui»") == 'Don\'t say "…" or "…" or "…"'
    users = [f"What is {i} + {2 * i}?" for i in range(5)] + [f'Translate "{w}".' for w in ("a", "b")] + ["Hi"]
    path = write_lines(tmp_path / "in.jsonl", [chat(u, "x") for u in users])
    div = compute_stats(path, diversity=True).diversity
    assert div.templates == [("What is # + #?", 5), ('Translate "…".', 2), ("Hi", 1)] and div.templates_exact
    text = rendered(print_stats, compute_stats(path, diversity=True))
    assert "62.5%" in text and "distinct-3" in text and "What is # + #?" in text


def test_top_counter_keeps_heavy_hitters_and_says_when_inexact():
    top = TopCounter(capacity=3)
    for key in ["a"] * 10 + ["b", "c", "d", "e"] + ["a"] * 5:
        top.add(key)
    assert not top.exact and top.most_common(1)[0][0] == "a"
    assert top.most_common(1)[0][1] <= 15


def test_length_buckets():
    assert [bucket_of(n) for n in (0, 1, 15, 16, 31, 32, 1000)] == [0, 1, 1, 2, 2, 3, 7]
    assert [bucket_label(b) for b in (0, 1, 2, 7)] == ["0", "1-15", "16-31", "512-1,023"]


def test_stats_memory_does_not_grow_with_the_input(tmp_path):
    lines = [chat(f"Question number {i % 100}?", "Answer " + "word " * 40) for i in range(20_000)]
    path = write_lines(tmp_path / "in.jsonl", lines)  # about 5 MB
    compute_stats(write_lines(tmp_path / "warm.jsonl", lines[:100]), diversity=True)  # first-use allocations
    tracemalloc.start()
    try:
        stats = compute_stats(path, diversity=True)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert stats.episodes == 20_000 and stats.diversity.templates == [("Question number #?", 20_000)]
    assert (stats.diversity.distinct["user"][3].distinct, stats.diversity.distinct["assistant"][1].distinct) == (100, 2)
    assert peak < 2_000_000, f"peak {peak:,} bytes"
