"""Blending JSONL sources in set proportions (``lossmask mix``), and the cross-phase replay schedule.

Weights. ``--inputs a.jsonl:19.0 b.jsonl:1.0`` gives each source a *relative weight*; weights are
normalised to the proportions of the output: a source's share is its weight over the sum of all
weights. So ``:19.0`` next to ``:1.0`` is a 95% / 5% blend whatever the file sizes, and weights that
already sum to 1 are the proportions themselves: ``sft.jsonl:0.85 replay.jsonl:0.15`` gives a 15%
replay slice. This is the reading under which both recipe spellings mean what they say; the other
reading (a weight >= 1 is "copies of the source", < 1 a "fraction of the source") would make
``:19.0`` repeat a file 19 times and give 95% / 5% only when both files have the same size. Note that
``a:1.0 replay:0.15`` is therefore a 0.15 / 1.15 = 13.0% slice; the composition table prints every
source's proportion so this cannot go unnoticed. A spec without ``:WEIGHT`` has weight 1; a path that
contains ``:`` needs an explicit weight (``c:/data/a.jsonl:1``).

Size. Without ``total`` the output is as large as possible with the scarcest source used in full and
no line repeated: ``total = min(lines_i / proportion_i)`` (rounded down). Line counts per source are
the proportions of ``total`` rounded by largest remainder (ties to the earlier source), so they add up
to ``total`` exactly. With ``total``, a source whose share needs more lines than it has is an error,
unless ``allow_repeat``: then the source is used in whole passes plus a random remainder (each line
taken ``k`` or ``k + 1`` times), and the repeats are counted in the report.

Lines. Blank lines are not lines (skipped, not counted). Every other line must be a UTF-8 JSON object;
a bad one is an error naming file:line, or with ``on_error="skip"`` is left out and counted. Each output
line is the input line byte for byte (a UTF-8 byte-order mark dropped, a final newline added), or with
``tag_source`` the record re-serialised with ``_meta.mix_source`` set to the source path as given.

Which lines. Per source, the chosen lines are a uniform random sample without replacement (seeded by
``seed`` and the source's position), so the same inputs and seed give the same bytes. It is drawn block
by block (a hypergeometric number of picks per block of 65,536 lines), so its memory is that of the
sample, not of the source (numpy's hypergeometric limits a source to 10⁹ lines).

Order. Without ``shuffle`` the output is the sources in input order, each source's chosen lines in
file order. With ``shuffle`` the output is a uniformly random permutation of the chosen lines (seeded),
made with bounded memory by an external shuffle: lines are dealt to random bucket files, a bucket that
fits in ``shuffle_memory`` bytes is permuted in memory, a larger one is dealt again (Rao-Sandelius). A
random bucket assignment followed by a uniform permutation of each bucket is a uniform permutation.
Bucket files per round are bounded so their write buffers take at most a quarter of the budget.

Memory. Two streaming passes: the first counts and checks the lines of every file, the second copies
the chosen ones. What is held is the chosen line numbers (an int64 array, 8 bytes per output line), the
numbers of bad lines when skipping them, one line at a time, and while shuffling one bucket of at most
``shuffle_memory`` bytes (about twice that as bytes plus its split lines). Temporary files live beside the output; the output is renamed into place only
once complete.

Replay schedule. Each training phase replays a small share (1-5%) of every earlier phase plus 5%
pre-training text (``lossmask replay`` builds that file). ``replay_schedule`` turns this into mix
inputs; for phase 3 of a curriculum::

    >>> [str(i) for i in replay_schedule("p3.jsonl", ["p1.jsonl", "p2.jsonl"], "pretrain.jsonl")]
    ['p3.jsonl:0.89', 'p1.jsonl:0.03', 'p2.jsonl:0.03', 'pretrain.jsonl:0.05']

that is ``lossmask mix --inputs p3.jsonl:0.89 p1.jsonl:0.03 p2.jsonl:0.03 pretrain.jsonl:0.05
--shuffle``. The output is sized by the scarcest source: when an earlier phase is too small for its
share, the current phase is not used in full; pass ``total`` (lines of the current phase / 0.89) with
``allow_repeat`` to keep all of it and repeat the small phase instead.
"""
from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import IO

