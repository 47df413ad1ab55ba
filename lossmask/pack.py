"""Packing whole episodes into fixed-size blocks, with the inputs that keep them isolated in the model.

Isolation has three parts, all derived from ``segment_ids`` (1..n per episode of a block, 0 = padding):

- positions restart at 0 for every episode (``position_ids``), so every episode sees the positions it
  would see alone;
- attention stays inside each episode: transformers 5 derives a block-diagonal causal mask from the
  restarting positions (``masking_utils.find_packed_sequence_indices``) for eager, sdpa and flex
  attention — but only when the model gets no 2D ``attention_mask`` and runs without a KV cache
  (``use_cache=False``: the default ``use_cache=True`` of most configs silently disables the detection).
  Its flash-attention path reads them as varlen boundaries only for a batch of one row
  (``_is_packed_sequence``), so flatten blocks into one row there. ``packed_model_inputs(...,
  mask_dtype=...)`` builds an explicit 4D block-diagonal mask instead, for eager and sdpa;
- no episode predicts the first token of the next one: ``packed_labels`` sets -100 there.

Policies: blocks are padded at the end only, with the tokenizer's pad id, else its eos id, else 0
(padding is never attended by a real token and never trained, so its id only has to be a valid
embedding row). Episodes longer than the block are not packed: truncation already ran at prepare time
(max_length), so ``pack_dataset`` skips them, counts them and lists their sources in the report and in
dataset_metadata.json ("packing" → per split "skipped_too_long"); ``pack_examples`` refuses them.
"""
from __future__ import annotations

import bisect
import os
from collections import deque
from collections.abc import Hashable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from lossmask.episode import Source
from lossmask.errors import LossmaskError
from lossmask.example import Example
from lossmask.store import (
    WRITER_KEYS, Dataset, DatasetWriter, input_names, load_tokenizer_of, make_block, open_dataset, read_metadata,
)

if TYPE_CHECKING:
    import torch

IGNORE_INDEX = -100
_LISTED_SKIPS = 100  # skipped episodes named in dataset_metadata.json (the report has them all)
_PAIR_SEARCH = 32  # candidate lengths tried when closing a block exactly (keeps packing O(n log n))


def plan_packing(
    lengths: Sequence[int], block_size: int, group_keys: Sequence[Hashable] | None = None
) -> list[list[int]]:
    """Pack the whole list: episode indices per block (each block ascending), every episode exactly once.

    Decreasing fill with exact closing: blocks are filled one at a time, each taking the longest remaining
    episode that fits (ties: lowest index), which is what best-fit decreasing does when episodes are much
    shorter than the block. When the next episode would leave a gap no remaining episode can fill, the
    block is closed instead with two episodes that fill the room exactly, if such a pair exists: that
    gap is where plain best-fit decreasing loses about 1% on short episodes. With ``group_keys`` only
    episodes with equal keys share a block; groups are planned in order of first appearance.
    Deterministic; O(n log n) (sorted distinct lengths, a bounded search for the closing pair).
    """
    sizes = np.asarray(lengths, dtype=np.int64).reshape(-1)
    if block_size < 1:
        raise LossmaskError(f"block size must be at least 1, got {block_size}")
    bad = np.flatnonzero((sizes < 1) | (sizes > block_size))
    if len(bad):
        i = int(bad[0])
        raise LossmaskError(f"episode {i} has {int(sizes[i])} tokens; a block of {block_size} holds 1..{block_size}")
    if group_keys is None:
        return _fill_blocks(np.arange(len(sizes)), sizes, block_size)
    if len(group_keys) != len(sizes):
        raise LossmaskError(f"{len(group_keys)} group keys for {len(sizes)} episodes")
    groups: dict[Hashable, list[int]] = {}
    for i, key in enumerate(group_keys):
        groups.setdefault(key, []).append(i)
    blocks: list[list[int]] = []
    for members in groups.values():
        blocks += _fill_blocks(np.asarray(members, dtype=np.int64), sizes, block_size)
    return blocks


class _Pool:
    """Episodes not yet placed, by length: the sorted distinct lengths and a queue of indices per length."""

    def __init__(self, indices: np.ndarray, sizes: np.ndarray):
        self.queues: dict[int, deque[int]] = {}
        for i, n in zip(indices.tolist(), sizes[indices].tolist()):
            self.queues.setdefault(n, deque()).append(i)
        self.lengths = sorted(self.queues)

    def longest_fitting(self, room: int) -> int | None:
        k = bisect.bisect_right(self.lengths, room)
        return self.lengths[k - 1] if k else None

    def take(self, length: int) -> int:
        queue = self.queues[length]
        index = queue.popleft()
        if not queue:
            del self.queues[length]
            self.lengths.pop(bisect.bisect_left(self.lengths, length))
        return index

    def exact_pair(self, room: int) -> int | None:
        """The longest ``a`` with another episode of length ``room - a`` <= a; a bounded search."""
        k = bisect.bisect_right(self.lengths, room - self.lengths[0])
        for j in range(k - 1, max(-1, k - 1 - _PAIR_SEARCH), -1):
            a = self.lengths[j]
            b = room - a
            if b > a:
                return None
            partner = self.queues.get(b)
            if partner is not None and (b != a or len(partner) >= 2):
                return a
        return None


