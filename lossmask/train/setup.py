"""Everything a run needs before its first window: the output directory, data, model and optimizer."""

from __future__ import annotations

import random
import shutil
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from lossmask.errors import LossmaskError
from lossmask.train.args import TrainArgs
from lossmask.train.checkpoint import STATE_DIR, checkpoint_dirs, load_plain
from lossmask.train.config import TrainConfig
from lossmask.train.lora import apply_lora, parse_lora, quantization_config
from lossmask.train.models import build_model, fit_vocabulary, is_preset

RUN_OUTPUTS = ("checkpoints", "final", "metrics.jsonl", "loss.png", "tensorboard")


def prepare_out_dir(out: Path, resume: bool, overwrite: bool) -> None:
    """A fresh run must not mix with an earlier one in ``out`` (pruning would even delete the new checkpoints)."""
    out.mkdir(parents=True, exist_ok=True)
    if resume:
        return
    existing = [name for name in RUN_OUTPUTS if (out / name).exists() or (out / name).is_symlink()]
    if existing and not overwrite:
        state = " (it has checkpoints: resume to continue it)" if checkpoint_dirs(out) else ""
        raise LossmaskError(
            f"{out} already holds a training run{state}; choose another output directory, resume, or overwrite"
        )
    for name in existing:
        path = out / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()


def _has_split(path, split: str) -> bool:
    from lossmask.shards import is_shard_root, shard_dirs
    from lossmask.store import read_metadata

    dirs = shard_dirs(path) if is_shard_root(path) else [path]
    return any(split in read_metadata(d)["splits"] for d in dirs)


def open_data(args: TrainArgs, pairs: bool = False) -> tuple[Sequence, Sequence | None, Any, dict]:
    """(train, val or None, tokenizer or None, dataset metadata). A stored dataset may lack a val split.

    ``pairs`` says which kind the trainer needs: SFT refuses a preference-pair dataset and DPO an SFT one,
    before any model is built.
    """
    metadata: dict = {}
    tokenizer = args.tokenizer
    if isinstance(args.data, (str, Path)):
        from lossmask.store import open_dataset

        train = open_dataset(args.data, split="train")
        is_pairs = train.metadata.get("kind") == "pairs"
        if is_pairs and not pairs:
            raise LossmaskError(f"{args.data} is a preference-pair dataset: train on it with `lossmask dpo`")
        if pairs and not is_pairs:
            raise LossmaskError(
                f"{args.data} is not a preference-pair dataset: prepare one with `lossmask prepare --pairs`"
            )
        val = open_dataset(args.data, split="val") if _has_split(args.data, "val") else None  # damage still raises
        metadata = {k: v for k, v in (getattr(train, "metadata", None) or {}).items() if k != "files"}
        if tokenizer is None:
            from lossmask.store import load_tokenizer_of

            tokenizer = load_tokenizer_of(train.tokenizer_path.parent)
    else:
        train, val = args.data, None
    if args.val_data is not None:
        val = args.val_data
    if isinstance(tokenizer, (str, Path)):
        from lossmask.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(str(tokenizer))
    if len(train) == 0:
        raise LossmaskError("the training set is empty: nothing to train on")
    return train, (val if val is not None and len(val) > 0 else None), tokenizer, metadata


def make_model(
    args: TrainArgs, cfg: TrainConfig, tokenizer: Any, resume_dir: Path | None
) -> tuple[torch.nn.Module, dict]:
    """The model (with LoRA when asked) and the run info saved with every checkpoint.

    Resuming a full fine-tune loads the checkpoint's weights; resuming LoRA rebuilds the base and loads
    the checkpoint's adapter.
    """
    source = str(args.init_from or args.model)
    spec = parse_lora(args.lora) if args.lora else None
    qconf = quantization_config(args.quantize)
    if qconf is not None and spec is None:
        raise LossmaskError(f"quantize {args.quantize} trains a frozen quantized base: it needs lora")
    if spec is not None and is_preset(source):
        raise LossmaskError(
            f"LoRA adapts pretrained weights; {source!r} is a preset built from scratch: pass a model directory"
        )
    info: dict[str, Any] = {
        "model": str(args.model),
        "init_from": str(args.init_from) if args.init_from else None,
        "base_model": str(Path(source).resolve()) if Path(source).exists() else source,
        "lora": str(spec) if spec else None,
        "rope_scale": cfg.rope_scale,
        "config": cfg.to_dict(),
    }
    if resume_dir is not None and spec is None:
        return build_model(str(resume_dir), cfg, tokenizer, check_arch_fields=False), info
    model = build_model(source, cfg, tokenizer, quantization_config=qconf)
    fit_vocabulary(model, tokenizer, resizable=spec is None)
    if spec is None:
        return model, info
    if qconf is not None:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.gradient_checkpointing)
    if resume_dir is not None:
        from peft import PeftModel

        return PeftModel.from_pretrained(model, str(resume_dir), is_trainable=True), info
    return apply_lora(model, spec), info


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW; weight decay on matrices only (norm gains and biases are not decayed)."""
    decay, no_decay = [], []
    for _, param in model.named_parameters():
        if param.requires_grad:
            (decay if param.ndim >= 2 else no_decay).append(param)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps)


def load_optimizer_state(accelerator, optimizer, model, resume_dir: Path, fsdp: bool) -> None:
    state_dir = resume_dir / STATE_DIR
    if fsdp:
        from accelerate.utils import load_fsdp_optimizer

        load_fsdp_optimizer(accelerator.state.fsdp_plugin, accelerator, optimizer, model, str(state_dir))
        return
    optimizer.load_state_dict(load_plain(state_dir / "optimizer.pt", resume_dir, accelerator.device))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def pad_id(tokenizer: Any) -> int:
    """Padding never carries loss and, right-aligned under causal attention, is never attended to: any id works."""
    for name in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, name, None)
        if isinstance(value, int):
            return value
    return 0
