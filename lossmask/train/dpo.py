"""DPO on a pair dataset (``lossmask dpo``): sigmoid loss, masked sequence log-probabilities, frozen reference.

Loss of a pair: ``-log σ(β·((π_c - r_c) - (π_r - r_r)))`` with β = ``beta`` (default 0.1). π and r are the
policy's and the reference's sequence log-probabilities of a side, ``Σ_t w_t · log p(x_t | x_<t)`` over the
tokens the mask trains: the stored loss weights multiply the token log-probabilities (0 on the prompt, 1
on the response and its stop; a weighted mypt profile scales tokens as it does in SFT).

Normalisation, as in SFT: the loss of an optimizer window is the mean over the valid pairs of the whole
window on every process. The count is all-reduced before the first micro-batch and each micro-batch adds
``Σ loss_i / N_window``, never a mean of per-micro-batch means. A pair is valid when both sides keep a
trained token after the ``block_size`` cut; a window without one is skipped (no optimizer step), reported.

The reference, never a second copy of the model in memory:

- full fine-tuning: the reference is the starting policy. Its log-probabilities for every pair (train,
  and the validation prefix) are computed once before training, in eval mode, split over processes and
  all-reduced; training then reads them by pair index.
- LoRA (``lora``): a new adapter is trained on the SFT model; the reference is the same model with the
  adapter disabled (peft's ``disable_adapter()``), run in eval mode without gradients for every micro-batch.

An SFT checkpoint that is a LoRA *adapter* is first merged into its base, and the merged model is written
to ``OUT/reference`` (an HF model directory): the starting policy, and with LoRA the base of the new
adapter, so the DPO adapter loads, merges and generates with the usual tools (its run info names it as
``base_model``). A full SFT model directory is used as it is.

Config: every SFT key (train/config.py) plus ``beta``; ``DPO_DEFAULTS`` replace the SFT defaults that do
not suit preference tuning of large models (lr 5e-6, linear decay, 4 x 4 pairs a window). ``use_loss_mask:
false`` and NEFTune do not apply and are refused. Checkpoints are those of SFT (atomic, HF format, run info in
``lossmask_train.json``); a run is not resumable (no optimizer state is saved).

Metrics per window in ``OUT/metrics.jsonl`` (and the progress bar): ``loss``, ``reward_margin`` (mean
``β·((π_c - r_c) - (π_r - r_r))``), ``accuracy`` (pairs with a positive margin), ``reward_chosen``,
``reward_rejected``, ``logp_chosen``, ``logp_rejected`` (policy), ``ref_logp_chosen``, ``ref_logp_rejected``
(means over the window's pairs), ``pairs``, ``lr``, ``grad_norm``; ``val_*`` of the same at evaluations.
"""

from __future__ import annotations

import difflib
import math
import time
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from lossmask.errors import LossmaskError
from lossmask.train.attention import POSITION_IDS
from lossmask.train.checkpoint import (
    atomic_directory,
    checkpoint_path,
    link_final,
    prune_checkpoints,
    save_model_files,
    save_trainer_state,
)
from lossmask.train.config import TrainConfig, coerce, config_from_dict, config_keys, read_config_file
from lossmask.train.data import Batch, collate, eval_micro_batches, rank_micro_batches
from lossmask.train.loop import make_accelerator, optimizer_step, training_windows
from lossmask.train.lora import apply_lora, is_adapter_dir, merge_adapter, parse_lora, quantization_config
from lossmask.train.loss import forward_logits
from lossmask.train.metrics import MetricsLog
from lossmask.train.models import build_model, fit_vocabulary, is_preset
from lossmask.train.schedule import set_lr
from lossmask.train.setup import make_optimizer, open_data, pad_id, prepare_out_dir, seed_everything

DPO_KEYS = ("beta",)
DPO_DEFAULTS: dict[str, Any] = {
    "lr": 5e-6,
    "batch_size": 4,
    "grad_accum": 4,
    "warmup_iters": 10,
    "decay": "linear",
    "eval_interval": 50,
    "eval_iters": 10,
}
REFERENCE_DIR = "reference"
# Sums kept per window (then divided by its pair count): the metrics of the module docstring.
METRICS = (
    "loss", "accuracy", "reward_margin", "reward_chosen", "reward_rejected",
    "logp_chosen", "logp_rejected", "ref_logp_chosen", "ref_logp_rejected",
)


