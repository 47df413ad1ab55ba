"""Keeping attention inside each episode of a packed block, on whatever attention backend the model uses.

transformers 5 builds a block-diagonal causal mask from restarting ``position_ids`` (sdpa, eager, flex:
``masking_utils.find_packed_sequence_indices``) and flash-attention uses them as varlen boundaries. A
model whose code does not do that would silently attend across episodes, so before training on packed
data we probe the model: if an episode's logits change when the episode before it changes, restarting
positions are not enough and we pass an explicit 4D block-diagonal mask instead (eager and sdpa only).
"""

from __future__ import annotations

import torch

from lossmask.errors import LossmaskError

POSITION_IDS = "position_ids"
EXPLICIT_MASK = "mask"
_MASK_BACKENDS = ("eager", "sdpa")


def block_causal_mask(segment_ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[B, 1, T, T] mask letting token q see token k iff k <= q and both share a segment (padding included).

    Boolean (True = attend) for sdpa; for eager an additive float mask (0 or the dtype's minimum).
    """
    width = segment_ids.shape[1]
    same = segment_ids[:, :, None] == segment_ids[:, None, :]
    causal = torch.ones(width, width, dtype=torch.bool, device=segment_ids.device).tril()
    allowed = (same & causal)[:, None]
    if dtype == torch.bool:
        return allowed
    return torch.zeros(allowed.shape, dtype=dtype, device=segment_ids.device).masked_fill(
        ~allowed, torch.finfo(dtype).min
    )


def attention_backend(model: torch.nn.Module) -> str:
    return str(getattr(model.config, "_attn_implementation", None) or "eager")


def mask_for(model: torch.nn.Module, segment_ids: torch.Tensor) -> torch.Tensor:
    """The explicit mask in the form the model's backend takes."""
    dtype = torch.bool if attention_backend(model) == "sdpa" else next(model.parameters()).dtype
    return block_causal_mask(segment_ids, dtype)


def packed_attention_mode(model: torch.nn.Module, vocab_size: int) -> str:
    """Which way of isolating episodes works for this model: ``position_ids`` or an explicit ``mask``.

    The probe runs two packed rows whose second episode is identical and whose first differs; isolated
    attention gives the second episode bit-for-bit (or float-noise) equal logits. Uses its own RNG so
    the training RNG stream is untouched.
    """
    if _isolates(model, vocab_size, explicit=False):
        return POSITION_IDS
    backend = attention_backend(model)
    if backend in _MASK_BACKENDS and _isolates(model, vocab_size, explicit=True):
        return EXPLICIT_MASK
    raise LossmaskError(
        f"{type(model).__name__} with attention backend {backend!r} lets packed episodes attend to each other "
        "(restarting position_ids are ignored"
        + (" and an explicit 4D mask did not help" if backend in _MASK_BACKENDS else "")
        + "); train on unpacked data, or set attn_implementation: sdpa or eager"
    )


@torch.no_grad()
def _isolates(model: torch.nn.Module, vocab_size: int, explicit: bool) -> bool:
    gen = torch.Generator().manual_seed(0)
    first, second = 6, 10
    device = next(model.parameters()).device
    head = torch.randint(0, vocab_size, (2, first), generator=gen)
    tail = torch.randint(0, vocab_size, (1, second), generator=gen).expand(2, second)
    ids = torch.cat([head, tail], dim=1).to(device)
    positions = torch.cat([torch.arange(first), torch.arange(second)]).expand(2, -1).to(device)
    segments = torch.cat([torch.ones(first), torch.full((second,), 2)]).long().expand(2, -1).to(device)
    was_training = model.training
    model.eval()
    try:
        kwargs = {"attention_mask": mask_for(model, segments)} if explicit else {}
        logits = model(input_ids=ids, position_ids=positions, use_cache=False, **kwargs).logits.float()
    finally:
        model.train(was_training)
    a, b = logits[0, first:], logits[1, first:]
    scale = max(1.0, float(a.abs().max()))
    return bool((a - b).abs().max() <= 1e-4 * scale)
