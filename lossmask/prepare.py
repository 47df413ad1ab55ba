"""``lossmask prepare``: input files → verified binary dataset, streaming, over ``--workers`` processes.

Episodes are read and parsed in order (sources.read_episodes) and sent in chunks to workers, which
guard, render and mask them; results come back in input order, so the output does not depend on the
number of workers. At most a few chunks are in flight, so memory does not grow with the input size. Everything is written into a temporary directory that is renamed into
place at the end (store.DatasetWriter): a failed run leaves nothing that looks like a dataset.
"""
from __future__ import annotations

import gzip
import hashlib
import json
import multiprocessing
import os
import shutil
from collections import Counter, deque
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from lossmask.episode import Episode
from lossmask.errors import EpisodeError, InputProblem, LossmaskError
from lossmask.example import Example
from lossmask.mask import Masker, MaskOptions
from lossmask.render import Label, RenderOptions, Rendered, make_renderer
from lossmask.special import SpecialStringGuard
from lossmask.tokenizer import TokenizerInfo, load_tokenizer

ON_ERROR = ("fail", "skip")


@dataclass
class PrepareOptions:
    inputs: list[str]
    tokenizer: str
    out: str
    render: RenderOptions = field(default_factory=RenderOptions)
    mask: MaskOptions = field(default_factory=MaskOptions)
    input_format: str = "auto"
    special_in_content: str = "reject"
    val_split: float = 0.05
    seed: int = 0
    workers: int = 1
    on_error: str = "fail"
    force: bool = False
    chunk_lines: int = 256  # episodes per unit of work
    max_line_bytes: int = 64 << 20
    pack: int | None = None  # block size: pack the prepared episodes (best-fit decreasing) into blocks
    pack_by_field: str | None = None  # e.g. "_meta.operator": only episodes with equal values share a block
    trust_remote_code: bool = False
    num_shards: int | None = None  # with shard_index: write only this shard, to OUT/shard-IIIII-of-NNNNN
    shard_index: int | None = None


@dataclass
class PrepareSummary:
    out: str
    lines: int = 0
    episodes_kept: int = 0
    examples: dict[str, int] = field(default_factory=lambda: {"train": 0, "val": 0})
    tokens: int = 0
    trained_tokens: int = 0
    straddling_tokens: int = 0
    truncated: int = 0
    neutralized_special_strings: int = 0
    rejected: Counter = field(default_factory=Counter)
    notes: Counter = field(default_factory=Counter)
    stop_strings: list[str] = field(default_factory=list)
    rejects_file: str | None = None
    packing: dict | None = None  # pack.PackReport.to_dict() with --pack

    @property
    def trained_fraction(self) -> float:
        return self.trained_tokens / self.tokens if self.tokens else 0.0

    def to_dict(self) -> dict:
        d = asdict(self)
        d["rejected"] = dict(sorted(self.rejected.items()))
        d["notes"] = dict(sorted(self.notes.items()))
        d["trained_fraction"] = round(self.trained_fraction, 6)
        return d


class PrepareFailed(LossmaskError):
    """``--on-error fail``: the first bad line stops the run before anything is written."""

    def __init__(self, problem: InputProblem):
        super().__init__(
            f"{problem}\nNothing was written. Fix the line, or pass --on-error skip to write the rest "
            "and a rejects file."
        )
        self.problem = problem


# -- the work done per chunk (in a worker process, or inline) ----------------------------------------
@dataclass
class Result:
    """What one input unit (an episode, or a preference pair) became: examples, or the problem that rejects it."""

    file_index: int
    line: int
    examples: list[Example] = field(default_factory=list)
    problem: InputProblem | None = None
    notes: list[str] = field(default_factory=list)
    neutralized: int = 0
    group: str | None = None  # the --pack-by-field value
    stop_ids: set[int] = field(default_factory=set)  # ids that end a trained turn, see stop_token_ids

    def reject(self, problem: InputProblem) -> None:
        """Keep the first problem; an episode with any problem contributes no example."""
        self.examples = []
        if self.problem is None:
            self.problem = problem


def start_result(file_index: int, item: Any) -> Result:
    """The Result of one read unit: ``item`` is an Episode or a Pair (anything with a ``source``), or the
    InputProblem read in its place, which rejects the unit at once.

    Shared by every ``Kind.worker`` so that a unit rejected while reading is reported the same way.
    """
    result = Result(file_index, _unit_line(item))
    if isinstance(item, InputProblem):
        result.reject(item)
    return result


def _unit_line(item: Any) -> int:
    """The input line a read unit (or the InputProblem read in its place) came from."""
    return item.line if isinstance(item, InputProblem) else item.source.line


Item = tuple[int, "Episode | InputProblem"]


