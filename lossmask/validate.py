"""Checking a stored dataset end to end: integrity, index, mask direction, stop tokens, tokenizer.

Every problem names the file, and where it can the episode, the token position inside the episode
(and the block of a packed split), so a damaged or mis-masked dataset can be found and fixed.

Mask direction: no trained token (mask 1 or weight > 0) may carry a label in ``NEVER_TRAINED``.
Assistant turns: a turn is a maximal run of trained tokens, inside one episode, whose labels are all in
ASSISTANT, THINK, CITE, TOOLCALL or STOP; its last token must be labelled STOP and be one of
``metadata["stop_token_ids"]``. A turn that runs to the end of an episode flagged truncated
(max_length cut it at prepare time) may lack its stop: it is counted, not reported.
Token checks run in chunks of whole episodes (or blocks), so memory stays bounded on any dataset size.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from lossmask.errors import LossmaskError
from lossmask.render.base import NEVER_TRAINED, Label
from lossmask.store import (
    METADATA, TOKENIZER_DIR, TRUNCATED, Dataset, Problem, read_metadata, sha256_file, split_files, split_problems,
)
from lossmask.tokenizer import identity_mismatches, load_tokenizer, tokenizer_identity

TURN_LABELS = (Label.ASSISTANT, Label.THINK, Label.CITE, Label.TOOLCALL, Label.STOP)
_NEVER = np.array(sorted(int(label) for label in NEVER_TRAINED), dtype=np.uint8)
_TURN = np.array([int(label) for label in TURN_LABELS], dtype=np.uint8)
_CHUNK_TOKENS = 1 << 20  # tokens checked at once: about 50 MB of temporaries

__all__ = ["Problem", "ValidationReport", "format_report", "validate_dataset"]


@dataclass
class ValidationReport:
    """All problems found (at most ``max_per_check`` detailed per check and split, the rest counted)."""

    path: str
    problems: list[Problem] = field(default_factory=list)
    counts: dict[str, dict[str, int]] = field(default_factory=dict)  # per split
    notes: list[str] = field(default_factory=list)
    suppressed: dict[str, int] = field(default_factory=dict)  # "split/check" -> problems not listed

    @property
    def ok(self) -> bool:
        return not self.problems and not self.suppressed


class _Collector:
    """Adds problems to a report, keeping at most ``limit`` per (split, check)."""

    def __init__(self, report: ValidationReport, limit: int):
        self.report = report
        self.limit = limit
        self.seen: dict[str, int] = {}

    def __call__(self, problem: Problem) -> None:
        key = f"{problem.file.split('/')[0]}/{problem.check}"
        self.seen[key] = self.seen.get(key, 0) + 1
        if self.seen[key] <= self.limit:
            self.report.problems.append(problem)
        else:
            self.report.suppressed[key] = self.seen[key] - self.limit


def validate_dataset(path: str | os.PathLike, *, max_per_check: int = 20) -> ValidationReport:
    """Run every check on the dataset at ``path``; never raises for a damaged dataset, reports it."""
    root = Path(path)
    report = ValidationReport(str(root))
    add = _Collector(report, max_per_check)
    try:
        meta = read_metadata(root)
    except LossmaskError as exc:
        add(Problem("metadata", METADATA, str(exc)))
        return report
    _check_listed_files(root, meta, add)
    _check_tokenizer(root, meta, add)
    stop_ids = meta.get("stop_token_ids")
    if not isinstance(stop_ids, list) or not all(isinstance(i, int) for i in stop_ids):
        add(Problem("metadata", METADATA, f"stop_token_ids is {stop_ids!r}, not a list of token ids; "
                    "assistant turn ends were not checked"))
        stop_ids = None
    for split in sorted(meta["splits"]):
        problems = split_problems(root, meta, split, verify=True)
        for problem in problems:
            add(problem)
        if any(p.check != "checksum" for p in problems):
            report.notes.append(f"split {split!r}: token checks skipped until the file problems above are fixed")
            continue
        report.counts[split] = _check_tokens(Dataset(root, split, meta), stop_ids, add)
    return report


def _check_listed_files(root: Path, meta: dict, add: _Collector) -> None:
    """Files outside the splits' own (e.g. rejects.jsonl), and files the metadata does not expect."""
    expected = {f"{split}/{name}" for split, entry in meta["splits"].items() for name in split_files(entry)}
    for rel, listed in sorted(meta["files"].items()):
        if rel in expected:
            continue  # checked with its split
        if rel.split("/")[0] in meta["splits"]:
            add(Problem("metadata", METADATA, f"{rel} is listed but its split does not use it"))
            continue
        path = root / rel
        if not path.is_file():
            add(Problem("missing", rel, "file listed in dataset_metadata.json is missing"))
        elif path.stat().st_size != listed.get("bytes") or sha256_file(path) != listed.get("sha256"):
            add(Problem("checksum", rel, "size or sha256 does not match dataset_metadata.json: the file was modified"))
    for split in meta["splits"]:
        directory = root / split
        for path in sorted(directory.iterdir()) if directory.is_dir() else []:
            rel = f"{split}/{path.name}"
            if rel not in expected:
                add(Problem("unexpected", rel, "file is not part of the dataset (not in dataset_metadata.json)"))


