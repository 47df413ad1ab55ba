"""Pre-training replay buffers (``lossmask replay``): plain text cut into ``{"_replay": true, "text": ...}``.

Mixing a little pre-training text into every fine-tuning phase (``lossmask mix``) keeps the model's
general language ability from drifting. Replay episodes are trained on every token (the text renderer
does that, without EOS), so each one must fit the training length: every episode holds at most
``max_tokens`` tokens of the given tokenizer, counted on its text alone (``add_special_tokens=False``;
a BOS the renderer writes is not counted, so leave room for it).

Inputs, one kind per path:

- a prepared dataset directory (``dataset_metadata.json``): each episode of ``split`` is a document,
  its tokens decoded with the dataset's own tokenizer (special tokens and padding dropped). Meant for
  datasets of pre-training text; a chat dataset would decode to its template text.
- ``.jsonl`` / ``.jsonl.gz``: each non-blank line is a document, its ``text`` field (a string).
- any other file (``.txt``, ``.txt.gz``, ...): UTF-8 plain text. ``documents="file"`` (default): the file
  is one document, streamed. ``documents="blank-line"``: documents are separated by one or more
  blank (whitespace-only) lines, which are dropped; each document is held in memory while it is cut.
  A document's final line break belongs to the separator and is dropped; a byte-order mark is dropped.

Cutting (``chunk_text``): a document is tokenized window by window (about 8 characters per allowed
token, widened when a window holds fewer tokens) with character offsets. The cut goes at the start of
token ``max_tokens`` (so the chunk is the first ``max_tokens`` tokens), moved earlier to a nicer place
inside the last 10% of the chunk (from the start of token ``0.9 * max_tokens``), preferring, in order:

1. ``paragraph``: right after the last blank line (the next chunk starts with the new paragraph);
2. ``sentence``: right after the last sentence end (``.!?…`` followed by whitespace, or ``。！？``),
   before the whitespace;
3. ``whitespace``: right before the last whitespace run;
4. ``token``: the token boundary itself.

A cut never splits a character (offsets are characters, not bytes) and never separates a combining
mark, variation selector or zero-width joiner from the character before it. The chunk is re-tokenized
alone and cut again at its own token ``max_tokens`` while it has too many (boundaries can shift
when text is cut), so the bound holds exactly. The chunks of a document concatenate back to it
character for character; chunks that are only whitespace are dropped and counted. A single character
(with the marks and joiners attached to it) that needs more than ``max_tokens`` tokens, only possible
for tiny limits, stays whole. A chunk cut again after re-tokenizing is reported as a ``token`` cut.

Sampling: every chunk is written to a temporary file first; with ``max_episodes`` a uniform sample of
that many chunks (seeded) is kept, in input order. Output is atomic JSONL; each record carries
``_meta`` with its origin (``source``, ``line`` or ``episode``, ``chunk`` index in its document) and
``tokens``. Memory: one window of text, or one document in blank-line mode, plus 4 bytes per chunk
(its token count) and, when sampling, 8 bytes per chunk for the draw.
"""
from __future__ import annotations

import json
import os
import re
import tempfile
import unicodedata
from array import array
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from lossmask.errors import InputError, InputProblem, LossmaskError
from lossmask.atomic import atomic_file
from lossmask.mix import json_object, open_lines
from lossmask.tokenizer import exact_backend

DOCUMENTS: tuple[str, ...] = ("file", "blank-line")
CUTS: tuple[str, ...] = ("paragraph", "sentence", "whitespace", "token", "end")
_CHARS_PER_TOKEN = 8  # first window size per allowed token; widened when a window holds too few tokens
_NICE_FROM = 0.9  # nicer cuts are looked for from the start of this fraction of max_tokens
_PARAGRAPH = re.compile(r"\n[ \t\r\f\v]*\n\s*")
_SENTENCE = re.compile(r"[.!?…][\"'”’»)\]]*(?=\s)|[。！？]")
_WHITESPACE = re.compile(r"\S(?=\s)")
_JOINERS = frozenset("\u200c\u200d\ufe0e\ufe0f")


