"""Showing a stored sequence token by token, coloured by loss weight, in a terminal or an HTML page.

A person checks a mask by eye: which tokens carry loss, with what weight, and where the token
boundaries fall. This module only renders rows it is given; reading the store is the CLI's job.

Token text policy (``token_rows``): each row's ``text`` is the piece of the decoded sequence that the
token adds, so concatenating the rows gives exactly ``tokenizer.decode(ids, skip_special_tokens=False,
clean_up_tokenization_spaces=False)``. A character split over several byte-level (or byte-fallback)
tokens is given to the token that completes it; the earlier tokens keep its leading bytes in
``partial`` and are shown as ``⟨f0 9f⟩`` (hex bytes) instead of replacement characters. A sequence cut
inside a character (truncation) ends in U+FFFD exactly as ``decode`` shows it, plus the cut bytes
(byte-fallback tokenizers turn that whole run of byte tokens into U+FFFD; the rows keep the characters
that were complete, so only there the concatenation differs from ``decode``). A token that adds no
text and holds no split bytes (a stripped leading ``▁``) is shown as ``∅``.
"""
from __future__ import annotations

import html
import json
import os
from dataclasses import dataclass
from typing import Iterable, Sequence

from rich.console import Console
from rich.text import Text

from lossmask.atomic import write_text
from lossmask.errors import LossmaskError
from lossmask.render.base import Label

REPLACEMENT = "\ufffd"
_WINDOW = 64  # decode at most this many tokens at a time, so long sequences cost O(n), not O(n²)
_CONTEXT = 8  # tokens kept in front of a new window so decoders see the same left context
_MAX_LISTED_WEIGHTS = 8


@dataclass
class TokenRow:
    """One token to show.

    ``label`` is a ``Label`` value; ``partial`` holds this token's bytes of a character that a later
    token completes (display only: they are not part of ``text``).
    """

    id: int
    text: str
    weight: float
    label: int
    partial: bytes = b""


# ---------------------------------------------------------------------------------------------------
# token text


def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's printable stand-ins for bytes, reversed: byte-level BPE tokens are spelled with these."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in chars:
            chars[b] = chr(256 + extra)
            extra += 1
    return {c: b for b, c in chars.items()}


_BYTE_LEVEL = _byte_level_alphabet()


def _token_bytes(piece: str, byte_level: bool, added: bool) -> bytes:
    """The bytes a vocabulary entry stands for (used only to show split characters)."""
    if added:
        return piece.encode("utf-8")
    if byte_level and all(c in _BYTE_LEVEL for c in piece):
        return bytes(_BYTE_LEVEL[c] for c in piece)
    if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
        try:
            return bytes([int(piece[3:5], 16)])
        except ValueError:
            pass
    return piece.replace("\u2581", " ").encode("utf-8")


def _incomplete_tail(data: bytes) -> int:
    """How many bytes at the end of ``data`` start a UTF-8 character that is not finished yet."""
    for k in range(1, min(4, len(data)) + 1):
        byte = data[-k]
        if byte & 0xC0 == 0x80:  # continuation byte: keep looking for the lead byte
            continue
        need = 2 if byte & 0xE0 == 0xC0 else 3 if byte & 0xF0 == 0xE0 else 4 if byte & 0xF8 == 0xF0 else 1
        return k if need > k else 0
    return 0


