"""Token-by-token views of a mask: exact token text, escaped HTML, console output, atomic writes."""
from __future__ import annotations

import io
import os
import re

import numpy as np
import pytest
from rich.console import Console

from lossmask.errors import LossmaskError
from lossmask.render.base import Label
from lossmask.view import TokenRow, html_page, print_episode, summary_line, token_rows, write_html

MIXED = "Grüße aus Köln 😀 🦜🫠 中文 𓀀 ꙮ\n\n\tStraße über 🧑‍🚀 <b>x</b>\n"


def decode(tok, ids) -> str:
    return tok.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


def rows_for(tok, text: str, weight: float = 1.0, label: Label = Label.ASSISTANT) -> list[TokenRow]:
    ids = tok(text, add_special_tokens=False)["input_ids"]
    return token_rows(ids, [weight] * len(ids), [int(label)] * len(ids), tok)


def qwen3_chat(tok) -> tuple[list[int], list[float], list[int]]:
    """A real Qwen3 chat: an earlier assistant turn at weight 0.5, the last at 1 with its <|im_end|>, padding."""
    T, S, U, A, STOP = Label.TEMPLATE, Label.SYSTEM, Label.USER, Label.ASSISTANT, Label.STOP
    pieces = [
        ("<|im_start|>system\n", T, 0.0),
        ("You are a helpful assistant.", S, 0.0),
        ("<|im_end|>\n<|im_start|>user\n", T, 0.0),
        ("Wie grüßt man auf Deutsch? 🙂", U, 0.0),
        ("<|im_end|>\n<|im_start|>assistant\n", T, 0.0),
        ("Man sagt „Grüß Gott“ oder „Hallo“.", A, 0.5),
        ("<|im_end|>", STOP, 0.5),
        ("\n<|im_start|>user\n", T, 0.0),
        ("Was macht <script>alert(1)</script>?", U, 0.0),
        ("<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n", T, 0.0),
        ("Es öffnet ein Meldungsfenster 🦜.\nIn Daten ist das harmlos, solange es escaped wird.", A, 1.0),
        ("<|im_end|>", STOP, 1.0),
        ("\n", T, 0.0),
    ]
    messages = [
        {"role": "system", "content": pieces[1][0]},
        {"role": "user", "content": pieces[3][0]},
        {"role": "assistant", "content": pieces[5][0]},
        {"role": "user", "content": pieces[8][0]},
        {"role": "assistant", "content": pieces[10][0]},
    ]
    text = "".join(p for p, _, _ in pieces)
    assert text == tok.apply_chat_template(messages, tokenize=False)
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    ends = np.cumsum([len(p) for p, _, _ in pieces])
    ids, weights, labels = list(enc["input_ids"]), [], []
    for start, _ in enc["offset_mapping"]:
        _, label, weight = pieces[int(np.searchsorted(ends, start, side="right"))]
        weights.append(weight)
        labels.append(int(label))
    pad = tok.convert_tokens_to_ids("<|endoftext|>")
    return ids + [pad] * 4, weights + [0.0] * 4, labels + [int(Label.PAD)] * 4


# --- token_rows -------------------------------------------------------------------------------------


@pytest.mark.parametrize("repeat", [1, 40])  # 40 repeats is far longer than one decode window
def test_rows_concatenate_to_decode(any_tokenizer, repeat):
    ids = any_tokenizer(MIXED * repeat, add_special_tokens=True)["input_ids"]
    rows = token_rows(ids, [0.0] * len(ids), [1] * len(ids), any_tokenizer)
    assert [r.id for r in rows] == ids
    assert "".join(r.text for r in rows) == decode(any_tokenizer, ids)
    assert not any("\ufffd" in r.text for r in rows)


def test_split_characters_show_bytes_and_land_on_completing_token(qwen3):
    rows = rows_for(qwen3, "🦜 und ꙮ")
    split = [r for r in rows if qwen3.decode([r.id]).count("\ufffd")]
    assert split, "expected byte-level tokens that hold part of a character"
    parrot = next(i for i, r in enumerate(rows) if "🦜" in r.text)
    assert rows[parrot].text == "🦜" and parrot > 0
    assert rows[parrot - 1].text == "" and rows[parrot - 1].partial.startswith("🦜".encode()[:1])
    held = b"".join(r.partial for r in rows[:parrot])
    assert "🦜".encode().startswith(held) and held
    for r in rows:
        assert r.text or r.partial  # nothing shows as an empty token
        if r.partial:
            assert r.partial.decode("utf-8", errors="ignore") == ""  # only bytes of unfinished characters


def test_byte_fallback_split_characters(gemma3, llama2):
    for tok in (gemma3, llama2):
        rows = rows_for(tok, " 𓀀𓁐 ꙮ")
        assert "".join(r.text for r in rows) == decode(tok, [r.id for r in rows])
        assert [r.text for r in rows if r.text.strip()] == ["𓀀", "𓁐", "ꙮ"]
        assert b"".join(r.partial for r in rows) == "𓀀".encode()[:-1] + "𓁐".encode()[:-1] + "ꙮ".encode()[:-1]


def test_truncated_inside_a_character(qwen3, llama2):
    ids = qwen3("ok 🦜", add_special_tokens=False)["input_ids"][:-1]
    rows = token_rows(ids, [1.0] * len(ids), [5] * len(ids), qwen3)
    assert "".join(r.text for r in rows) == decode(qwen3, ids)  # byte-level: exact, ends in U+FFFD
    ids = llama2("ok 🦜", add_special_tokens=False)["input_ids"][:-2]
    rows = token_rows(ids, [1.0] * len(ids), [5] * len(ids), llama2)
    assert "".join(r.text for r in rows) == decode(llama2, ids) == "ok \ufffd\ufffd"
    assert b"".join(r.partial for r in rows) == "🦜".encode()[:2]