@dataclass(frozen=True)
class Chunk:
    """One piece of a document: its text, its token count alone, and how the cut after it was chosen."""

    text: str
    tokens: int
    cut: str  # one of CUTS; "end" = the document ended here


@dataclass
class ReplayReport:
    output: str
    max_tokens: int
    documents: int = 0
    chunks: int = 0  # chunks made, before sampling
    episodes: int = 0  # chunks written
    tokens: int = 0  # tokens of the chunks written
    chars: int = 0  # characters of the chunks written
    blank_chunks: int = 0  # whitespace-only chunks dropped
    cuts: Counter = field(default_factory=Counter)  # how the chunks made were cut
    per_input: dict[str, tuple[int, int]] = field(default_factory=dict)  # path -> (documents, chunks)


def build_replay(
    inputs: Sequence[str | os.PathLike],
    output: str | os.PathLike,
    tokenizer=None,
    *,
    max_tokens: int,
    split: str = "train",
    documents: str = "file",
    max_episodes: int | None = None,
    seed: int = 0,
    trust_remote_code: bool = False,
) -> ReplayReport:
    """Cut ``inputs`` into replay episodes of at most ``max_tokens`` tokens and write them to ``output``.

    ``tokenizer`` (object or path) counts the tokens; without it, the first dataset input's tokenizer.
    """
    if max_tokens < 1:
        raise LossmaskError(f"--max-tokens must be at least 1, got {max_tokens}")
    if documents not in DOCUMENTS:
        raise ValueError(f"documents must be one of {DOCUMENTS}, got {documents!r}")
    if max_episodes is not None and max_episodes < 0:
        raise LossmaskError(f"--max-episodes must be >= 0, got {max_episodes}")
    if seed < 0:
        raise LossmaskError(f"--seed must be >= 0, got {seed}")
    if not inputs:
        raise LossmaskError("replay needs at least one input")
    tok = exact_backend(_counting_tokenizer(tokenizer, [str(p) for p in inputs], trust_remote_code))
    report = ReplayReport(str(output), max_tokens)
    out = Path(output)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{out.name}.", dir=out.parent) as tmp:
        made = Path(tmp) / "chunks.jsonl"
        tokens = array("I")
        with open(made, "wb") as f:
            for path in inputs:
                n_docs = n_chunks = 0
                for where, pieces in _documents(str(path), documents, split, trust_remote_code):
                    n_docs += 1
                    for j, chunk in enumerate(chunk_text(pieces, tok, max_tokens)):
                        report.cuts[chunk.cut] += 1
                        if chunk.text.isspace():
                            report.blank_chunks += 1
                            continue
                        record = {"_replay": True, "text": chunk.text, "_meta": {**where, "chunk": j,
                                                                                 "tokens": chunk.tokens}}
                        f.write(json.dumps(record, ensure_ascii=False).encode("utf-8") + b"\n")
                        tokens.append(chunk.tokens)
                        n_chunks += 1
                report.documents += n_docs
                report.chunks += n_chunks
                report.per_input[str(path)] = (n_docs, n_chunks)
        counts = np.frombuffer(tokens, dtype=np.uint32) if len(tokens) else np.empty(0, dtype=np.uint32)
        keep = np.arange(len(counts))
        if max_episodes is not None and max_episodes < len(counts):
            rng = np.random.default_rng(np.random.SeedSequence(seed))
            keep = np.sort(rng.choice(len(counts), max_episodes, replace=False))
        report.episodes = len(keep)
        report.tokens = int(counts[keep].sum(dtype=np.int64))
        with atomic_file(out) as dst, open(made, "rb") as src:
            at = 0
            for i, line in enumerate(src):
                if at == len(keep):
                    break
                if keep[at] == i:
                    dst.write(line)
                    report.chars += len(json.loads(line)["text"])
                    at += 1
    return report