class Worker:
    """Everything one process needs to turn parsed episodes into examples; built once per process.

    Other kinds of unit (``Kind.worker``, e.g. lossmask.pairs) subclass it and override ``run``.
    """

    def __init__(self, options: PrepareOptions, tokenizer):
        self.options = options
        info = TokenizerInfo.of(tokenizer)
        self.renderer = make_renderer(tokenizer, info, options.render)
        self.guard = SpecialStringGuard(info.special_tokens, options.special_in_content)
        self.masker = Masker(tokenizer, options.mask)

    def run(self, chunk: list[Item]) -> tuple[list[Result], tuple[str, ...]]:
        results = []
        pending: list[tuple[Result, Rendered]] = []  # masked in one batch
        for fi, item in chunk:
            result = start_result(fi, item)
            results.append(result)
            if isinstance(item, InputProblem):
                continue
            if self.options.pack_by_field:
                result.group = _field_value(item, self.options.pack_by_field)
            try:
                episode, result.neutralized = self.guard.apply(item)
                pending.extend((result, rendered) for rendered in self.renderer.render(episode))
            except EpisodeError as exc:
                result.reject(exc.at(item.source.file, item.source.line))
        masked = self.masker.mask([r for _, r in pending]) if pending else []
        for (result, rendered), example in zip(pending, masked):
            if isinstance(example, EpisodeError):
                result.reject(example.at(rendered.source.file, rendered.source.line))
            elif result.problem is None:
                result.examples.append(example)
                result.notes.extend(rendered.notes)
                result.stop_ids.update(turn_end_ids(example))
        return results, self.renderer.stop_strings


def turn_end_ids(example: Example) -> set[int]:
    """Ids of the last token of every trained stop (label STOP), as the store will hold them."""
    stop = (example.labels == Label.STOP) & (example.weights > 0)
    ends = stop & ~np.append(stop[1:], False)
    return set(example.input_ids[ends].tolist())


def _field_value(episode: Episode, dotted: str) -> str | None:
    """The value at a dotted path of the episode's extra fields (``_meta.operator``), as a grouping key."""
    value = episode.meta
    for part in dotted.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return json.dumps(value, sort_keys=True)


_WORKER: Worker | None = None


def _work(chunk):
    return _WORKER.run(chunk)


def _in_val(seed: int, file_index: int, line: int, fraction: float) -> bool:
    """Split by episode, seeded and stateless, so streaming and any worker count give the same split."""
    if fraction <= 0:
        return False
    h = hashlib.blake2b(f"{seed}\0{file_index}\0{line}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") / 2**64 < fraction


def stop_token_ids(tokenizer, stop_strings, observed: set[int] = frozenset()) -> list[int]:
    """Ids a trained stop may end with, for ``validate``.

    Each stop string's last token (alone and after common text), plus the ids seen ending a stop in the
    data whose text is the end of a stop string (a stop that is not one token, like ``\nEND``, can end
    in a token that only exists in context). An id whose text ends no stop string is never accepted.
    """
    stops = [s for s in (*stop_strings, tokenizer.eos_token) if s]
    ids = set()
    for s in stops:
        for prefix in ("", "x", "\n", " "):
            enc = tokenizer(prefix + s, add_special_tokens=False)["input_ids"]
            if enc:
                ids.add(int(enc[-1]))
    for i in observed - ids:
        text = tokenizer.decode([i], skip_special_tokens=False, clean_up_tokenization_spaces=False).strip()
        if text and any(s.endswith(text) for s in stops):
            ids.add(i)
    return sorted(ids)


# -- the run -------------------------------------------------------------------------------------------
def prepare(options: PrepareOptions, progress: bool = True) -> PrepareSummary:
    """Run the whole preparation; returns the summary (also stored in dataset_metadata.json).

    With ``pack``, episodes are prepared into a temporary unpacked dataset (``max_length`` defaults to
    the block size, so the truncation policy applies) and packed from it into ``out``.
    """
    from lossmask.shards import check_shard, shard_name

    check_shard(options.shard_index, options.num_shards)
    if options.num_shards is not None:
        options = replace(options, out=str(Path(options.out) / shard_name(options.shard_index, options.num_shards)))
    if not options.pack:
        return _prepare(options, progress)[0]
    from lossmask.pack import pack_dataset
    from lossmask.store import exclusive_lock

    if options.pack < 2:
        raise LossmaskError(f"--pack must be a block size of at least 2 tokens, got {options.pack}")
    out = Path(options.out)
    if out.exists() and not options.force:
        raise LossmaskError(f"{out} already exists; pass --force to replace it")
    staging = out.parent / f".{out.name}.unpacked"
    mask = options.mask if options.mask.max_length else replace(options.mask, max_length=options.pack)
    out.parent.mkdir(parents=True, exist_ok=True)
    # held for the whole run: a second run for the same OUT is refused before it touches the staging, so
    # whatever staging exists now (complete, or half-removed by a kill) is a crashed run's and can go
    with exclusive_lock(out.parent / f".{out.name}.pack.lock", out):
        shutil.rmtree(staging, ignore_errors=True)
        try:
            summary, groups = _prepare(replace(options, out=str(staging), mask=mask, force=True), progress)
            summary.out = options.out
            report = pack_dataset(staging, out, options.pack, group_keys=groups, force=options.force)
            summary.packing = {"block_size": options.pack, "splits": {n: s.to_dict() for n, s in report.splits.items()}}
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return summary