def token_rows(input_ids: Sequence[int], weights: Sequence[float], labels: Sequence[int], tokenizer) -> list[TokenRow]:
    """Rows for one sequence, with each token's text as it appears in the decoded sequence.

    Decodes incrementally over a sliding window and takes the difference, holding back trailing
    replacement characters (a character still split across tokens) until a later token completes it.
    """
    ids = [int(i) for i in input_ids]
    if not len(ids) == len(weights) == len(labels):
        raise LossmaskError(
            f"cannot show sequence: {len(ids)} token ids but {len(weights)} weights and {len(labels)} labels; "
            "the dataset is inconsistent and should be rebuilt"
        )
    decoder = tokenizer.backend_tokenizer.decoder
    byte_level = decoder is not None and "ByteLevel(" in repr(decoder)
    added_ids = set(tokenizer.added_tokens_decoder)
    pieces = tokenizer.convert_ids_to_tokens(ids)

    def decode(part: list[int]) -> str:
        return tokenizer.decode(part, skip_special_tokens=False, clean_up_tokenization_spaces=False)

    rows: list[TokenRow] = []
    start = 0  # first token of the current window
    shown = ""  # text of the window already given to rows
    tail = b""  # last bytes of the sequence so far, to find a split character
    clean = [0]  # tokens that begin on a character boundary: the only safe places to start a window
    for i, token in enumerate(ids):
        window = decode(ids[start : i + 1])
        ready = window if i == len(ids) - 1 else window.rstrip(REPLACEMENT)
        if not ready.startswith(shown):  # a byte-fallback run reads as replacement characters until complete
            ready = shown
        held = ready != window
        own = _token_bytes(pieces[i] or "", byte_level, token in added_ids)
        tail = (tail + own)[-4:]
        incomplete = _incomplete_tail(tail)
        split = min(incomplete, len(own)) if held or i == len(ids) - 1 else 0
        rows.append(TokenRow(token, ready[len(shown) :], float(weights[i]), int(labels[i]), own[-split:] if split else b""))
        shown = ready
        if not incomplete:
            clean.append(i + 1)
        if not held and i + 1 - start >= _WINDOW:
            start = max((j for j in clean[-_WINDOW:] if j <= i + 1 - _CONTEXT), default=start)
            shown = decode(ids[start : i + 1])
    return rows


# ---------------------------------------------------------------------------------------------------
# shared presentation facts


def label_name(label: int) -> str:
    try:
        return Label(label).name
    except ValueError:
        return f"label {label}"


def format_weight(weight: float) -> str:
    return f"{weight:.4g}"


def _kind(row: TokenRow) -> str:
    """trained (weight 1), masked (weight 0), weighted (any other weight) or pad (untrained padding)."""
    if row.weight == 0:
        return "pad" if row.label == Label.PAD else "masked"
    return "trained" if row.weight == 1 else "weighted"


_CONTROL = {i: chr(0x2400 + i) for i in range(32) if i not in (9, 10)} | {0x7F: "\u2421", 13: "\u240d"}


def _visible(text: str) -> str:
    """Token text with newlines marked (↵ then a real break) and other control characters as symbols."""
    return text.translate(_CONTROL).replace("\n", "↵\n")


def _shown(row: TokenRow) -> str:
    partial = f"⟨{row.partial.hex(' ')}⟩" if row.partial else ""
    body = _visible(row.text) + partial
    return body if body else "∅"


def episode_summary(rows: Iterable[TokenRow]) -> dict:
    """Counts shown under each episode: tokens, trained tokens, trained fraction, distinct weights."""
    rows = list(rows)
    trained = sum(1 for r in rows if r.weight != 0)
    weights = sorted({r.weight for r in rows})
    return {
        "tokens": len(rows),
        "trained": trained,
        "fraction": trained / len(rows) if rows else 0.0,
        "weights": weights,
    }


def summary_line(rows: Iterable[TokenRow]) -> str:
    s = episode_summary(rows)
    weights = s["weights"]
    if len(weights) > _MAX_LISTED_WEIGHTS:
        listed = f"{len(weights)} distinct, {format_weight(weights[0])}..{format_weight(weights[-1])}"
    else:
        listed = ", ".join(format_weight(w) for w in weights) or "none"
    return f"{s['tokens']} tokens · {s['trained']} trained ({s['fraction']:.1%}) · weights: {listed}"


def _hover(row: TokenRow) -> str:
    text = f"id {row.id} · {row.text!r}"
    if row.partial:
        text += f" + bytes {row.partial.hex(' ')}"
    return f"{text} · weight {format_weight(row.weight)} · {label_name(row.label)}"