def _fill_blocks(indices: np.ndarray, sizes: np.ndarray, block_size: int) -> list[list[int]]:
    pool = _Pool(indices, sizes)
    blocks: list[list[int]] = []
    while pool.lengths:
        room, block = block_size, []
        while pool.lengths and (n := pool.longest_fitting(room)) is not None:
            if 0 < room - n < pool.lengths[0] and (a := pool.exact_pair(room)) is not None:
                block += [pool.take(a), pool.take(room - a)]
                break
            block.append(pool.take(n))
            room -= n
        blocks.append(sorted(block))
    return blocks


def pad_token_id(tokenizer) -> int:
    """The id padding gets: the pad token, else eos, else 0."""
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return int(candidate)
    return 0


def pack_examples(examples: Sequence[Example], block_size: int, *, pad_id: int = 0) -> list[dict[str, Any]]:
    """Pack in-memory examples into blocks (the same dicts a packed dataset yields)."""
    too_long = [e for e in examples if len(e) > block_size]
    if too_long:
        e = too_long[0]
        raise LossmaskError(
            f"{e.source.file}:{e.source.line}: {len(e)} tokens do not fit a block of {block_size} "
            f"({len(too_long)} such examples); prepare with --max-length at most the block size"
        )
    plan = plan_packing([len(e) for e in examples], block_size)
    return [make_block([examples[i] for i in block], block_size, pad_id) for block in plan]


def packed_labels(input_ids, loss_mask, segment_ids) -> np.ndarray:
    """Labels for HF causal LMs (shifted inside the model): the token id where it is trained, else -100.

    -100 where the weight is 0, on padding (segment 0), and on the first token of every segment, so no
    episode is ever asked to predict the start of the next one. Works on [T] or [B, T] arrays.
    """
    labels = np.array(input_ids, dtype=np.int64)
    seg = np.asarray(segment_ids)
    first = np.ones(seg.shape, dtype=bool)
    first[..., 1:] = seg[..., 1:] != seg[..., :-1]
    labels[(np.asarray(loss_mask) <= 0) | (seg == 0) | first] = IGNORE_INDEX
    return labels


def packed_model_inputs(
    block: Mapping[str, Any] | Sequence[Mapping[str, Any]], *, mask_dtype=None
) -> dict[str, "torch.Tensor"]:
    """Model inputs for one packed block or a batch of them: ``input_ids``, ``position_ids``, ``labels``.

    Call the model as ``model(**inputs, use_cache=False)`` and never add a 2D ``attention_mask``: either
    one turns off transformers' packed-sequence detection and episodes would attend to each other.
    With ``mask_dtype`` an explicit 4D ``attention_mask`` [B, 1, T, T] is added (token q sees token k iff
    k <= q in the same segment): ``torch.bool`` for sdpa, the model's float dtype (additive: 0 or the
    dtype's minimum) for eager. For weighted losses use the block's ``loss_mask`` with these labels.
    """
    import torch

    blocks = [block] if isinstance(block, Mapping) else list(block)
    ids = np.stack([np.asarray(b["input_ids"], dtype=np.int64) for b in blocks])
    weights = np.stack([np.asarray(b["loss_mask"], dtype=np.float32) for b in blocks])
    segments = np.stack([np.asarray(b["segment_ids"], dtype=np.int64) for b in blocks])
    positions = np.stack([np.asarray(b["position_ids"], dtype=np.int64) for b in blocks])
    inputs = {
        "input_ids": torch.from_numpy(ids),
        "position_ids": torch.from_numpy(positions),
        "labels": torch.from_numpy(packed_labels(ids, weights, segments)),
    }
    if mask_dtype is not None:
        seg = torch.from_numpy(segments)
        width = seg.shape[1]
        allowed = (seg[:, :, None] == seg[:, None, :]) & torch.ones(width, width, dtype=torch.bool).tril()
        allowed = allowed[:, None]
        if mask_dtype == torch.bool:
            inputs["attention_mask"] = allowed
        else:
            mask = torch.zeros(allowed.shape, dtype=mask_dtype)
            inputs["attention_mask"] = mask.masked_fill(~allowed, torch.finfo(mask_dtype).min)
    return inputs


