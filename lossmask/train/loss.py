"""Weighted cross-entropy normalised over a whole optimizer window.

The loss of a window is Σ(w·CE) / Σ(w) over every trained token of every micro-batch on every process.
A mean of per-micro-batch means would weight a token in a short micro-batch more than one in a long
one, so each micro-batch instead contributes Σ(w·CE) / W_total, with W_total all-reduced up front.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Callable, ContextManager

import torch
import torch.nn.functional as F

from lossmask.train.attention import EXPLICIT_MASK, mask_for
from lossmask.train.data import Batch
from lossmask.train.neftune import NEFTune


def token_loss_sums(
    logits: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(Σ w·CE, Σ w) over positions with non-zero weight; CE computed in float32."""
    flat_w = weights.reshape(-1)
    keep = flat_w != 0
    picked = logits.reshape(-1, logits.shape[-1])[keep].float()
    ce = F.cross_entropy(picked, targets.reshape(-1)[keep], reduction="none")
    return (ce * flat_w[keep]).sum(), flat_w.sum()


def forward_logits(
    model: torch.nn.Module, batch: Batch, attention: str = "position_ids", neftune: NEFTune | None = None
) -> torch.Tensor:
    """Run the model without labels (the loss is ours) and without a KV cache (so packing is detected)."""
    if neftune is not None:
        neftune.lengths = batch.episode_lengths
    kwargs = {}
    if attention == EXPLICIT_MASK:
        kwargs["attention_mask"] = mask_for(_inner(model), batch.segment_ids)
    return model(input_ids=batch.input_ids, position_ids=batch.position_ids, use_cache=False, **kwargs).logits


def _inner(model: torch.nn.Module) -> torch.nn.Module:
    """The model under a DDP/FSDP wrapper (its config says which attention backend runs)."""
    return getattr(model, "module", model)


def window_backward(
    model: torch.nn.Module,
    batches: list[Batch],
    total_weight: float,
    *,
    grad_scale: float = 1.0,
    attention: str = "position_ids",
    neftune: NEFTune | None = None,
    backward: Callable[[torch.Tensor], None] = torch.Tensor.backward,
    no_sync: Callable[[torch.nn.Module], ContextManager] | None = None,
) -> float:
    """Accumulate gradients of this process's share of the window loss; returns that share (a float).

    ``total_weight`` is Σw over the whole window on all processes (must be > 0). ``grad_scale`` is the
    number of processes when the wrapper averages gradients across them (DDP, FSDP), undoing that mean.
    ``no_sync`` skips the gradient all-reduce on all but the last micro-batch.
    """
    share = 0.0
    for i, batch in enumerate(batches):
        last = i == len(batches) - 1
        with nullcontext() if last or no_sync is None else no_sync(model):
            logits = forward_logits(model, batch, attention, neftune)
            wce, _ = token_loss_sums(logits, batch.targets, batch.weights)
            backward(wce * (grad_scale / total_weight))
        share += float(wce.detach()) / total_weight
    return share


@torch.no_grad()
def loss_sums(model: torch.nn.Module, batches: list[Batch], attention: str = "position_ids") -> tuple[float, float]:
    """(Σ w·CE, Σ w) over batches, for validation."""
    total, weight = 0.0, 0.0
    for batch in batches:
        logits = forward_logits(model, batch, attention)
        wce, w = token_loss_sums(logits, batch.targets, batch.weights)
        total += float(wce)
        weight += float(w)
    return total, weight