@dataclass(frozen=True)
class Kind:
    """What a prepare run makes of its input units: SFT episodes (``SFT``), or preference pairs (lossmask.pairs).

    ``read`` yields (input file index, unit or InputProblem) in input order; ``worker`` builds the Worker that
    turns a chunk of units into Results in each process. ``parts`` are the split-name suffixes of a result's
    examples, in order (pairs: ``.chosen`` then ``.rejected``, so a pair's sides land in ``train.chosen`` and
    ``train.rejected`` at the same index); None sends every example to the split itself. ``metadata`` is
    added to dataset_metadata.json.
    """

    name: str
    read: Callable[[PrepareOptions], Iterator[tuple[int, Any]]]
    worker: Callable[[PrepareOptions, Any], Worker]
    parts: tuple[str, ...] | None = None
    metadata: dict = field(default_factory=dict)


def prepare_kind(options: PrepareOptions, kind: Kind, progress: bool = True) -> PrepareSummary:
    """Prepare another kind of unit (e.g. preference pairs) through the same pipeline; packing does not apply."""
    if options.pack or options.pack_by_field:
        raise LossmaskError(f"--pack and --pack-by-field do not apply to {kind.name} datasets")
    if options.num_shards is not None or options.shard_index is not None:
        # a shard written to OUT would look like the whole dataset, and shard roots read SFT splits only
        raise LossmaskError(
            f"--num-shards and --shard-index do not apply to {kind.name} datasets: prepare them in one run "
            "(--workers N uses every core)"
        )
    return _prepare(options, progress, kind)[0]


def _prepare(
    options: PrepareOptions, progress: bool, kind: Kind | None = None
) -> tuple[PrepareSummary, dict[str, list] | None]:
    global _WORKER
    from lossmask.store import DatasetWriter

    kind = kind or SFT
    if options.on_error not in ON_ERROR:
        raise LossmaskError(f"--on-error must be one of {ON_ERROR}")
    if not 0 <= options.val_split < 1:
        raise LossmaskError(f"--val-split must be in [0, 1), got {options.val_split}")
    for path in options.inputs:
        if not Path(path).is_file():
            raise LossmaskError(f"input file {path} does not exist (or is not a file)")
    tokenizer = load_tokenizer(options.tokenizer, options.trust_remote_code)
    summary = PrepareSummary(out=options.out)
    rejects: list[dict] = []
    stops: tuple[str, ...] = ()
    groups: dict[str, list] | None = {"train": [], "val": []} if options.pack_by_field else None
    observed_stops: set[int] = set()

    _WORKER = kind.worker(options, tokenizer)
    pool = None
    try:
        chunks = _chunks(_in_shard(kind.read(options), options), options.chunk_lines)
        if options.workers > 1:
            os.environ["TOKENIZERS_PARALLELISM"] = "false"
            pool = multiprocessing.get_context("fork").Pool(options.workers)
            results = _bounded_imap(pool, chunks, window=2 * options.workers)
        else:
            results = map(_work, chunks)
        with DatasetWriter(options.out, tokenizer, force=options.force, inputs=options.inputs) as writer, \
                _progress(progress) as bar:
            for chunk_results, stops in results:
                for r in chunk_results:
                    summary.lines += 1
                    summary.neutralized_special_strings += r.neutralized
                    if r.problem is not None:
                        if options.on_error == "fail":
                            raise PrepareFailed(r.problem)
                        summary.rejected[r.problem.reason] += 1
                        rejects.append(r.problem.to_dict())
                        continue
                    summary.episodes_kept += 1
                    summary.notes.update(r.notes)
                    observed_stops |= r.stop_ids
                    split = "val" if _in_val(options.seed, r.file_index, r.line, options.val_split) else "train"
                    names = [split] * len(r.examples) if kind.parts is None else [split + p for p in kind.parts]
                    summary.examples[split] += len(r.examples) if kind.parts is None else 1
                    for name, ex in zip(names, r.examples, strict=True):
                        writer.add(name, ex)
                        if groups is not None:
                            groups[split].append(r.group)
                        summary.tokens += len(ex)
                        summary.trained_tokens += ex.trained_tokens
                        summary.straddling_tokens += ex.straddling
                        summary.truncated += int(ex.truncated)
                bar(summary)
            if summary.episodes_kept == 0 and (summary.lines or options.num_shards is None):  # a shard may be empty
                raise LossmaskError(
                    f"no episode was kept from {summary.lines} input episodes"
                    + (f" (rejected: {dict(summary.rejected)})" if summary.rejected else "")
                )
            summary.stop_strings = list(stops)
            if rejects:
                summary.rejects_file = str(Path(options.out) / "rejects.jsonl")
                writer.add_file("rejects.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n"
                                                         for r in _with_text(rejects)))
            writer.close(_metadata(options, summary, tokenizer, observed_stops, kind))
    finally:
        if pool is not None:
            pool.terminate()
        _WORKER = None
    return summary, groups