import numpy as np
from rich.console import Console
from rich.table import Table

from lossmask.atomic import atomic_file
from lossmask.errors import InputError, InputProblem, LossmaskError
from lossmask.sources import open_input

ON_ERROR: tuple[str, ...] = ("fail", "skip")
DEFAULT_SHUFFLE_MEMORY = 64 << 20
MAX_PROBLEMS_KEPT = 100  # problems listed in a report; the rest are counted
_MAX_BUCKETS = 256  # bucket files open at once while shuffling
_BUCKET_BUFFER = 16 << 10  # write buffer of each bucket file; all of them fit in a quarter of the budget
_SAMPLE_BLOCK = 1 << 16  # lines sampled at a time (numpy draws from a block with a temporary of 8 bytes a line)
_BOM = b"\xef\xbb\xbf"


@dataclass(frozen=True)
class MixInput:
    """One source of a mix: a JSONL file and its relative weight."""

    path: str
    weight: float

    def __str__(self) -> str:
        return f"{self.path}:{self.weight!r}"


@dataclass
class MixSourceReport:
    """What one source contributed: ``proportion`` is the target share, ``taken / total`` the actual one."""

    path: str
    weight: float
    proportion: float
    available: int  # valid, non-blank lines
    taken: int  # output lines from this source, repeats included
    repeats: int  # output lines beyond the first use of a line
    chars: int  # characters of the lines taken (JSON text, newline excluded)
    skipped: int = 0  # bad lines left out (on_error="skip")


@dataclass
class MixReport:
    output: str
    total: int
    seed: int
    shuffled: bool
    sources: list[MixSourceReport]
    problems: list[InputProblem] = field(default_factory=list)  # the first MAX_PROBLEMS_KEPT skipped lines

    @property
    def skipped(self) -> int:
        return sum(s.skipped for s in self.sources)


def parse_input(spec: str) -> MixInput:
    """``PATH:WEIGHT`` (or ``PATH``, weight 1) → MixInput; the weight must be a finite number > 0."""
    path, sep, tail = spec.rpartition(":")
    if not sep:
        path, tail = spec, "1.0"
    try:
        weight = float(tail)
    except ValueError:
        raise LossmaskError(
            f"mix input {spec!r}: weight {tail!r} is not a number; write PATH:WEIGHT, e.g. a.jsonl:0.7 "
            "(a path containing ':' needs an explicit weight)"
        ) from None
    if not path:
        raise LossmaskError(f"mix input {spec!r} has no path; write PATH:WEIGHT, e.g. a.jsonl:0.7")
    _check_weight(path, weight)
    return MixInput(path, weight)


def replay_schedule(
    current: str,
    earlier: Sequence[str],
    pretrain: str | None = None,
    *,
    earlier_share: float = 0.03,
    pretrain_share: float = 0.05,
) -> list[MixInput]:
    """Mix inputs for one phase: ``earlier_share`` of each earlier phase, ``pretrain_share`` of pre-training
    replay, the rest the current phase (weights are the proportions; see the module docstring)."""
    if not 0 < earlier_share < 1 or not 0 <= pretrain_share < 1:
        raise LossmaskError(
            f"replay shares must be in (0, 1) for earlier phases and [0, 1) for pre-training text, got "
            f"{earlier_share} and {pretrain_share} (the recipe uses 0.01-0.05 and 0.05)"
        )
    shares = [Fraction(repr(float(earlier_share)))] * len(earlier)
    paths = list(earlier)
    if pretrain is not None and pretrain_share > 0:
        shares.append(Fraction(repr(float(pretrain_share))))
        paths.append(pretrain)
    rest = 1 - sum(shares)
    if rest <= 0:
        raise LossmaskError(
            f"replay takes {float(sum(shares)):.0%} of the mix ({len(earlier)} earlier phases × {earlier_share} "
            f"+ {pretrain_share} pre-training), leaving nothing for {current}; lower the shares"
        )
    return [MixInput(current, float(rest))] + [MixInput(p, float(s)) for p, s in zip(paths, shares)]