def _weight_strength(weight: float) -> float:
    """0..1: how strongly to colour a weight other than 0 and 1 (below 1 by weight, above 1 up to 4)."""
    if weight < 1:
        return max(0.15, min(1.0, abs(weight)))
    return min(1.0, (weight - 1) / 3 + 0.3)


def _mix(light: tuple[int, int, int], strong: tuple[int, int, int], t: float) -> str:
    r, g, b = (round(a + (c - a) * t) for a, c in zip(light, strong))
    return f"#{r:02x}{g:02x}{b:02x}"


_UNDER_ONE = ((255, 236, 204), (255, 153, 0))  # orange: down-weighted
_OVER_ONE = ((236, 214, 255), (150, 60, 230))  # purple: up-weighted


def _weighted_colour(weight: float, odd: bool) -> str:
    light, strong = _UNDER_ONE if weight < 1 else _OVER_ONE
    t = _weight_strength(weight) - (0.25 if odd else 0.0)
    return _mix(light, strong, max(0.05, t))


# ---------------------------------------------------------------------------------------------------
# terminal


_CONSOLE_STYLES = {
    "trained": ("black on #9be39b", "black on #6cc86c"),
    "masked": ("dim #9a9a9a on #2a2a2a", "dim #9a9a9a on #3a3a3a"),
    "pad": ("italic #6f6f9f on #15152a", "italic #6f6f9f on #20203a"),
}


def console_legend() -> Text:
    legend = Text("legend: ")
    legend.append(" trained (1) ", _CONSOLE_STYLES["trained"][0])
    legend.append(" ")
    legend.append(" masked (0) ", _CONSOLE_STYLES["masked"][0])
    legend.append(" ")
    legend.append(" weighted 0.5 ", f"black on {_weighted_colour(0.5, False)}")
    legend.append(" ")
    legend.append(" weighted 2 ", f"black on {_weighted_colour(2.0, False)}")
    legend.append(" ")
    legend.append(" padding ", _CONSOLE_STYLES["pad"][0])
    legend.append("  ↵ newline · ⟨f0 9f⟩ split character · shades alternate per token")
    return legend


def print_episode(console: Console, rows: Sequence[TokenRow], title: str, legend: bool = True) -> None:
    """Print one sequence, each token coloured by its weight, then its summary line."""
    if legend:
        console.print(console_legend())
    console.rule(Text(title))
    body = Text()
    for i, row in enumerate(rows):
        kind = _kind(row)
        odd = i % 2 == 1
        style = f"black on {_weighted_colour(row.weight, odd)}" if kind == "weighted" else _CONSOLE_STYLES[kind][odd]
        for n, part in enumerate(_shown(row).split("\n")):
            if n:
                body.append("\n")  # unstyled, so the background does not run to the end of the line
            body.append(part, style)
    console.print(body, soft_wrap=False, overflow="fold")
    console.print(Text(summary_line(rows), style="bold"))


# ---------------------------------------------------------------------------------------------------
# HTML


