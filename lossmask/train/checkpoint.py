"""Checkpoints: an HF model directory (safetensors + tokenizer) plus the state a resume needs.

Layout of ``OUT/checkpoints/iter_0000100/``::

    config.json, model.safetensors (or adapter_*.safetensors for LoRA), tokenizer files
    lossmask_train.json        how the model was made: base model, LoRA spec, rope_scale, config, data metadata
    trainer_state/state.json   iteration, data position, counters, config
    trainer_state/permutation.npy, optimizer.pt, rng_rank{N}.pt (python, numpy, torch, cuda RNG per process)

The model weights are saved once and serve both plain ``from_pretrained`` and resuming. Every checkpoint
is written to a temporary directory and renamed into place, so a crash never leaves a half checkpoint.
"""

from __future__ import annotations

import json
import os
import pickle
import random
import re
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from lossmask.atomic import replace_directory
from lossmask.errors import LossmaskError

RUN_INFO = "lossmask_train.json"
STATE_DIR = "trainer_state"
_ITER_DIR = re.compile(r"^iter_(\d+)$")


@contextmanager
def atomic_directory(final: Path, is_main: bool = True, barrier=lambda: None) -> Iterator[Path]:
    """Yield a temporary sibling of ``final`` to fill; on success it replaces ``final``.

    With several processes every one may write into it (the name is shared); ``barrier`` waits for all of
    them before the main process renames.
    """
    final = Path(final)
    tmp = final.parent / f".tmp-{final.name}"
    if is_main:
        final.parent.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    barrier()
    try:
        yield tmp
    except BaseException:
        if is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    barrier()
    if is_main:
        replace_directory(tmp, final)
    barrier()


def write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def save_model_files(
    directory: Path, model: torch.nn.Module, state_dict: dict | None, tokenizer: Any | None, run_info: dict
) -> None:
    """What ``from_pretrained`` (or peft) reads, plus the tokenizer and lossmask's run info."""
    from transformers.utils import logging as hf_logging

    bar_was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # a shard bar per checkpoint would break the training progress bar
    try:
        model.save_pretrained(directory, state_dict=state_dict)
    finally:
        if bar_was_on:
            hf_logging.enable_progress_bar()
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
    write_json(directory / RUN_INFO, run_info)


def rng_state() -> dict[str, Any]:
    """Every RNG's state as plain Python values and tensors, so it loads with ``weights_only=True``."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    numpy_state = (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached)
    state = {"python": random.getstate(), "numpy": numpy_state, "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.int64).astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_trainer_state(
    directory: Path,
    *,
    rank: int,
    is_main: bool,
    state: dict,
    permutation: np.ndarray | None,
    optimizer_state: dict | None,
) -> None:
    """This process's share of the trainer state (RNG on every process; the rest on the main one)."""
    state_dir = directory / STATE_DIR
    state_dir.mkdir(exist_ok=True)
    torch.save(rng_state(), state_dir / f"rng_rank{rank}.pt")
    if is_main:
        write_json(state_dir / "state.json", state)
        if permutation is not None:
            np.save(state_dir / "permutation.npy", permutation)
        if optimizer_state is not None:
            torch.save(optimizer_state, state_dir / "optimizer.pt")


def load_trainer_state(directory: Path, rank: int) -> tuple[dict, np.ndarray | None, dict | None]:
    """(state.json, permutation or None, this process's RNG state or None).

    A process the checkpoint had no RNG state for (resuming on more processes than it was saved with)
    gets None and starts a fresh stream: only dropout and NEFTune noise draw from it.
    """
    state_dir = Path(directory) / STATE_DIR
    state_file = state_dir / "state.json"
    if not state_file.is_file():
        raise LossmaskError(
            f"cannot resume from {directory}: it has no {STATE_DIR}/state.json (not a training checkpoint)"
        )
    state = json.loads(state_file.read_text(encoding="utf-8"))
    perm_file = state_dir / "permutation.npy"
    try:  # np.load refuses pickled object arrays (allow_pickle=False)
        permutation = np.load(perm_file) if perm_file.is_file() else None
    except ValueError as exc:
        raise LossmaskError(f"cannot resume from {directory}: {perm_file.name} is not a plain array: {exc}") from None
    rng_file = state_dir / f"rng_rank{rank}.pt"
    if not rng_file.is_file():
        return state, permutation, None
    return state, permutation, load_plain(rng_file, directory)


def load_plain(path: Path, directory: Path, map_location: Any = None) -> Any:
    """``torch.load`` of tensors and plain values only: a checkpoint from elsewhere must not run code."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        raise LossmaskError(
            f"cannot resume from {directory}: {path.name} holds more than tensors and plain values, which is "
            f"refused (loading it could run code); it was not written by this version of lossmask: {exc}"
        ) from None


def checkpoint_dirs(out_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints under ``OUT/checkpoints``, oldest first."""
    root = Path(out_dir) / "checkpoints"
    found = []
    if root.is_dir():
        for child in root.iterdir():
            match = _ITER_DIR.match(child.name)
            if match and (child / STATE_DIR / "state.json").is_file():
                found.append((int(match.group(1)), child))
    return sorted(found)


def latest_checkpoint(out_dir: Path) -> Path:
    found = checkpoint_dirs(out_dir)
    if not found:
        raise LossmaskError(f"nothing to resume: {Path(out_dir) / 'checkpoints'} holds no checkpoint")
    return found[-1][1]


def checkpoint_path(out_dir: Path, iteration: int) -> Path:
    return Path(out_dir) / "checkpoints" / f"iter_{iteration:07d}"


def prune_checkpoints(out_dir: Path, keep: int) -> None:
    """Delete all but the newest ``keep`` checkpoints (``keep`` 0 keeps all)."""
    if keep <= 0:
        return
    for _, path in checkpoint_dirs(out_dir)[:-keep]:
        shutil.rmtree(path)


def link_final(out_dir: Path, checkpoint: Path) -> Path:
    """Point ``OUT/final`` at the last checkpoint (a relative symlink, swapped in atomically)."""
    final = Path(out_dir) / "final"
    tmp = Path(out_dir) / ".tmp-final"
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    tmp.symlink_to(os.path.relpath(checkpoint, out_dir))
    if final.exists() and not final.is_symlink():
        shutil.rmtree(final)
    os.replace(tmp, final)
    return final