def test_rows_carry_weights_and_labels_from_arrays(qwen3):
    ids, weights, labels = qwen3_chat(qwen3)
    rows = token_rows(
        np.array(ids, dtype=np.uint32), np.array(weights, dtype=np.float32), np.array(labels, dtype=np.uint8), qwen3
    )
    assert [r.weight for r in rows] == [float(np.float32(w)) for w in weights]
    assert [r.label for r in rows] == labels
    assert all(type(r.id) is int and type(r.weight) is float for r in rows)
    stops = [r for r in rows if r.label == Label.STOP]
    assert [r.text for r in stops] == ["<|im_end|>", "<|im_end|>"] and [r.weight for r in stops] == [0.5, 1.0]


def test_mismatched_lengths_are_a_clear_error(qwen3):
    with pytest.raises(LossmaskError, match="3 token ids but 2 weights"):
        token_rows([1, 2, 3], [0.0, 1.0], [0, 0, 0], qwen3)


# --- HTML -------------------------------------------------------------------------------------------

TOKEN_SPAN = re.compile(r'<span class="(trained|masked|weighted|pad) ([ab])"( style="[^"]*")? title="([^"]*)">(.*?)</span>', re.S)


def test_html_escapes_content_title_and_summary(qwen3):
    evil = "<script>alert(1)</script>"
    rows = rows_for(qwen3, f"x {evil} y")
    page = html_page([(f"data.jsonl:3 {evil}", rows)], title=f"inspect {evil}", summary={evil: evil, "n": 1})
    assert "<script" not in page.lower()
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page  # title, heading and summary cell
    shown = "".join(m.group(5) for m in TOKEN_SPAN.finditer(page))
    assert "&lt;" in shown and "<" not in shown.replace("<i class=", "")


def test_html_one_span_per_token_with_hover(qwen3):
    ids, weights, labels = qwen3_chat(qwen3)
    rows = token_rows(ids, weights, labels, qwen3)
    page = html_page([("chat.jsonl:1", rows), ("chat.jsonl:2", rows[:5])], title="demo", summary={"sequences": 2})
    spans = TOKEN_SPAN.findall(page)
    assert len(spans) == len(rows) + 5
    for (kind, shade, style, hover, _), row, i in zip(spans, rows, range(len(rows))):
        assert hover.startswith(f"id {row.id} · ")
        assert f"weight {row.weight:.4g} · {Label(row.label).name}" in hover
        assert shade == "ab"[i % 2]
        expected = {0.0: "pad" if row.label == Label.PAD else "masked", 1.0: "trained"}.get(row.weight, "weighted")
        assert kind == expected and bool(style) == (kind == "weighted")
    stop = [s for s in spans[: len(rows)] if s[3].endswith("· STOP")]
    assert [s[0] for s in stop] == ["weighted", "trained"] and stop[1][4] == "&lt;|im_end|&gt;"
    assert 'class="legend"' in page and "trained" in page and "padding" in page and "hover a token" in page
    assert '<table class="summary"><tr><th>sequences</th><td>2</td></tr></table>' in page
    assert page.count("<section") == 2 and 'href="#ep1"' in page
    assert summary_line(rows) in page


def test_html_newlines_and_weight_colours():
    rows = [TokenRow(1, "a\n", 1.0, 5), TokenRow(2, "b", 0.25, 5), TokenRow(3, "c", 0.75, 5), TokenRow(4, "d", 2.0, 5)]
    spans = TOKEN_SPAN.findall(html_page([("t", rows)], title="t"))
    assert spans[0][4] == "a↵\n"
    colours = [s[2] for s in spans[1:]]
    assert len(set(colours)) == 3  # intensity follows the weight; above 1 is another colour


# --- console ----------------------------------------------------------------------------------------


def test_print_episode_legend_and_summary(qwen3):
    ids, weights, labels = qwen3_chat(qwen3)
    rows = token_rows(ids, weights, labels, qwen3)
    console = Console(record=True, width=100, file=io.StringIO(), color_system="truecolor")
    print_episode(console, rows, "chat.jsonl:1 [bold]x[/bold]")
    out = console.export_text()
    trained = sum(1 for w in weights if w)
    assert "legend:" in out and "trained (1)" in out and "padding" in out
    assert "chat.jsonl:1 [bold]x[/bold]" in out  # titles are text, not markup
    assert f"{len(ids)} tokens · {trained} trained ({trained / len(ids):.1%}) · weights: 0, 0.5, 1" in out
    assert "Es öffnet ein Meldungsfenster ⟨f0 9f⟩⟨a6⟩🦜.↵" in out and "<|im_end|>" in out
    styled = console.export_text(styles=True, clear=False)
    assert styled != out  # colours were applied


def test_print_episode_without_legend():
    console = Console(record=True, width=100, file=io.StringIO())
    print_episode(console, [TokenRow(7, "hi", 0.0, int(Label.USER))], "t", legend=False)
    out = console.export_text()
    assert "legend" not in out and "1 tokens · 0 trained (0.0%) · weights: 0" in out


# --- writing ----------------------------------------------------------------------------------------


def test_write_html_is_atomic(tmp_path):
    target = tmp_path / "out" / "view.html"
    write_html(target, "<p>one</p>")
    write_html(target, "<p>two</p>")
    assert target.read_text(encoding="utf-8") == "<p>two</p>"
    assert os.listdir(target.parent) == ["view.html"]
    (tmp_path / "dir.html").mkdir()
    with pytest.raises(LossmaskError, match="is a directory"):
        write_html(tmp_path / "dir.html", "<p>x</p>")
    assert sorted(os.listdir(tmp_path)) == ["dir.html", "out"]
