"""lossmask replay: token-bounded chunks, boundary preference, inputs (txt, jsonl, dataset), sampling."""
from __future__ import annotations

import io
import json
import random
import tracemalloc
from pathlib import Path

import pytest
from rich.console import Console

from lossmask.episode import Replay
from lossmask.errors import InputError, LossmaskError
from lossmask.prepare import PrepareOptions, prepare
from lossmask.replay import build_replay, chunk_text, print_replay_report
from lossmask.tokenizer import exact_backend
from lossmask.sources import read_episodes
from tests.tokenizers_cache import tokenizer_dir

WORDS = "lorem ipsum dolor sit amet Straße naïve café 東京 😀 e\u0301te consectetur adipiscing elit".split()


def prose(sentences: int, seed: int = 0) -> str:
    rnd = random.Random(seed)
    parts = []
    for _ in range(sentences):
        words = " ".join(rnd.choice(WORDS) for _ in range(rnd.randint(3, 18)))
        parts.append(words.capitalize() + rnd.choice([". ", "! ", "? ", ".\n\n", ", ", " "]))
    return "".join(parts)


@pytest.fixture(scope="module")
def qwen3_fast(qwen3):
    """The Rust tokenizer, copied once (copying qwen3's 150k vocabulary takes about a second)."""
    return exact_backend(qwen3)


def count(tok, text: str) -> int:
    return len(tok(text, add_special_tokens=False)["input_ids"])


def records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.mark.parametrize("name", ["qwen3", "llama2"])
@pytest.mark.parametrize("max_tokens", [5, 64])
def test_chunks_rebuild_the_text_and_hold_at_most_max_tokens(request, name, max_tokens):
    tok = request.getfixturevalue(name)
    text = prose(40 if max_tokens < 10 else 150, seed=max_tokens)
    pieces = [text[i : i + 97] for i in range(0, len(text), 97)]  # pieces cut anywhere, even mid-word
    chunks = list(chunk_text(pieces, exact_backend(tok), max_tokens))
    assert "".join(c.text for c in chunks) == text
    for c in chunks:
        assert c.tokens == count(tok, c.text) <= max_tokens
        assert c.text and not c.text[0] in "\u0301"  # a combining mark stays with its letter
    assert chunks[-1].cut == "end"
    if max_tokens >= 64:  # the last 10% of a window is wide enough to hold a boundary
        assert sum(c.cut != "token" for c in chunks) > len(chunks) / 2


def test_cut_prefers_paragraph_then_sentence_then_whitespace_then_token(qwen3, qwen3_fast):
    first = " ".join(["word"] * 37)
    cases = {
        "paragraph": (first + ".\n\n" + " ".join(["next"] * 60), first + ".\n\n"),
        "sentence": (first + ". " + " ".join(["more"] * 60), first + "."),
        "whitespace": (" ".join(["word"] * 100), " ".join(["word"] * 40)),
    }
    for kind, (text, head) in cases.items():
        chunk = next(chunk_text([text], qwen3_fast, 40))
        assert (chunk.cut, chunk.text) == (kind, head)
        assert chunk.tokens == count(qwen3, head) <= 40
    chunks = list(chunk_text(["ab" * 500], qwen3_fast, 40))
    assert {c.cut for c in chunks[:-1]} == {"token"} and all(c.tokens <= 40 for c in chunks)
    assert "".join(c.text for c in chunks) == "ab" * 500


def test_a_character_longer_than_the_limit_stays_whole(qwen3, qwen3_fast):
    family = "👨\u200d👩\u200d👧"  # one emoji sequence, several tokens
    chunks = list(chunk_text([family * 3], qwen3_fast, 1))
    assert [c.text for c in chunks] == [family] * 3
    assert all(c.tokens == count(qwen3, family) > 1 for c in chunks)


def test_txt_documents_by_blank_line_or_whole_file(tmp_path, qwen3):
    path = tmp_path / "corpus.txt"
    path.write_text("\ufeffPara one, line 1\nline 2\n\n\nPara two.\n   \nPara three\n", encoding="utf-8")
    out = tmp_path / "replay.jsonl"
    report = build_replay([path], out, qwen3, max_tokens=100, documents="blank-line")
    got = records(out)
    assert [r["text"] for r in got] == ["Para one, line 1\nline 2", "Para two.", "Para three"]
    assert [r["_meta"]["line"] for r in got] == [1, 5, 7]
    assert all(r["_replay"] is True and r["_meta"]["tokens"] == count(qwen3, r["text"]) for r in got)
    assert (report.documents, report.chunks, report.episodes) == (3, 3, 3)
    assert report.tokens == sum(r["_meta"]["tokens"] for r in got)
    episodes = list(read_episodes(out))
    assert all(isinstance(e, Replay) for e in episodes) and [e.text for e in episodes] == [r["text"] for r in got]

    build_replay([path], out, qwen3, max_tokens=100)  # documents="file"
    assert [r["text"] for r in records(out)] == ["Para one, line 1\nline 2\n\n\nPara two.\n   \nPara three"]