def mix(
    inputs: Sequence[str | MixInput],
    output: str | os.PathLike,
    *,
    total: int | None = None,
    shuffle: bool = False,
    seed: int = 0,
    allow_repeat: bool = False,
    tag_source: bool = False,
    on_error: str = "fail",
    shuffle_memory: int = DEFAULT_SHUFFLE_MEMORY,
) -> MixReport:
    """Write a blend of ``inputs`` (``"path:weight"`` or MixInput) to ``output``; see the module docstring."""
    if on_error not in ON_ERROR:
        raise ValueError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")
    if seed < 0:
        raise LossmaskError(f"--seed must be >= 0, got {seed}")
    if total is not None and total < 1:
        raise LossmaskError(f"--total must be at least 1, got {total}")
    sources = [parse_input(i) if isinstance(i, str) else i for i in inputs]
    if not sources:
        raise LossmaskError("mix needs at least one input")
    for s in sources:
        _check_weight(s.path, s.weight)
    problems: list[InputProblem] = []
    scans = [_scan(s.path, on_error, problems) for s in sources]
    weights = [Fraction(repr(float(s.weight))) for s in sources]
    counts = plan_counts(sources, weights, [n for n, _ in scans], total, allow_repeat)
    reports = [
        MixSourceReport(s.path, s.weight, float(w / sum(weights)), n, taken, max(0, taken - n), 0, len(bad))
        for s, w, (n, bad), taken in zip(sources, weights, scans, counts)
    ]
    out = Path(output)
    with atomic_file(out) as f, tempfile.TemporaryDirectory(prefix=f".{out.name}.", dir=out.parent) as tmp:
        selected = Path(tmp) / "selected" if shuffle else None
        with open(selected, "wb") if selected else nullcontext(f) as sink:
            for i, (s, (n, bad), report) in enumerate(zip(sources, scans, reports)):
                picks = _picks(n, report.taken, _rng(seed, 0, i))
                report.chars = _copy(s.path, bad, picks, sink, s.path if tag_source else None)
        if selected:
            _shuffle_file(selected, f, _rng(seed, 1), shuffle_memory)
    return MixReport(str(out), sum(counts), seed, shuffle, reports, problems)


def plan_counts(
    sources: Sequence[MixInput], weights: Sequence[Fraction], available: Sequence[int], total: int | None,
    allow_repeat: bool,
) -> list[int]:
    """Lines per source: proportions of ``total`` (default: the scarcest source in full), largest remainder."""
    whole = sum(weights)
    for s, n in zip(sources, available):
        if n == 0:
            raise LossmaskError(f"mix input {s.path} has no lines: it cannot make up any share of the output")
    most = min(math.floor(n * whole / w) for n, w in zip(available, weights))
    if total is None:
        total = most
    quotas = [total * w / whole for w in weights]
    counts = [math.floor(q) for q in quotas]
    order = sorted(range(len(quotas)), key=lambda i: (-(quotas[i] - counts[i]), i))
    for i in order[: total - sum(counts)]:
        counts[i] += 1
    short = [(s, w, n, c) for s, w, n, c in zip(sources, weights, available, counts) if c > n]
    if short and not allow_repeat:
        s, w, n, c = short[0]
        raise LossmaskError(
            f"mix input {s.path}:{s.weight!r} is {float(w / whole):.2%} of the output, i.e. {c:,} of "
            f"{total:,} lines, but it has only {n:,} lines. Lower --total to at most {most:,} (every source "
            "used at most once), raise the other weights, or pass --allow-repeat to repeat its lines"
        )
    return counts