def chunk_text(pieces: Iterable[str], tokenizer, max_tokens: int) -> Iterator[Chunk]:
    """Cut the text given as ``pieces`` into chunks of at most ``max_tokens`` tokens (module docstring).

    ``tokenizer``: a ``tokenizers.Tokenizer`` or a transformers fast tokenizer (see ``exact_backend``).
    """
    backend = exact_backend(tokenizer)
    source = iter(pieces)
    buf = ""
    want = _CHARS_PER_TOKEN * max_tokens
    done = False
    while True:
        if not done and len(buf) < want:
            parts = [buf]
            have = len(buf)
            for piece in source:
                parts.append(piece)
                have += len(piece)
                if have >= want:
                    break
            else:
                done = True
            buf = "".join(parts)
        if not buf:
            return
        window = buf[:want]
        starts = _starts(backend, window)
        if len(starts) <= max_tokens:
            if done and len(window) == len(buf):
                yield Chunk(buf, len(starts), "end")
                return
            want *= 2
            continue
        cut, kind = _nice_cut(window, starts, max_tokens)
        cut, count, refit = _fit(backend, window, cut, max_tokens)
        yield Chunk(buf[:cut], count, "token" if refit else kind)
        buf = buf[cut:]


def print_replay_report(report: ReplayReport, console: Console | None = None) -> None:
    """Documents, chunks and episodes per input, then how the chunks were cut."""
    console = console or Console()
    console.print(f"[bold]lossmask replay[/] → {report.output} (≤ {report.max_tokens:,} tokens an episode)")
    table = Table()
    table.add_column("input", overflow="fold")
    table.add_column("documents", justify="right")
    table.add_column("chunks", justify="right")
    for path, (docs, chunks) in report.per_input.items():
        table.add_row(path, f"{docs:,}", f"{chunks:,}")
    table.add_row("[bold]total[/]", f"{report.documents:,}", f"{report.chunks:,}")
    console.print(table)
    mean = report.tokens / report.episodes if report.episodes else 0.0
    console.print(f"episodes written: {report.episodes:,} ({report.tokens:,} tokens, {mean:,.0f} per episode, "
                  f"{report.chars:,} characters)")
    console.print("cuts: " + ", ".join(f"{k} {report.cuts[k]:,}" for k in CUTS if report.cuts[k]))
    if report.blank_chunks:
        console.print(f"[yellow]dropped {report.blank_chunks:,} whitespace-only chunks[/]")


# ---- cutting ---------------------------------------------------------------------------------------


def _starts(backend, text: str) -> list[int]:
    return [start for start, _ in backend.encode(text, add_special_tokens=False).offsets]


def _nice_cut(text: str, starts: list[int], n: int) -> tuple[int, str]:
    """The cut before token ``n`` moved back to a paragraph, sentence or whitespace boundary if one is near."""
    cut = starts[n]
    lo = starts[int(n * _NICE_FROM)]
    for kind, pattern in (("paragraph", _PARAGRAPH), ("sentence", _SENTENCE), ("whitespace", _WHITESPACE)):
        # the lookaheads may look at the character at the cut; a paragraph's blank run must end before it
        region = text[lo:cut] if kind == "paragraph" else text[lo : cut + 1]
        ends = [lo + m.end() for m in pattern.finditer(region) if lo + m.end() <= cut]
        at = _safe(text, ends[-1]) if ends else 0
        if at > 0:
            return at, kind
    at = _safe(text, cut)
    return (at, "token") if at > 0 else (_first_char_end(text), "token")


def _fit(backend, text: str, cut: int, n: int) -> tuple[int, int, bool]:
    """Shorten ``text[:cut]`` until it alone has at most ``n`` tokens; (cut, its tokens, whether cut again)."""
    refit = False
    while True:
        starts = _starts(backend, text[:cut])
        if len(starts) <= n:
            return cut, len(starts), refit
        shorter = _safe(text, starts[n])
        if not 0 < shorter < cut:
            return cut, len(starts), refit  # one character needing more than n tokens stays whole
        cut, refit = shorter, True


def _safe(text: str, at: int) -> int:
    """``at`` moved back so no mark, variation selector or joiner is cut off from the character it belongs to."""
    while 0 < at < len(text) and (_attaches(text[at]) or text[at - 1] in _JOINERS):
        at -= 1
    return at


def _attaches(char: str) -> bool:
    return unicodedata.category(char).startswith("M") or char in _JOINERS