def test_long_file_streams_into_bounded_chunks(tmp_path, qwen3, qwen3_fast):
    text = prose(6000, seed=1)  # about 380,000 characters
    path = tmp_path / "big.txt"
    path.write_text(text + "\n", encoding="utf-8")
    out = tmp_path / "replay.jsonl"
    (tmp_path / "warm.txt").write_text(text[:5000])
    build_replay([tmp_path / "warm.txt"], out, qwen3_fast, max_tokens=128)  # first-use allocations
    tracemalloc.start()
    try:
        report = build_replay([path], out, qwen3_fast, max_tokens=128)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    got = records(out)
    assert "".join(r["text"] for r in got) == text
    assert all(count(qwen3, r["text"]) <= 128 for r in got)
    assert [r["_meta"]["chunk"] for r in got] == list(range(len(got)))
    assert report.episodes == len(got) > 100 and report.chars == len(text)
    assert peak < 150_000 < path.stat().st_size // 2, f"peak {peak:,} bytes"


def test_jsonl_text_documents_and_errors_with_file_and_line(tmp_path, qwen3_fast):
    path = tmp_path / "docs.jsonl"
    path.write_text('{"text": "First doc."}\n\n{"text": "Second doc.", "id": 2}\n')
    out = tmp_path / "replay.jsonl"
    build_replay([path], out, qwen3_fast, max_tokens=50)
    assert [(r["text"], r["_meta"]["line"]) for r in records(out)] == [("First doc.", 1), ("Second doc.", 3)]
    path.write_text('{"text": "ok"}\n{"body": "no text"}\n')
    with pytest.raises(InputError) as err:
        build_replay([path], tmp_path / "other.jsonl", qwen3_fast, max_tokens=50)
    assert str(err.value).startswith(f"{path}:2 (field text):")
    assert not (tmp_path / "other.jsonl").exists()


def test_from_a_prepared_dataset_decodes_its_episodes(tmp_path):
    texts = [f"Document {i}: Straße, café, 東京 😀.\n\nSecond paragraph {i}." for i in range(6)]
    src = tmp_path / "pretrain.jsonl"
    src.write_text("".join(json.dumps({"_replay": True, "text": t}) + "\n" for t in texts))
    ds = tmp_path / "ds"
    prepare(PrepareOptions([str(src)], str(tokenizer_dir("qwen3")), str(ds), val_split=0), progress=False)
    out = tmp_path / "replay.jsonl"
    report = build_replay([ds], out, max_tokens=1000)  # counts with the dataset's own tokenizer
    got = records(out)
    assert [r["text"] for r in got] == texts
    assert [r["_meta"]["episode"] for r in got] == list(range(6)) and report.documents == 6


def test_max_episodes_samples_deterministically_in_input_order(tmp_path, qwen3_fast):
    path = tmp_path / "corpus.txt"
    path.write_text("\n\n".join(f"Document number {i}." for i in range(30)))
    outs = {}
    for name, seed in (("a", 1), ("b", 1), ("c", 2)):
        outs[name] = tmp_path / f"{name}.jsonl"
        report = build_replay([path], outs[name], qwen3_fast, max_tokens=20, documents="blank-line",
                              max_episodes=10, seed=seed)
        assert (report.chunks, report.episodes) == (30, 10)
    assert outs["a"].read_bytes() == outs["b"].read_bytes() != outs["c"].read_bytes()
    lines = [r["_meta"]["line"] for r in records(outs["a"])]
    assert lines == sorted(lines) and len(set(lines)) == 10


def test_bad_arguments(tmp_path, qwen3_fast):
    path = tmp_path / "a.txt"
    path.write_text("text")
    with pytest.raises(LossmaskError, match="needs --tokenizer"):
        build_replay([path], tmp_path / "o.jsonl", max_tokens=10)
    with pytest.raises(LossmaskError, match="at least 1"):
        build_replay([path], tmp_path / "o.jsonl", qwen3_fast, max_tokens=0)
    (tmp_path / "bad.txt").write_bytes(b"fine\nbad \xff byte\n")
    with pytest.raises(InputError, match=r"bad.txt:2: invalid UTF-8"):
        build_replay([tmp_path / "bad.txt"], tmp_path / "o.jsonl", qwen3_fast, max_tokens=10)
    assert not (tmp_path / "o.jsonl").exists()


def test_print_replay_report(tmp_path, qwen3_fast):
    path = tmp_path / "a.txt"
    path.write_text(" ".join(["word"] * 100))
    report = build_replay([path], tmp_path / "o.jsonl", qwen3_fast, max_tokens=40)
    buf = io.StringIO()
    print_replay_report(report, Console(file=buf, width=200))
    text = " ".join(buf.getvalue().split())
    assert "(≤ 40 tokens an episode)" in text and "episodes written: 3 (100 tokens" in text and "whitespace 2" in text