def open_lines(path: str) -> Iterator[tuple[int, bytes]]:
    """(line number, raw line) for every line of a file (``.gz`` transparently), one line held at a time."""
    with open_input(path) as f:  # a corrupt .gz too is a LossmaskError naming the file
        yield from enumerate(f, 1)


def json_object(raw: bytes, file: str, line: int) -> dict:
    """A raw line as one UTF-8 JSON object, else InputError naming file:line: the cheap check mix and dedup make."""
    try:
        obj = json.loads(raw.removeprefix(_BOM).decode("utf-8"))
    except UnicodeDecodeError as exc:
        message = f"invalid UTF-8 at byte offset {exc.start} of the line"
        raise InputError(InputProblem(file, line, "bad_utf8", message, hint="save the file as UTF-8")) from None
    except (ValueError, RecursionError) as exc:
        what = f"{exc.msg} at column {exc.colno}" if isinstance(exc, json.JSONDecodeError) else str(exc)
        raise InputError(InputProblem(
            file, line, "bad_json", f"not valid JSON: {what}",
            hint="each line must be one complete JSON object (rewrite pretty-printed JSON with jq -c)",
        )) from None
    if not isinstance(obj, dict):
        raise InputError(InputProblem(file, line, "not_object", "line is not a JSON object",
                                      hint="write one object {...} a line"))
    return obj


def print_mix_report(report: MixReport, console: Console | None = None) -> None:
    """The composition table: per source weight, target and actual share, lines, repeats and characters."""
    console = console or Console()
    order = f"shuffled (seed {report.seed})" if report.shuffled else "sources in input order"
    console.print(f"[bold]lossmask mix[/] → {report.output}: {report.total:,} lines, {order}")
    table = Table()
    table.add_column("source", overflow="fold")
    for name in ("weight", "target", "actual", "available", "taken", "repeats", "chars", "chars/line"):
        table.add_column(name, justify="right")
    for s in report.sources:
        actual = s.taken / report.total if report.total else 0.0
        table.add_row(
            s.path, f"{s.weight:g}", f"{s.proportion:.2%}", f"{actual:.2%}", f"{s.available:,}", f"{s.taken:,}",
            f"{s.repeats:,}", f"{s.chars:,}", f"{s.chars / s.taken:,.0f}" if s.taken else "-",
        )
    console.print(table)
    if report.skipped:
        console.print(f"[yellow]skipped {report.skipped:,} bad lines[/]; first ones:")
        for problem in report.problems[:10]:
            console.print(f"  {problem}")


# ---- passes ----------------------------------------------------------------------------------------


def _check_weight(path: str, weight: float) -> None:
    if not (math.isfinite(weight) and weight > 0):
        raise LossmaskError(f"mix input {path}: weight must be a finite number > 0, got {weight!r}")


def _scan(path: str, on_error: str, problems: list[InputProblem]) -> tuple[int, set[int]]:
    """Count the valid lines of ``path``; bad lines raise (fail) or are returned by number (skip)."""
    count = 0
    bad: set[int] = set()
    for lineno, raw in open_lines(path):
        if raw.isspace():
            continue
        try:
            json_object(raw, path, lineno)
        except InputError as exc:
            if on_error == "fail":
                raise
            bad.add(lineno)
            if len(problems) < MAX_PROBLEMS_KEPT:
                problems.append(exc.problem)
            continue
        count += 1
    return count, bad


def _rng(seed: int, *key: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=key))


def _picks(available: int, take: int, rng: np.random.Generator) -> np.ndarray:
    """Sorted ordinals of the lines to take: whole passes over the source, then a sample without replacement."""
    passes, rest = divmod(take, available)
    sample = _sample(available, rest, rng)
    if passes:
        sample = np.sort(np.concatenate([np.repeat(np.arange(available, dtype=np.int64), passes), sample]))
    return sample


