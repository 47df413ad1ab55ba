"""From stored items to model inputs: which items each window and process gets, and how they are batched.

Items are dicts as the store yields them: ``input_ids`` (uint32), ``loss_mask`` (float32 weights), and for
packed blocks ``segment_ids`` (1..n per episode, 0 = padding). Any ``Sequence`` of such dicts works.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from lossmask.errors import LossmaskError


@dataclass
class Batch:
    """One micro-batch, right-padded. ``targets[:, t]`` is the token ``logits[:, t]`` must predict.

    ``weights[:, t]`` is the loss weight of that prediction: the stored weight of token t+1, zero where
    token t+1 is padding or starts a new episode (so no episode is ever predicted from another one).
    ``episode_lengths`` holds, per token, the length of the episode it belongs to (0 for padding).
    """

    input_ids: torch.Tensor  # int64 [B, T]
    position_ids: torch.Tensor  # int64 [B, T], restarting at 0 for every episode
    segment_ids: torch.Tensor  # int64 [B, T], 0 = padding
    targets: torch.Tensor  # int64 [B, T]
    weights: torch.Tensor  # float32 [B, T]
    episode_lengths: torch.Tensor  # float32 [B, T]
    tokens: int  # non-padding tokens
    truncated: int  # items cut to block_size

    def to(self, device: torch.device | str) -> "Batch":
        tensors = {
            name: getattr(self, name).to(device)
            for name in ("input_ids", "position_ids", "segment_ids", "targets", "weights", "episode_lengths")
        }
        return Batch(**tensors, tokens=self.tokens, truncated=self.truncated)

    @property
    def weight_sum(self) -> float:
        return float(self.weights.sum())

    @property
    def trained_tokens(self) -> int:
        return int(torch.count_nonzero(self.weights))


def is_packed(dataset: Sequence[dict[str, Any]]) -> bool:
    """Packed datasets carry ``segment_ids``; the first item tells."""
    return len(dataset) > 0 and "segment_ids" in dataset[0]


def collate(items: list[dict[str, Any]], block_size: int, use_loss_mask: bool = True, pad_id: int = 0) -> Batch:
    """Pad items into one Batch; an empty list gives a one-row batch with zero weight (keeps processes in step)."""
    rows = [_row(item, block_size) for item in items] or [
        (np.zeros(2, np.int64), np.zeros(2, np.float32), np.zeros(2, np.int64), False)
    ]
    width = max(len(ids) for ids, _, _, _ in rows)
    n = len(rows)
    ids = np.full((n, width), pad_id, np.int64)
    weight = np.zeros((n, width), np.float32)
    seg = np.zeros((n, width), np.int64)
    for i, (r_ids, r_w, r_seg, _) in enumerate(rows):
        ids[i, : len(r_ids)] = r_ids
        weight[i, : len(r_w)] = r_w
        seg[i, : len(r_seg)] = r_seg
    if not use_loss_mask:
        weight = (seg != 0).astype(np.float32)
    targets = np.zeros_like(ids)
    targets[:, :-1] = ids[:, 1:]
    same_episode = (seg[:, 1:] == seg[:, :-1]) & (seg[:, 1:] != 0)
    target_w = np.zeros_like(weight)
    target_w[:, :-1] = weight[:, 1:] * same_episode
    return Batch(
        input_ids=torch.from_numpy(ids),
        position_ids=torch.from_numpy(position_ids_from_segments(seg)),
        segment_ids=torch.from_numpy(seg),
        targets=torch.from_numpy(targets),
        weights=torch.from_numpy(target_w),
        episode_lengths=torch.from_numpy(_episode_lengths(seg)),
        tokens=int(np.count_nonzero(seg)),
        truncated=sum(1 for *_, cut in rows if cut),
    )


def _row(item: dict[str, Any], block_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, bool]:
    ids = np.asarray(item["input_ids"], dtype=np.int64)
    weight = np.asarray(item["loss_mask"], dtype=np.float32)
    if weight.shape != ids.shape:
        raise LossmaskError(
            f"item from {item.get('source', '?')}: loss_mask has {weight.shape[0]} entries for {ids.shape[0]} tokens"
        )
    if "segment_ids" in item:
        seg = np.asarray(item["segment_ids"], dtype=np.int64)
    else:
        seg = np.ones_like(ids)
    cut = len(ids) > block_size
    return ids[:block_size], weight[:block_size], seg[:block_size], cut


def position_ids_from_segments(seg: np.ndarray) -> np.ndarray:
    """Positions restart at 0 at every episode start; padding continues the positions before it.

    Restarting positions are what transformers (``find_packed_sequence_indices``) and flash-attention's
    varlen path read to keep attention inside each episode. Padding joins the episode before it: causal
    attention means no real token ever sees it, and an unpacked row stays one plain run of positions, so
    it keeps the fast plain-causal kernels.
    """
    width = seg.shape[1]
    idx = np.broadcast_to(np.arange(width), seg.shape)
    start = np.ones_like(seg, dtype=bool)
    start[:, 1:] = (seg[:, 1:] != seg[:, :-1]) & (seg[:, 1:] != 0)
    last_start = np.maximum.accumulate(np.where(start, idx, 0), axis=1)
    return (idx - last_start).astype(np.int64)


def _episode_lengths(seg: np.ndarray) -> np.ndarray:
    out = np.zeros(seg.shape, np.float32)
    for i, row in enumerate(seg):
        counts = np.bincount(row)
        out[i] = counts[row]
    out[seg == 0] = 0.0
    return out


class WindowSampler:
    """Which items each optimizer window takes; its state is the data position a resume continues from.

    A window is ``window_size`` item indices (batch_size × grad_accum × processes). See TrainConfig for
    the ``epoch`` and ``random`` modes.
    """

    def __init__(self, n_items: int, window_size: int, mode: str, seed: int):
        if n_items < 1:
            raise LossmaskError("the training set is empty")
        self.n_items = n_items
        self.window_size = window_size
        self.mode = mode
        self.seed = seed
        self.iteration = 0
        self.epoch = 0
        self.offset = 0
        self.permutation = self._permutation(0) if mode == "epoch" else None

    def _permutation(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(self.n_items)

    def next_window(self) -> np.ndarray:
        self.iteration += 1
        if self.mode == "random":
            rng = np.random.default_rng([self.seed, self.iteration - 1])
            return rng.integers(0, self.n_items, self.window_size)
        parts = []
        need = self.window_size
        while need:
            take = self.permutation[self.offset : self.offset + need]
            parts.append(take)
            need -= len(take)
            self.offset += len(take)
            if self.offset == self.n_items:
                self.epoch += 1
                self.offset = 0
                self.permutation = self._permutation(self.epoch)
        return np.concatenate(parts)

    def state_dict(self) -> dict[str, Any]:
        return {
            "iteration": self.iteration,
            "epoch": self.epoch,
            "offset": self.offset,
            "n_items": self.n_items,
            "window_size": self.window_size,
            "mode": self.mode,
            "seed": self.seed,
        }

    def load_state_dict(self, state: dict[str, Any], permutation: np.ndarray | None) -> None:
        for key in ("n_items", "window_size", "mode", "seed"):
            if state[key] != getattr(self, key):
                raise LossmaskError(
                    f"cannot resume: the checkpoint's {key} is {state[key]!r} but this run has {getattr(self, key)!r}; "
                    "resume with the same data, seed, batch_size × grad_accum × processes and sampling mode"
                )
        self.iteration, self.epoch, self.offset = state["iteration"], state["epoch"], state["offset"]
        if self.mode == "epoch":
            if permutation is None or len(permutation) != self.n_items:
                raise LossmaskError(
                    "cannot resume: the checkpoint's data permutation is missing or has the wrong length"
                )
            self.permutation = permutation


def rank_micro_batches(window: np.ndarray, grad_accum: int, world_size: int, rank: int) -> list[np.ndarray]:
    """Split a window into this process's micro-batches: micro-batch j of every process together is slice j.

    So a run on P processes with batch_size B sees, in each micro-batch step, exactly the items a single
    process with batch_size P·B would: no duplicates, no gaps.
    """
    per_micro = len(window) // grad_accum
    per_rank = per_micro // world_size
    out = []
    for j in range(grad_accum):
        micro = window[j * per_micro : (j + 1) * per_micro]
        out.append(micro[rank * per_rank : (rank + 1) * per_rank])
    return out


def eval_micro_batches(n_items: int, batch_size: int, eval_iters: int, world_size: int, rank: int) -> list[np.ndarray]:
    """A fixed prefix of the validation split, split like training; every process gets the same count of
    micro-batches (possibly empty ones) so sharded models stay in step."""
    per_step = batch_size * world_size
    total = min(n_items, eval_iters * per_step)
    steps = -(-total // per_step)
    out = []
    for j in range(steps):
        lo = j * per_step + rank * batch_size
        hi = min(lo + batch_size, (j + 1) * per_step, total)
        out.append(np.arange(lo, max(lo, hi)))
    return out