@dataclass
class SplitPacking:
    """What packing did to one split."""

    episodes: int
    blocks: int = 0
    real_tokens: int = 0
    capacity: int = 0
    skipped_too_long: list[tuple[str, int, int]] = field(default_factory=list)  # (file, line, tokens)

    @property
    def packed_episodes(self) -> int:
        return self.episodes - len(self.skipped_too_long)

    @property
    def efficiency(self) -> float:
        """Real tokens / (blocks × block size)."""
        return self.real_tokens / self.capacity if self.capacity else 0.0

    def to_dict(self) -> dict:
        return {
            "episodes": self.episodes,
            "packed_episodes": self.packed_episodes,
            "blocks": self.blocks,
            "real_tokens": self.real_tokens,
            "capacity": self.capacity,
            "efficiency": round(self.efficiency, 6),
            "skipped_too_long": len(self.skipped_too_long),
            "skipped_sources": [list(s) for s in self.skipped_too_long[:_LISTED_SKIPS]],
        }


@dataclass
class PackReport:
    """What pack_dataset wrote: per split stats, including every episode it could not pack."""

    out_dir: Path
    block_size: int
    pad_id: int
    splits: dict[str, SplitPacking]

    def summary(self) -> str:
        lines = [f"packed into {self.out_dir} (block size {self.block_size}, pad id {self.pad_id})"]
        for name, s in self.splits.items():
            lines.append(
                f"  {name}: {s.packed_episodes} episodes in {s.blocks} blocks, {s.real_tokens} real tokens, "
                f"efficiency {s.efficiency:.2%}"
            )
            if s.skipped_too_long:
                shown = ", ".join(f"{f}:{line} ({n} tokens)" for f, line, n in s.skipped_too_long[:5])
                lines.append(f"    skipped {len(s.skipped_too_long)} episodes longer than the block: {shown}")
        return "\n".join(lines)


def pack_dataset(
    src_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    block_size: int,
    *,
    group_keys: Mapping[str, Sequence[Hashable]] | None = None,
    force: bool = False,
) -> PackReport:
    """Pack every split of an unpacked dataset into blocks of ``block_size`` tokens, as a new dataset.

    ``group_keys`` maps a split to one key per episode (in stored order): only episodes with equal keys
    share a block. The tokenizer and the source metadata are carried over; "packing" is added.
    """
    src = Path(src_dir)
    meta = read_metadata(src)
    splits = {name: open_dataset(src, name) for name in sorted(meta["splits"])}
    unknown = sorted(name for name, keys in (group_keys or {}).items() if name not in splits and len(keys))
    if unknown:
        raise LossmaskError(f"group_keys names splits {unknown} that {src} does not have")
    for name, ds in splits.items():
        if ds.packed:
            raise LossmaskError(f"{src}: split {name!r} is already packed; pack the unpacked dataset instead")
        if group_keys is not None and name in group_keys and len(group_keys[name]) != len(ds):
            raise LossmaskError(f"group_keys[{name!r}] has {len(group_keys[name])} keys for {len(ds)} episodes")
    tokenizer = load_tokenizer_of(src)
    pad_id = pad_token_id(tokenizer)
    report = PackReport(Path(os.path.abspath(out_dir)), block_size, pad_id, {})
    carried = {k: v for k, v in meta.items() if k not in WRITER_KEYS and k != "packing"}
    user_tokenizer = meta["tokenizer"].get("name_or_path")
    with DatasetWriter(
        out_dir, tokenizer, force=force, inputs=input_names(meta), tokenizer_name=user_tokenizer
    ) as writer:
        for name, ds in splits.items():
            keys = None if group_keys is None else group_keys.get(name)
            report.splits[name] = _pack_split(writer, name, ds, block_size, pad_id, keys)
        carried["packing"] = {
            "block_size": block_size,
            "pad_id": pad_id,
            "splits": {name: s.to_dict() for name, s in report.splits.items()},
        }
        writer.close(carried)
    return report


def _pack_split(
    writer: DatasetWriter, name: str, ds: Dataset, block_size: int, pad_id: int, keys: Sequence[Hashable] | None
) -> SplitPacking:
    lengths = ds.episode_lengths
    fits = np.flatnonzero(lengths <= block_size)
    stats = SplitPacking(episodes=len(ds))
    for i in np.flatnonzero(lengths > block_size).tolist():
        stats.skipped_too_long.append((*ds.episode(i)["source"], int(lengths[i])))
    plan = plan_packing(lengths[fits], block_size, None if keys is None else [keys[i] for i in fits.tolist()])
    for block in plan:
        examples = [dataset_example(ds, int(fits[j])) for j in block]
        writer.add_block(name, examples, block_size, pad_id)
        stats.real_tokens += sum(len(e) for e in examples)
    stats.blocks = len(plan)
    stats.capacity = len(plan) * block_size
    return stats


def dataset_example(ds: Dataset, index: int) -> Example:
    """An unpacked episode back as an Example (what packing and shard merging re-write)."""
    item = ds.episode(index)
    return Example(
        input_ids=np.asarray(item["input_ids"]),
        weights=np.asarray(item["loss_mask"], dtype=np.float32),
        labels=np.asarray(item["labels"]),
        source=Source(*item["source"]),
        truncated=item["truncated"],
    )