def _check_tokenizer(root: Path, meta: dict, add: _Collector) -> None:
    directory = root / TOKENIZER_DIR
    if not directory.is_dir():
        add(Problem("tokenizer", f"{TOKENIZER_DIR}/", "the stored tokenizer is missing"))
        return
    try:
        identity = tokenizer_identity(load_tokenizer(str(directory)))
    except LossmaskError as exc:
        add(Problem("tokenizer", f"{TOKENIZER_DIR}/", f"the stored tokenizer does not load: {exc}"))
        return
    for mismatch in identity_mismatches(identity, meta["tokenizer"]):
        add(Problem("tokenizer", f"{TOKENIZER_DIR}/", f"{mismatch}: the stored tokenizer was replaced or changed"))


@dataclass
class _Chunk:
    """Tokens [a, b) of a split with the episodes [e0, e1) inside them, and where each token sits."""

    a: int
    b: int
    e0: int
    e1: int
    episode: np.ndarray  # per token: episode index, -1 for padding
    position: np.ndarray  # per token: position inside its episode


def _chunks(ds: Dataset):
    arrays = ds.arrays
    starts = ds.episode_starts
    ends = starts + arrays["episodes.idx"][:, 1].astype(np.int64)
    if ds.packed:
        size = int(ds.block_size)
        unit_starts = np.arange(len(ds), dtype=np.int64) * size
        unit_ends = unit_starts + size
    else:
        unit_starts, unit_ends = starts, ends
    u = 0
    while u < len(unit_starts):
        a = int(unit_starts[u])
        v = max(u + 1, int(np.searchsorted(unit_ends, a + _CHUNK_TOKENS, side="right")))
        b = int(unit_ends[v - 1])
        e0, e1 = (int(x) for x in np.searchsorted(starts, [a, b], side="left"))
        offsets = np.arange(a, b, dtype=np.int64)
        local = np.searchsorted(starts[e0:e1], offsets, side="right") - 1
        inside = (local >= 0) & (offsets < ends[e0:e1][np.maximum(local, 0)])
        episode = np.where(inside, e0 + local, -1)
        # padding has no episode: its position is inside its block
        position = np.where(inside, offsets - starts[np.maximum(episode, 0)], offsets % (ds.block_size or 1))
        yield _Chunk(a, b, e0, e1, episode, position)
        u = v


def _check_tokens(ds: Dataset, stop_ids: list[int] | None, add: _Collector) -> dict[str, int]:
    split = ds.split
    arrays = ds.arrays
    vocab = ds.metadata["tokenizer"].get("vocab_size")
    stops = np.array(sorted(stop_ids or []), dtype=np.int64)
    counts = {"episodes": ds.num_episodes, "tokens": int(ds.entry["tokens"]), "trained_tokens": 0,
              "assistant_turns": 0, "open_turns_in_truncated_episodes": 0}
    if ds.packed:
        counts.update(blocks=len(ds), padding_tokens=0)

    for c in _chunks(ds):
        tokens = np.asarray(arrays["tokens.bin"][c.a : c.b], dtype=np.int64)
        mask = np.asarray(arrays["mask.bin"][c.a : c.b])
        labels = np.asarray(arrays["labels.bin"][c.a : c.b])
        weights = arrays.get("weights.bin")
        weight = mask.astype(np.float32) if weights is None else np.asarray(weights[c.a : c.b])

        def report(check: str, name: str, bad: np.ndarray, message) -> None:
            for t in np.flatnonzero(bad).tolist():
                episode = int(c.episode[t])
                add(Problem(
                    check, f"{split}/{name}", message(t),
                    episode=episode if episode >= 0 else None,
                    position=int(c.position[t]),
                    block=(c.a + t) // ds.block_size if ds.packed else None,
                    offset=c.a + t,
                ))

        if isinstance(vocab, int):
            report("vocabulary", "tokens.bin", tokens >= vocab,
                   lambda t: f"token id {tokens[t]} is outside the tokenizer's vocabulary of {vocab}")
        report("mask_values", "mask.bin", mask > 1, lambda t: f"mask value {mask[t]} (must be 0 or 1)")
        if weights is not None:
            report("weights", "weights.bin", ~np.isfinite(weight) | (weight < 0),
                   lambda t: f"loss weight {weight[t]} (must be finite and >= 0)")
            report("mask_weights", "mask.bin", (mask == 1) != (weight > 0),
                   lambda t: f"mask {mask[t]} disagrees with weight {weight[t]} (mask is 1 exactly where weight > 0)")
        report("labels", "labels.bin", labels > max(Label), lambda t: f"unknown label value {labels[t]}")
        trained = (mask == 1) | (weight > 0)
        counts["trained_tokens"] += int(np.count_nonzero(trained))
        report("mask_direction", "mask.bin", trained & np.isin(labels, _NEVER),
               lambda t: f"token {tokens[t]} is trained but labelled {_label_name(labels[t])}, which is never trained")
        if ds.packed:
            _check_segments(ds, c, labels, trained, report, counts)
        if stop_ids is not None:
            _check_turn_ends(ds, c, tokens, labels, trained, stops, report, counts)
    return counts