def _first_char_end(text: str) -> int:
    at = 1
    while at < len(text) and _safe(text, at) == 0:
        at += 1
    return at


# ---- reading documents -----------------------------------------------------------------------------


def _documents(path: str, mode: str, split: str, trust_remote_code: bool) -> Iterator[tuple[dict, Iterable[str]]]:
    """(origin for ``_meta``, text pieces) per document; each document is consumed before the next."""
    if Path(path).is_dir():
        yield from _dataset_documents(path, split, trust_remote_code)
    elif path.endswith((".jsonl", ".jsonl.gz")):
        yield from _jsonl_documents(path)
    elif mode == "file":
        yield {"source": path, "line": 1}, _file_text(path)
    else:
        yield from _paragraph_documents(path)


def _text_lines(path: str) -> Iterator[tuple[int, str]]:
    for lineno, raw in open_lines(path):
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise InputError(InputProblem(path, lineno, "bad_utf8", f"invalid UTF-8 at byte {exc.start} of the line",
                                          hint="save the file as UTF-8, e.g. iconv -f latin1 -t utf-8")) from None
        yield lineno, text.removeprefix("\ufeff") if lineno == 1 else text


def _file_text(path: str) -> Iterator[str]:
    """The file's lines, the final line break dropped (one line held back to know which is last)."""
    held = None
    for _, line in _text_lines(path):
        if held is not None:
            yield held
        held = line
    if held is not None:
        yield _drop_break(held)


def _paragraph_documents(path: str) -> Iterator[tuple[dict, list[str]]]:
    lines: list[str] = []
    first = 0
    for lineno, line in _text_lines(path):
        if line.isspace() or not line:
            if lines:
                yield {"source": path, "line": first}, [*lines[:-1], _drop_break(lines[-1])]
            lines = []
            continue
        first = first if lines else lineno
        lines.append(line)
    if lines:
        yield {"source": path, "line": first}, [*lines[:-1], _drop_break(lines[-1])]


def _drop_break(line: str) -> str:
    return line[:-2] if line.endswith("\r\n") else line.removesuffix("\n")


def _jsonl_documents(path: str) -> Iterator[tuple[dict, list[str]]]:
    for lineno, raw in open_lines(path):
        if raw.isspace():
            continue
        text = json_object(raw, path, lineno).get("text")
        if not isinstance(text, str):
            raise InputError(InputProblem(path, lineno, "missing_field", "line has no \"text\" string", "text",
                                          'replay reads {"text": "..."} lines from JSONL; or give a .txt file'))
        yield {"source": path, "line": lineno}, [text]


def _dataset_documents(path: str, split: str, trust_remote_code: bool) -> Iterator[tuple[dict, list[str]]]:
    from lossmask.render.base import Label
    from lossmask.store import load_tokenizer_of, open_dataset

    ds = open_dataset(path, split)
    decoder = load_tokenizer_of(path, trust_remote_code)
    for i in range(ds.num_episodes):
        item = ds.episode(i)
        ids = np.asarray(item["input_ids"])[np.asarray(item["labels"]) != Label.PAD]
        text = decoder.decode(ids.tolist(), skip_special_tokens=True, clean_up_tokenization_spaces=False)
        yield {"source": path, "split": split, "episode": i}, [text]


def _counting_tokenizer(tokenizer, inputs: list[str], trust_remote_code: bool):
    from lossmask.tokenizer import load_tokenizer

    if tokenizer is None:
        datasets = [p for p in inputs if Path(p).is_dir()]
        if not datasets:
            raise LossmaskError(
                "replay needs --tokenizer to count tokens (or a dataset input, whose tokenizer is used)"
            )
        from lossmask.store import load_tokenizer_of

        return load_tokenizer_of(datasets[0], trust_remote_code)
    if isinstance(tokenizer, (str, os.PathLike)):
        return load_tokenizer(str(tokenizer), trust_remote_code=trust_remote_code)
    return tokenizer


__all__ = ["CUTS", "DOCUMENTS", "Chunk", "ReplayReport", "build_replay", "chunk_text", "print_replay_report"]
