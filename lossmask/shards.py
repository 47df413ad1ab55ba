"""Sharded datasets: deterministic, disjoint shards of the input, each a complete dataset.

``lossmask prepare --num-shards N --shard-index I`` keeps the episodes whose (input file, line) hashes
to shard I, so N independent jobs (a job array, or Ray tasks with ``--backend ray``) together prepare
every episode exactly once. A shard root is a directory holding ``shard-IIIII-of-NNNNN/`` datasets;
``open_dataset`` reads it as one dataset (refusing a root where any shard is missing, so an interrupted
run never looks complete), and ``merge_shards`` writes one dataset whose episodes are in input order:
the same episodes, in the same order, as the unsharded run.
"""
from __future__ import annotations

import bisect
import hashlib
import heapq
import os
import re
from collections.abc import Iterator, Sequence
from pathlib import Path

from lossmask.errors import LossmaskError
from lossmask.store import METADATA, Dataset, DatasetWriter, load_tokenizer_of, open_dataset, read_metadata

_SHARD = re.compile(r"^shard-(\d{5})-of-(\d{5})$")


def shard_name(index: int, count: int) -> str:
    return f"shard-{index:05d}-of-{count:05d}"


def shard_of(file_index: int, line: int, count: int) -> int:
    """The shard an episode belongs to: a stable hash of where it is, independent of everything else."""
    digest = hashlib.blake2b(f"{file_index}\0{line}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") % count


def check_shard(index: int | None, count: int | None) -> None:
    if count is None and index is None:
        return
    if count is None or index is None or count < 1 or not 0 <= index < count:
        raise LossmaskError(
            f"--num-shards and --shard-index go together, with 0 <= shard index < num shards "
            f"(got {index} of {count})"
        )


def shard_dirs(root: str | os.PathLike) -> list[Path]:
    """The shards of a shard root, in order; refuses a root where any shard is missing or incomplete."""
    root = Path(root)
    found: dict[int, Path] = {}
    counts = set()
    for child in root.iterdir() if root.is_dir() else ():
        match = _SHARD.match(child.name)
        if match:
            found[int(match.group(1))] = child
            counts.add(int(match.group(2)))
    if not found:
        raise LossmaskError(f"{root} is neither a dataset (no {METADATA}) nor a directory of shards")
    if len(counts) != 1:
        raise LossmaskError(f"{root} mixes shards of different runs (shard counts {sorted(counts)})")
    count = counts.pop()
    missing = [i for i in range(count) if i not in found or not (found[i] / METADATA).is_file()]
    if missing:
        raise LossmaskError(
            f"{root} is incomplete: shards {missing[:10]} of {count} are missing or unfinished; "
            "re-run those shards (each is written atomically)"
        )
    return [found[i] for i in range(count)]


def is_shard_root(path: str | os.PathLike) -> bool:
    path = Path(path)
    return not (path / METADATA).exists() and path.is_dir() and any(_SHARD.match(c.name) for c in path.iterdir())


class ShardedDataset(Sequence):
    """One split over every shard of a shard root, shard after shard (each shard in input order)."""

    def __init__(self, root: str | os.PathLike, split: str = "train", *, verify: bool = False):
        self.root = Path(root)
        self.split = split
        dirs = shard_dirs(self.root)
        identities = {read_metadata(d)["tokenizer"]["tokenizer_sha256"] for d in dirs}
        if len(identities) != 1:
            raise LossmaskError(f"{self.root}: shards were prepared with different tokenizers")
        self.shards = [open_dataset(d, split, verify=verify) for d in dirs if split in read_metadata(d)["splits"]]
        if not self.shards:
            raise LossmaskError(f"{self.root}: no shard has a split {split!r}")
        self._offsets = [0]
        for ds in self.shards:
            self._offsets.append(self._offsets[-1] + len(ds))
        self.metadata = self.shards[0].metadata
        self.packed = self.shards[0].packed

    @property
    def tokenizer_path(self) -> Path:
        return self.shards[0].tokenizer_path

    def __len__(self) -> int:
        return self._offsets[-1]

    def __getitem__(self, index: int):
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} items")
        shard = bisect.bisect_right(self._offsets, index) - 1
        return self.shards[shard][index - self._offsets[shard]]


def merge_shards(root: str | os.PathLike, out: str | os.PathLike, *, force: bool = False) -> Path:
    """Join the shards of ``root`` into one dataset at ``out``, every split in input order."""
    dirs = shard_dirs(root)
    metas = [read_metadata(d) for d in dirs]
    if any(split.get("packed") for m in metas for split in m["splits"].values()):
        raise LossmaskError("merge unpacked shards, then pack the merged dataset (`lossmask pack`)")
    inputs = [i["path"] if isinstance(i, dict) else i for i in metas[0]["inputs"]]
    splits = sorted({name for m in metas for name in m["splits"]})
    with DatasetWriter(out, load_tokenizer_of(dirs[0]), force=force, inputs=inputs) as writer:
        for split in splits:
            parts = [open_dataset(d, split) for d, m in zip(dirs, metas) if split in m["splits"]]
            for example in heapq.merge(*(_examples(ds, inputs) for ds in parts), key=lambda e: e[0]):
                writer.add(split, example[1])
        writer.close(_merged_metadata(metas))
    return Path(out)


def _examples(ds: Dataset, inputs: list[str]) -> Iterator[tuple[tuple[int, int, int], object]]:
    """(input order key, example) for each episode of a shard split, in stored (input) order."""
    from lossmask.pack import dataset_example

    order = {name: i for i, name in enumerate(inputs)}
    for i in range(len(ds)):
        example = dataset_example(ds, i)
        yield (order[example.source.file], example.source.line, i), example


def _merged_metadata(metas: list[dict]) -> dict:
    """The first shard's metadata with the counts of all shards added up."""
    from lossmask.store import WRITER_KEYS

    merged = {k: v for k, v in metas[0].items() if k not in WRITER_KEYS}
    merged.pop("shard", None)
    summaries = [m.get("summary", {}) for m in metas]
    summary = dict(summaries[0])
    for key, value in summary.items():
        if isinstance(value, int) and not isinstance(value, bool):
            summary[key] = sum(s.get(key, 0) for s in summaries)
        elif isinstance(value, dict) and all(isinstance(v, int) for v in value.values()):
            summary[key] = {k: sum(s.get(key, {}).get(k, 0) for s in summaries)
                            for k in sorted({k for s in summaries for k in s.get(key, {})})}
    if summary.get("tokens"):
        summary["trained_fraction"] = round(summary["trained_tokens"] / summary["tokens"], 6)
    merged["summary"] = summary
    merged["stop_token_ids"] = sorted({i for m in metas for i in m.get("stop_token_ids", [])})
    merged["merged_from_shards"] = len(metas)
    return merged