def _label_name(value) -> str:
    try:
        return Label(int(value)).name
    except ValueError:
        return str(int(value))


def _check_segments(ds: Dataset, c: _Chunk, labels, trained, report, counts) -> None:
    segments = np.asarray(ds.arrays["segments.bin"][c.a : c.b], dtype=np.int64)
    size = int(ds.block_size)
    block_of = ds.episode_starts[c.e0 : c.e1] // size
    first = np.searchsorted(ds.episode_starts, block_of * size, side="left")  # first episode of each block
    rank = np.arange(c.e0, c.e1) - first + 1
    expected = np.where(c.episode >= 0, rank[np.maximum(c.episode - c.e0, 0)], 0)
    report("segments", "segments.bin", segments != expected,
           lambda t: f"segment id {segments[t]}, expected {expected[t]} "
           f"({'padding' if expected[t] == 0 else f'episode {expected[t]} of its block'})")
    padding = c.episode < 0
    counts["padding_tokens"] += int(np.count_nonzero(padding))
    report("padding", "labels.bin", padding & ((labels != Label.PAD) | trained),
           lambda t: f"padding token is labelled {_label_name(labels[t])}"
           + (" and trained" if trained[t] else "") + " (padding must be PAD and untrained)")


def _check_turn_ends(ds: Dataset, c: _Chunk, tokens, labels, trained, stops, report, counts) -> None:
    if c.e1 == c.e0:
        return
    member = trained & np.isin(labels, _TURN) & (c.episode >= 0)
    same_next = np.r_[c.episode[1:] == c.episode[:-1], False]
    ends = member & ~(np.r_[member[1:], False] & same_next)
    good = (labels == Label.STOP) & np.isin(tokens, stops)
    counts["assistant_turns"] += int(np.count_nonzero(ends))
    lengths = ds.arrays["episodes.idx"][c.e0 : c.e1, 1].astype(np.int64)
    flags = np.asarray(ds.arrays["flags.bin"][c.e0 : c.e1])
    local = np.maximum(c.episode - c.e0, 0)
    open_at_cut = ends & ~good & (c.position == lengths[local] - 1) & ((flags[local] & TRUNCATED) != 0)
    counts["open_turns_in_truncated_episodes"] += int(np.count_nonzero(open_at_cut))
    starts = np.maximum.accumulate(np.where(member & ~np.r_[False, member[:-1] & same_next[:-1]],
                                            np.arange(len(member)), 0))
    report(
        "turn_end", "labels.bin", ends & ~good & ~open_at_cut,
        lambda t: f"assistant turn (tokens {c.position[starts[t]]}..{c.position[t]} of the episode) ends with token "
        f"{tokens[t]} labelled {_label_name(labels[t])}, not a trained stop token (stop_token_ids {stops.tolist()})",
    )


def format_report(report: ValidationReport) -> str:
    """A readable report: verdict, per-split counts, then one line per problem."""
    total = len(report.problems) + sum(report.suppressed.values())
    lines = [f"{report.path}: " + ("OK" if report.ok else f"{total} problems")]
    for split, counts in report.counts.items():
        lines.append(f"  {split}: " + ", ".join(f"{value} {key.replace('_', ' ')}" for key, value in counts.items()))
    for problem in report.problems:
        lines.append(f"  - [{problem.check}] {problem}")
    for key, count in sorted(report.suppressed.items()):
        lines.append(f"  - ... and {count} more {key} problems")
    for note in report.notes:
        lines.append(f"  note: {note}")
    return "\n".join(lines)
