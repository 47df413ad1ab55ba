"""Learning rate as a pure function of the window number, so resuming needs no scheduler object."""

from __future__ import annotations

import math
from typing import Any

from lossmask.train.config import TrainConfig


def lr_at(iteration: int, config: TrainConfig, max_iters: int) -> float:
    """LR for window ``iteration`` (0-based): linear warmup to ``lr``, then decay to ``min_lr`` at ``max_iters``."""
    if iteration < config.warmup_iters:
        return config.lr * (iteration + 1) / config.warmup_iters
    if config.decay == "constant":
        return config.lr
    span = max(1, max_iters - config.warmup_iters)
    progress = min(1.0, (iteration - config.warmup_iters) / span)
    if config.decay == "linear":
        factor = 1.0 - progress
    else:
        factor = 0.5 * (1.0 + math.cos(math.pi * progress))
    return config.min_lr + (config.lr - config.min_lr) * factor


def set_lr(optimizer: Any, iteration: int, config: TrainConfig, max_iters: int) -> float:
    """Put window ``iteration``'s LR (``lr_at``) on every param group of ``optimizer``; returns it.

    SFT and DPO windows start the same way, so both set it here.
    """
    lr = lr_at(iteration, config, max_iters)
    for group in optimizer.param_groups:
        group["lr"] = lr
    return lr
