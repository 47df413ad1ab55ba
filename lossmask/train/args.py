"""What a training run is asked to do, and what it reports back (the CLI's interface to training)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from lossmask.train.config import TrainConfig


@dataclass
class TrainArgs:
    """What to train, on what, where to. ``data`` is a stored dataset directory or any Sequence of item dicts.

    ``tokenizer`` (a directory or a loaded tokenizer) defaults to the stored dataset's own. ``init_from``
    loads weights from a checkpoint and starts a fresh run (new optimizer, schedule, data order), e.g. to
    extend the context with ``rope_scale``; ``resume`` (True: the newest checkpoint in ``out``, or a path)
    continues a run exactly. ``stop_after`` ends this invocation after that many windows with a checkpoint
    (the schedule still spans the whole run), so a long run can be split across job slots. A fresh run
    refuses an ``out`` that already holds a run unless ``overwrite`` (which deletes that run's outputs).
    """

    model: str
    data: str | Path | Sequence[dict[str, Any]]
    out: str | Path
    config: TrainConfig = field(default_factory=TrainConfig)
    val_data: Sequence[dict[str, Any]] | None = None
    tokenizer: Any = None
    init_from: str | Path | None = None
    resume: bool | str | Path = False
    overwrite: bool = False
    lora: str | None = None
    quantize: str | None = None  # "4bit" | "8bit" (with lora; CUDA + bitsandbytes only)
    stop_after: int | None = None
    progress: bool = True


@dataclass
class TrainResult:
    out_dir: Path
    final_dir: Path  # OUT/final when finished, else the checkpoint written at the stop
    finished: bool
    iterations: int  # windows done (including skipped ones)
    max_iters: int
    optimizer_steps: int
    skipped_windows: int  # windows with no trained token: no optimizer step
    train_loss: float | None  # the last window's loss
    initial_val_loss: float | None  # before the first step (fresh runs with a val split)
    val_loss: float | None
    tokens: int  # non-padding tokens seen
    trained_tokens: int
    truncated: int  # items cut to block_size
    metrics_path: Path
    loss_plot: Path | None