def _bounded_imap(pool, chunks: Iterator[list[Item]], window: int):
    """Pool.imap without its eager feeder: at most ``window`` chunks in flight, results in order."""
    pending: deque = deque()
    for chunk in chunks:
        pending.append(pool.apply_async(_work, (chunk,)))
        if len(pending) >= window:
            yield pending.popleft().get()
    while pending:
        yield pending.popleft().get()


def _in_shard(items: Iterator[Item], options: PrepareOptions) -> Iterator[Item]:
    """Only the units of ``options.shard_index`` (every unit is parsed; rendering and masking are split)."""
    if options.num_shards is None:
        yield from items
        return
    from lossmask.shards import shard_of

    for fi, unit in items:
        if shard_of(fi, _unit_line(unit), options.num_shards) == options.shard_index:
            yield fi, unit


def _episodes(options: PrepareOptions) -> Iterator[Item]:
    from lossmask.sources import read_episodes

    for fi, path in enumerate(options.inputs):
        for item in read_episodes(path, options.input_format, options.max_line_bytes):
            yield fi, item


def _chunks(items: Iterator[Item], size: int) -> Iterator[list[Item]]:
    chunk = []
    for item in items:
        chunk.append(item)
        if len(chunk) >= size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


SFT = Kind("sft", _episodes, Worker)


def _with_text(rejects: list[dict], limit: int = 1 << 20) -> list[dict]:
    """Attach each rejected line's text (up to ``limit`` bytes), read back in one pass per file."""
    wanted: dict[str, set[int]] = {}
    for r in rejects:
        wanted.setdefault(r["file"], set()).add(r["line"])
    texts: dict[tuple[str, int], str] = {}
    for name, lines in wanted.items():
        opener = gzip.open if name.endswith(".gz") else open
        with opener(name, "rb") as f:
            for number, raw in enumerate(f, 1):
                if number in lines:
                    texts[name, number] = raw[:limit].decode("utf-8", errors="replace").rstrip("\n")
                    if len(texts) == sum(len(v) for v in wanted.values()):
                        break
    return [{**r, "text": texts.get((r["file"], r["line"]))} for r in rejects]


def _metadata(
    options: PrepareOptions, summary: PrepareSummary, tokenizer, observed_stops: set[int], kind: Kind
) -> dict:
    from lossmask.store import sha256_file

    return {
        **kind.metadata,
        "kind": kind.name,
        "inputs": [{"path": p, "sha256": sha256_file(Path(p)), "bytes": Path(p).stat().st_size} for p in options.inputs],
        "render": options.render.to_dict(),
        "mask": asdict(options.mask),
        "input_format": options.input_format,
        "special_in_content": options.special_in_content,
        "val_split": options.val_split,
        "seed": options.seed,
        "stop_strings": summary.stop_strings,
        "stop_token_ids": stop_token_ids(tokenizer, summary.stop_strings, observed_stops),
        "summary": summary.to_dict() | {"out": None},
        **({"shard": {"index": options.shard_index, "count": options.num_shards}} if options.num_shards else {}),
    }


class _progress:
    """A rich progress display of episodes processed (a no-op when disabled), as a context manager."""

    def __init__(self, enabled: bool):
        self.enabled = enabled

    def __enter__(self):
        if self.enabled:
            from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

            self.progress = Progress(
                SpinnerColumn(), TextColumn("[bold]prepare"), TextColumn("{task.fields[status]}"),
                TimeElapsedColumn(), transient=True,
            )
            self.progress.start()
            self.task = self.progress.add_task("prepare", total=None, status="")
        return self.update

    def update(self, summary: PrepareSummary) -> None:
        if self.enabled:
            self.progress.update(
                self.task,
                status=f"{summary.lines:,} episodes read, {summary.episodes_kept:,} kept, "
                f"{sum(summary.rejected.values()):,} rejected, {summary.tokens:,} tokens",
            )

    def __exit__(self, *exc):
        if self.enabled:
            self.progress.stop()
        return False