_CSS = """
body { font-family: system-ui, sans-serif; margin: 1.5rem 2rem; background: #fbfbfb; color: #222; }
h1 { font-size: 1.4rem; margin: 0 0 .8rem; }
h2 { font-size: 1.05rem; margin: 0 0 .3rem; font-family: ui-monospace, monospace; word-break: break-all; }
table.summary { border-collapse: collapse; margin: .5rem 0 1rem; font-size: .9rem; }
table.summary th, table.summary td { border: 1px solid #ddd; padding: .2rem .6rem; text-align: left;
  vertical-align: top; }
table.summary th { background: #f0f0f0; font-weight: 600; }
table.summary td { font-family: ui-monospace, monospace; white-space: pre-wrap; }
.legend { position: sticky; top: 0; background: #fbfbfbee; padding: .5rem 0; border-bottom: 1px solid #ddd;
  font-size: .9rem; z-index: 1; }
.legend span.k { margin-right: .8rem; }
nav { font-size: .85rem; margin: .6rem 0 1rem; }
nav a { margin-right: .8rem; }
section { margin: 1.2rem 0 2rem; padding: .8rem 1rem; background: #fff; border: 1px solid #e2e2e2;
  border-radius: 6px; }
.stats { color: #555; font-size: .85rem; margin-bottom: .6rem; }
.toks { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; font-size: 13.5px;
  line-height: 1.75; white-space: pre-wrap; overflow-wrap: anywhere; }
.toks span, .legend span.s { border-radius: 2px; }
.trained.a { background: #b9ebb1; color: #0c3b0c; }
.trained.b { background: #8fd985; color: #0c3b0c; }
.masked.a { background: #f2f2f2; color: #7a7a7a; }
.masked.b { background: #dadada; color: #7a7a7a; }
.weighted { color: #2a1a00; }
.pad { color: #9a9ac0; font-style: italic;
  background: repeating-linear-gradient(135deg, #eeeef8 0 4px, #e0e0ef 4px 8px); }
.partial { color: #b03030; font-size: .8em; }
"""


def _span(row: TokenRow, odd: bool) -> str:
    kind = _kind(row)
    shade = "b" if odd else "a"
    style = f' style="background:{_weighted_colour(row.weight, odd)}"' if kind == "weighted" else ""
    partial = f'<i class="partial">⟨{row.partial.hex(" ")}⟩</i>' if row.partial else ""
    body = html.escape(_visible(row.text)) + partial
    return f'<span class="{kind} {shade}"{style} title="{html.escape(_hover(row))}">{body or "∅"}</span>'


def _html_legend() -> str:
    samples = [
        ('<span class="s trained a">trained</span>', "weight 1"),
        ('<span class="s masked a">masked</span>', "weight 0"),
        (f'<span class="s weighted" style="background:{_weighted_colour(0.5, False)}">0.5</span>', "weight below 1"),
        (f'<span class="s weighted" style="background:{_weighted_colour(2.0, False)}">2</span>', "weight above 1"),
        ('<span class="s pad">pad</span>', "padding"),
        ("↵", "newline"),
        ('<i class="partial">⟨f0 9f⟩</i>', "bytes of a character split over tokens"),
    ]
    keys = "".join(f'<span class="k">{s} {html.escape(d)}</span>' for s, d in samples)
    return (
        f'<div class="legend">{keys}<br><small>Alternating shades mark token boundaries; hover a token for its '
        "id, text, weight and label.</small></div>"
    )


def _summary_value(value) -> str:
    if isinstance(value, (dict, list, tuple)):
        return json.dumps(value, ensure_ascii=False, indent=1, default=str)
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def _summary_table(summary: dict) -> str:
    rows = "".join(
        f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(_summary_value(v))}</td></tr>" for k, v in summary.items()
    )
    return f'<table class="summary">{rows}</table>'


def html_page(episodes: list[tuple[str, list[TokenRow]]], title: str, summary: dict | None = None) -> str:
    """A standalone page (inline CSS, no scripts, no network): one section per sequence."""
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
    ]
    if summary:
        parts.append(_summary_table(summary))
    parts.append(_html_legend())
    if len(episodes) > 1:
        links = "".join(f'<a href="#ep{n}">{html.escape(t)}</a>' for n, (t, _) in enumerate(episodes))
        parts.append(f"<nav>{links}</nav>")
    for n, (ep_title, rows) in enumerate(episodes):
        tokens = "".join(_span(row, i % 2 == 1) for i, row in enumerate(rows))
        parts.append(
            f'<section id="ep{n}"><h2>{html.escape(ep_title)}</h2>'
            f'<div class="stats">{html.escape(summary_line(rows))}</div>'
            f'<div class="toks">{tokens}</div></section>'
        )
    parts.append("</body></html>\n")
    return "\n".join(parts)


def write_html(path: str | os.PathLike, page: str) -> None:
    """Write the page atomically: a reader never sees half a file."""
    write_text(path, page)