# -- config -----------------------------------------------------------------------------------------------
@dataclass
class DPOConfig:
    """A DPO run's settings: ``beta`` and the SFT TrainConfig (with DPO's defaults) for everything else."""

    train: TrainConfig = field(default_factory=lambda: config_from_dict(dict(DPO_DEFAULTS), "DPO defaults"))
    beta: float = 0.1

    def __post_init__(self) -> None:
        if not (math.isfinite(self.beta) and self.beta > 0):
            raise LossmaskError(f"config beta must be a positive number, got {self.beta}")
        if not self.train.use_loss_mask:
            raise LossmaskError("config use_loss_mask: false does not apply to DPO: log-probabilities are summed "
                                "over the response tokens the mask trains")
        if self.train.neftune_alpha > 0:
            raise LossmaskError("config neftune_alpha does not apply to DPO; remove it")

    def to_dict(self) -> dict[str, Any]:
        return {**self.train.to_dict(), "beta": self.beta}


def dpo_config_from_dict(data: dict[str, Any], source: str = "config") -> DPOConfig:
    """DPO_DEFAULTS, then ``data`` (SFT keys and ``beta``); an unknown key is an error naming the closest one."""
    if not isinstance(data, dict):
        raise LossmaskError(f"{source}: expected a mapping of config keys, got {type(data).__name__}")
    keys = [*config_keys(), "schedule", *DPO_KEYS]
    for key in data:
        if key not in keys:
            close = difflib.get_close_matches(str(key), keys, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f"; valid keys: {', '.join(keys)}"
            raise LossmaskError(f"{source}: unknown config key {key!r}{hint}")
    flat = dict(data)
    beta = coerce("beta", flat.pop("beta", 0.1), float, source)
    nested = flat.get("schedule") if isinstance(flat.get("schedule"), dict) else {}
    defaults = {k: v for k, v in DPO_DEFAULTS.items() if k not in nested}
    return DPOConfig(config_from_dict({**defaults, **flat}, source), beta)


def load_dpo_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> DPOConfig:
    """Read a JSON or YAML DPO config (or none: the defaults), then apply ``overrides`` (``--set``) on top."""
    data, source = read_config_file(path)
    return dpo_config_from_dict({**data, **(overrides or {})}, source)


# -- the loss -------------------------------------------------------------------------------------------------
def sequence_logps(logits: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Per row, ``Σ_t w_t · log softmax(logits_t)[target_t]`` over positions with a non-zero weight (float32)."""
    rows = weights.shape[0]
    keep = weights != 0
    picked = logits[keep].float()
    token_logps = -F.cross_entropy(picked, targets[keep], reduction="none")
    row_of = torch.arange(rows, device=weights.device).unsqueeze(1).expand_as(weights)[keep]
    out = torch.zeros(rows, dtype=torch.float32, device=logits.device)
    return out.index_add(0, row_of, token_logps * weights[keep].float())


def dpo_losses(
    policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor, ref_rejected: torch.Tensor,
    beta: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(per-pair sigmoid DPO loss, chosen reward, rejected reward); reward = β · (policy - reference)."""
    reward_chosen = beta * (policy_chosen - ref_chosen)
    reward_rejected = beta * (policy_rejected - ref_rejected)
    return -F.logsigmoid(reward_chosen - reward_rejected), reward_chosen, reward_rejected


@dataclass
class PairBatch:
    """A micro-batch of pairs as one Batch: rows ``[0, n)`` are the chosen sides, ``[n, 2n)`` the rejected ones."""

    batch: Batch
    n: int
    valid: torch.Tensor  # bool [n]: both sides keep a trained token
    indices: np.ndarray  # item indices in the split (reference log-probs are looked up by them)

    def to(self, device: torch.device | str) -> PairBatch:
        return PairBatch(self.batch.to(device), self.n, self.valid.to(device), self.indices)


def collate_pairs(items: list[dict[str, Any]], indices: Sequence[int], block_size: int, pad: int = 0) -> PairBatch:
    """Pad both sides of every pair into one Batch (cut to ``block_size`` like SFT items)."""
    for item in items:
        if "chosen" not in item or "rejected" not in item:
            raise LossmaskError(f"item from {item.get('source', '?')} is not a preference pair (no chosen/rejected): "
                                "DPO trains on a dataset written by `lossmask prepare --pairs`")
    batch = collate([it["chosen"] for it in items] + [it["rejected"] for it in items], block_size, True, pad)
    n = len(items)
    has = batch.weights.sum(dim=1) > 0
    return PairBatch(batch, n, has[:n] & has[n : 2 * n], np.asarray(indices, dtype=np.int64))


def pair_logps(model: torch.nn.Module, pairs: PairBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen, rejected) sequence log-probabilities of ``model`` for a pair batch (one forward pass)."""
    logits = forward_logits(model, pairs.batch, POSITION_IDS)
    logps = sequence_logps(logits, pairs.batch.targets, pairs.batch.weights)
    return logps[: pairs.n], logps[pairs.n : 2 * pairs.n]


# -- the run --------------------------------------------------------------------------------------------------
@dataclass
class DPOArgs:
    """What to tune, on what, where to. ``model`` is the SFT checkpoint: an HF model directory or a LoRA adapter.

    ``data`` is a pair dataset directory (``prepare --pairs``) or a Sequence of pair items; ``lora`` trains a
    new adapter (see the module docstring); ``quantize`` (4bit/8bit, with lora, CUDA) quantizes the base.
    """

    model: str | Path
    data: str | Path | Sequence[dict[str, Any]]
    out: str | Path
    config: DPOConfig = field(default_factory=DPOConfig)
    val_data: Sequence[dict[str, Any]] | None = None
    tokenizer: Any = None
    lora: str | None = None
    quantize: str | None = None
    overwrite: bool = False
    progress: bool = True


@dataclass
class DPOResult:
    out_dir: Path
    final_dir: Path  # OUT/final: a full model directory, or the DPO adapter
    iterations: int
    optimizer_steps: int
    skipped_windows: int
    last: dict[str, float]  # the last trained window's metrics
    val: dict[str, float] | None  # the final evaluation (val_loss, val_accuracy, ...)
    reference: str  # "precomputed" (full fine-tuning) or "adapter_disabled" (LoRA)
    reference_dir: Path | None  # OUT/reference when an SFT adapter was merged for LoRA
    metrics_path: Path


def run_dpo(args: DPOArgs) -> DPOResult:
    """Tune ``args.model`` on preference pairs as ``args`` says; returns where the model is and how it went."""
    return DPORun(args).train()


class DPORun:
    """One DPO invocation: owns the accelerator, policy, optimizer, reference log-probs and data position."""

    def __init__(self, args: DPOArgs):
        from accelerate.utils import DistributedType

        _check_sft_checkpoint(args.model)
        self.args = args
        self.cfg = cfg = args.config.train
        self.beta = args.config.beta
        self.out = Path(args.out)
        self.acc = make_accelerator(cfg.use_amp, cfg.amp_dtype)
        self.rank, self.world, self.is_main = self.acc.process_index, self.acc.num_processes, self.acc.is_main_process
        self.fsdp = self.acc.distributed_type == DistributedType.FSDP
        if self.is_main:
            prepare_out_dir(self.out, resume=False, overwrite=args.overwrite)
        self.acc.wait_for_everyone()
        self.train_ds, self.val_ds, self.tokenizer, metadata = open_data(args, pairs=True)
        seed_everything(cfg.seed)
        model, self.reference_dir, base = self._policy()
        self.reference = "adapter_disabled" if args.lora else "precomputed"
        self.run_info = {
            "model": str(args.model),
            "base_model": str(base.resolve()),
            "lora": args.lora and str(parse_lora(args.lora)),
            "rope_scale": cfg.rope_scale,
            "config": args.config.to_dict(),
            "dpo": {"beta": self.beta, "reference": self.reference, "sft_checkpoint": str(args.model)},
            "dataset_metadata": metadata,
        }
        if not (args.quantize or self.fsdp):
            model.to(self.acc.device)
        if cfg.gradient_checkpointing:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        self.model, self.optimizer = self.acc.prepare(model, make_optimizer(model, cfg))
        self.sampler, self.max_iters = training_windows(len(self.train_ds), cfg, self.world)
        self.counters = {"pairs": 0, "tokens": 0, "truncated": 0, "skipped_windows": 0, "optimizer_steps": 0}
        self.pad_id = pad_id(self.tokenizer)
        self.val_batches = (eval_micro_batches(len(self.val_ds), cfg.batch_size, cfg.eval_iters, self.world, self.rank)
                            if self.val_ds else [])
        self.ref_table: dict[str, torch.Tensor] = {}
        if self.reference == "precomputed":
            self.ref_table["train"] = self._precompute(self.train_ds, self._all_batches(len(self.train_ds)))
            if self.val_ds:
                self.ref_table["val"] = self._precompute(self.val_ds, self.val_batches)
        seed_everything(cfg.seed + self.rank)
        self.log = MetricsLog(self.out, enabled=self.is_main)

    # -- model and reference ------------------------------------------------------------------------------
    def _policy(self) -> tuple[torch.nn.Module, Path | None, Path]:
        """(policy, OUT/reference or None, base directory) built from the SFT checkpoint (module docstring)."""
        args, cfg = self.args, self.cfg
        sft = Path(args.model)
        spec = parse_lora(args.lora) if args.lora else None
        qconf = quantization_config(args.quantize)
        if qconf is not None and spec is None:
            raise LossmaskError(f"quantize {args.quantize} trains a frozen quantized base: it needs lora")
        reference_dir, base = None, sft
        if is_adapter_dir(sft):
            reference_dir = base = self.out / REFERENCE_DIR
            if self.is_main:
                merge_adapter(sft, reference_dir)
            self.acc.wait_for_everyone()
        model = build_model(str(base), cfg, self.tokenizer, quantization_config=qconf)
        fit_vocabulary(model, self.tokenizer, resizable=spec is None)
        if spec is None:
            return model, reference_dir, base
        if qconf is not None:
            from peft import prepare_model_for_kbit_training

            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.gradient_checkpointing)
        return apply_lora(model, spec), reference_dir, base

    def _all_batches(self, n: int) -> list[np.ndarray]:
        per_step = self.cfg.batch_size * self.world
        return eval_micro_batches(n, self.cfg.batch_size, -(-n // per_step), self.world, self.rank)

    def _pairs(self, dataset, indices) -> PairBatch:
        items = [dataset[int(i)] for i in indices]
        return collate_pairs(items, indices, self.cfg.block_size, self.pad_id).to(self.acc.device)

    @torch.no_grad()
    def _precompute(self, dataset, batches: list[np.ndarray]) -> torch.Tensor:
        """Reference log-probs of the starting policy for the pairs in ``batches``, gathered on every process."""
        table = torch.zeros(len(dataset), 2, dtype=torch.float64, device=self.acc.device)
        self.model.eval()
        for idx in batches:
            pairs = self._pairs(dataset, idx)
            chosen, rejected = pair_logps(self.model, pairs)
            rows = torch.as_tensor(pairs.indices, device=table.device)
            table[rows, 0] = chosen.double()
            table[rows, 1] = rejected.double()
        self.model.train()
        return self.acc.reduce(table, "sum")

    @torch.no_grad()
    def reference_logps(self, pairs: PairBatch, split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
        """(chosen, rejected) log-probs of the frozen reference for a pair batch."""
        if self.reference == "precomputed":
            rows = self.ref_table[split][torch.as_tensor(pairs.indices, device=self.acc.device)].float()
            return rows[:, 0], rows[:, 1]
        was_training = self.model.training
        self.model.eval()
        try:
            with self.acc.unwrap_model(self.model).disable_adapter():
                return pair_logps(self.model, pairs)
        finally:
            self.model.train(was_training)

    @torch.no_grad()
    def policy_logps(self, pairs: PairBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """(chosen, rejected) log-probs of the current policy (eval mode, no gradients)."""
        was_training = self.model.training
        self.model.eval()
        try:
            return pair_logps(self.model, pairs)
        finally:
            self.model.train(was_training)

    # -- training ---------------------------------------------------------------------------------------------
    def _sum(self, values: list[float] | torch.Tensor) -> list[float]:
        tensor = torch.as_tensor(values, dtype=torch.float64, device=self.acc.device)
        return self.acc.reduce(tensor, "sum").tolist()

    def _sums(self, pairs: PairBatch, pc, pr, rc, rr) -> torch.Tensor:
        """This micro-batch's metric sums (METRICS order) over its valid pairs."""
        losses, reward_c, reward_r = dpo_losses(pc, pr, rc, rr, self.beta)
        v = pairs.valid.double()
        margin = reward_c - reward_r
        parts = (losses, (margin > 0).double(), margin, reward_c, reward_r, pc, pr, rc, rr)
        return torch.stack([(p.detach().double() * v).sum() for p in parts])

    def train(self) -> DPOResult:
        cfg = self.cfg
        last: dict[str, float] = {}
        val = None
        last_saved = last_eval = None
        clock, tokens_at_clock = time.perf_counter(), 0
        with _progress_bar(self.is_main and self.args.progress) as bar:
            task = bar.add_task("dpo", total=self.max_iters, loss="-", acc="-", margin="-", lr="-")
            for it in range(self.max_iters):
                record = self.window(it)
                done = it + 1
                if record["loss"] is not None:
                    last = {k: record[k] for k in METRICS}
                elif self.is_main:
                    bar.console.print(f"[yellow]window {done} has no valid pair: optimizer step skipped")
                elapsed = max(time.perf_counter() - clock, 1e-9)
                record.update(self.counters, tokens_per_s=(self.counters["tokens"] - tokens_at_clock) / elapsed)
                if done % cfg.log_interval == 0 or done == self.max_iters or record["loss"] is None:
                    self.log.write(record)
                bar.update(task, completed=done, lr=f"{record['lr']:.2e}",
                           **({"loss": f"{last['loss']:.4f}", "acc": f"{last['accuracy']:.2f}",
                               "margin": f"{last['reward_margin']:.3f}"} if last else {}))
                if self.val_ds and cfg.eval_interval and done % cfg.eval_interval == 0:
                    val, last_eval = self.evaluate(), done
                    if val:
                        self.log.write({"iter": done, **val})
                if cfg.save_interval and done % cfg.save_interval == 0 and done < self.max_iters:
                    self.save(done)
                    last_saved = done
        done = self.sampler.iteration
        if self.val_ds and last_eval != done:
            val = self.evaluate()
            if val:
                self.log.write({"iter": done, **val})
        final = checkpoint_path(self.out, done) if last_saved == done else self.save(done)
        if self.is_main:
            link_final(self.out, final)
        self.acc.wait_for_everyone()
        self.log.close()
        return DPOResult(
            out_dir=self.out, final_dir=self.out / "final", iterations=done,
            optimizer_steps=self.counters["optimizer_steps"], skipped_windows=self.counters["skipped_windows"],
            last=last, val=val, reference=self.reference, reference_dir=self.reference_dir,
            metrics_path=self.log.path,
        )

    def window(self, it: int) -> dict[str, Any]:
        """Train on window ``it``: all-reduce its pair count, accumulate Σ loss / N over micro-batches, step."""
        cfg = self.cfg
        indices = rank_micro_batches(self.sampler.next_window(), cfg.grad_accum, self.world, self.rank)
        batches = [self._pairs(self.train_ds, idx) for idx in indices]
        n_pairs, tokens, truncated = self._sum([
            sum(float(b.valid.sum()) for b in batches),
            sum(b.batch.tokens for b in batches),
            sum(b.batch.truncated for b in batches),
        ])
        lr = set_lr(self.optimizer, it, cfg, self.max_iters)
        record: dict[str, Any] = {"iter": it + 1, "lr": lr, "loss": None}
        if n_pairs > 0:
            self.model.train()
            sums = torch.zeros(len(METRICS), dtype=torch.float64, device=self.acc.device)
            for i, pairs in enumerate(batches):
                rc, rr = self.reference_logps(pairs)
                last = i == len(batches) - 1
                with nullcontext() if last else self.acc.no_sync(self.model):
                    pc, pr = pair_logps(self.model, pairs)
                    losses, _, _ = dpo_losses(pc, pr, rc, rr, self.beta)
                    self.acc.backward((losses * pairs.valid).sum() * (self.world / n_pairs))
                sums += self._sums(pairs, pc, pr, rc, rr)
            record.update(zip(METRICS, (s / n_pairs for s in self._sum(sums))))
            optimizer_step(self.acc, self.model, self.optimizer, cfg.grad_clip, record, self.counters)
        else:
            self.counters["skipped_windows"] += 1
            record["skipped"] = True
        self.counters["pairs"] += int(n_pairs)
        self.counters["tokens"] += int(tokens)
        self.counters["truncated"] += int(truncated)
        return record

    def evaluate(self) -> dict[str, float] | None:
        """Mean val metrics (``val_loss``, ``val_accuracy``, ...) over the fixed validation prefix, all processes."""
        sums = torch.zeros(len(METRICS), dtype=torch.float64, device=self.acc.device)
        n = 0.0
        for idx in self.val_batches:
            pairs = self._pairs(self.val_ds, idx)
            rc, rr = self.reference_logps(pairs, "val")
            pc, pr = self.policy_logps(pairs)
            sums += self._sums(pairs, pc, pr, rc, rr)
            n += float(pairs.valid.sum())
        *totals, n = self._sum([*sums.tolist(), n])
        return {f"val_{k}": s / n for k, s in zip(METRICS, totals)} if n > 0 else None

    def save(self, iteration: int) -> Path:
        """A checkpoint after ``iteration`` windows: the model (or adapter) in HF format, run info, data position."""
        path = checkpoint_path(self.out, iteration)
        state_dict = self.acc.get_state_dict(self.model) if self.fsdp else None
        state = {
            "iteration": iteration, "max_iters": self.max_iters, "world_size": self.world,
            "sampler": self.sampler.state_dict(), "counters": self.counters, "config": self.args.config.to_dict(),
        }
        with atomic_directory(path, self.is_main, self.acc.wait_for_everyone) as tmp:
            if self.is_main:
                save_model_files(tmp, self.acc.unwrap_model(self.model), state_dict, self.tokenizer, self.run_info)
            save_trainer_state(tmp, rank=self.rank, is_main=self.is_main, state=state,
                               permutation=self.sampler.permutation, optimizer_state=None)
        if self.is_main:
            prune_checkpoints(self.out, self.cfg.keep_checkpoints)
        return path


def _check_sft_checkpoint(model: str | Path) -> None:
    if is_preset(str(model)) or not Path(model).is_dir():
        what = "a preset" if is_preset(str(model)) else "not a directory"
        raise LossmaskError(f"DPO starts from an SFT checkpoint directory (a model or a LoRA adapter); {str(model)!r} "
                            f"is {what}")


def _progress_bar(enabled: bool) -> Progress:
    return Progress(
        TextColumn("[bold]dpo"), BarColumn(), MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]}  acc {task.fields[acc]}  margin {task.fields[margin]}  "
                   "lr {task.fields[lr]}"),
        TimeElapsedColumn(), TimeRemainingColumn(), disable=not enabled,
    )


__all__ = [
    "DPO_DEFAULTS",
    "DPOArgs",
    "DPOConfig",
    "DPOResult",
    "DPORun",
    "collate_pairs",
    "dpo_config_from_dict",
    "dpo_losses",
    "load_dpo_config",
    "pair_logps",
    "run_dpo",
    "sequence_logps",
]