def _sample(n: int, k: int, rng: np.random.Generator) -> np.ndarray:
    """A sorted uniform ``k``-subset of ``range(n)`` in O(k) memory: block by block, the number of picks that
    fall in a block is hypergeometric, and they are drawn inside the block."""
    parts = [np.empty(0, dtype=np.int64)]
    start = 0
    while k:
        size = min(_SAMPLE_BLOCK, n - start)
        here = k if size == n - start else int(rng.hypergeometric(size, n - start - size, k))
        if here:
            parts.append(start + np.sort(rng.choice(size, here, replace=False)).astype(np.int64))
        k -= here
        start += size
    return np.concatenate(parts)


def _copy(path: str, bad: set[int], picks: np.ndarray, sink: IO[bytes], tag: str | None) -> int:
    """Write the valid lines whose ordinal is in ``picks`` (as often as listed); return their characters."""
    chars = 0
    at = 0
    ordinal = -1
    if not len(picks):
        return 0
    for lineno, raw in open_lines(path):
        if raw.isspace() or lineno in bad:
            continue
        ordinal += 1
        if picks[at] != ordinal:
            continue
        line = _tagged(raw, tag, path, lineno) if tag is not None else raw.removeprefix(_BOM).rstrip(b"\n") + b"\n"
        width = len(line.decode("utf-8")) - 1
        while at < len(picks) and picks[at] == ordinal:
            sink.write(line)
            chars += width
            at += 1
        if at == len(picks):
            break
    return chars


def _tagged(raw: bytes, tag: str, path: str, lineno: int) -> bytes:
    obj = json_object(raw, path, lineno)
    meta = obj.get("_meta", {})
    if not isinstance(meta, dict):
        raise InputError(InputProblem(
            path, lineno, "bad_type", "--tag-source cannot add mix_source: _meta is not an object", "_meta",
            "make _meta an object, or mix without --tag-source",
        ))
    obj["_meta"] = {**meta, "mix_source": tag}
    return json.dumps(obj, ensure_ascii=False).encode("utf-8") + b"\n"


def _shuffle_file(src: Path, dst: IO[bytes], rng: np.random.Generator, memory: int) -> None:
    """Append the lines of ``src`` to ``dst`` in a uniformly random order, holding at most ~``memory`` bytes."""
    if src.stat().st_size <= memory:
        lines = src.read_bytes().split(b"\n")[:-1]
        for i in rng.permutation(len(lines)):
            dst.write(lines[i] + b"\n")
        src.unlink()
        return
    n = max(2, min(_MAX_BUCKETS, memory // (4 * _BUCKET_BUFFER), 2 * math.ceil(src.stat().st_size / memory)))
    paths = [src.with_name(f"{src.name}.{b}") for b in range(n)]
    files = [open(p, "wb", buffering=_BUCKET_BUFFER) for p in paths]
    lines = 0
    try:
        with open(src, "rb") as f:
            buckets: Iterator[int] = iter(())
            for line in f:
                b = next(buckets, None)
                if b is None:
                    buckets = iter(rng.integers(n, size=4096).tolist())
                    b = next(buckets)
                files[b].write(line)
                lines += 1
    finally:
        for file in files:
            file.close()
    if lines <= 1:  # one line bigger than the budget: nothing to permute
        for p in paths:
            dst.write(p.read_bytes())
            p.unlink()
        src.unlink()
        return
    src.unlink()
    for p in paths:
        _shuffle_file(p, dst, rng, memory)


__all__ = [
    "DEFAULT_SHUFFLE_MEMORY", "ON_ERROR", "MixInput", "MixReport", "MixSourceReport", "json_object",
    "mix", "open_lines", "parse_input", "plan_counts", "print_mix_report", "replay_schedule",
]
