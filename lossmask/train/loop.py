"""The SFT training run through accelerate: the window loop, evaluation, checkpoints.

One process or many (``accelerate launch`` / ``torchrun``: DDP or FSDP) run the same code. Each
optimizer *window* takes ``batch_size × grad_accum × processes`` items; the window's loss is the weighted
token cross-entropy normalised by the window's total weight on all processes (see loss.py). A window
without any trained token is skipped (no optimizer step) and reported, never turned into NaN or 0.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import Any

import torch

from lossmask.errors import LossmaskError
from lossmask.train.args import TrainArgs, TrainResult
from lossmask.train.attention import POSITION_IDS, packed_attention_mode
from lossmask.train.checkpoint import (
    STATE_DIR,
    atomic_directory,
    checkpoint_path,
    latest_checkpoint,
    link_final,
    load_trainer_state,
    prune_checkpoints,
    save_model_files,
    save_trainer_state,
    set_rng_state,
)
from lossmask.train.config import TrainConfig
from lossmask.train.data import Batch, WindowSampler, collate, eval_micro_batches, is_packed, rank_micro_batches
from lossmask.train.loss import loss_sums, window_backward
from lossmask.train.metrics import MetricsLog, plot_loss, progress_bar
from lossmask.train.neftune import NEFTune
from lossmask.train.schedule import set_lr
from lossmask.train.setup import (
    load_optimizer_state,
    make_model,
    make_optimizer,
    open_data,
    pad_id,
    prepare_out_dir,
    seed_everything,
)

COUNTERS = ("tokens", "trained_tokens", "skipped_windows", "optimizer_steps", "truncated")


def run_training(args: TrainArgs) -> TrainResult:
    """Train as ``args`` says; returns where the model is and how the run went."""
    return _Run(args).train()


def make_accelerator(use_amp: bool | None, amp_dtype: str):
    """The run's accelerate ``Accelerator`` (SFT and DPO): mixed precision as configured, gloo on CPU, and
    an error when it sees another process count than was launched."""
    from accelerate import Accelerator

    launched = int(os.environ.get("WORLD_SIZE", "1"))
    amp = use_amp if use_amp is not None else torch.cuda.is_available()
    # accelerate only sets up gloo for several CPU processes when told the run is on CPU
    cpu = launched > 1 and not torch.cuda.is_available()
    accelerator = Accelerator(mixed_precision=amp_dtype if amp else "no", cpu=cpu)
    if accelerator.num_processes != launched:
        raise LossmaskError(
            f"launched as {launched} processes but accelerate set up {accelerator.num_processes}: "
            "check the launcher's settings"
        )
    return accelerator


def training_windows(n_items: int, cfg: TrainConfig, world: int) -> tuple[WindowSampler, int]:
    """(the window sampler over ``n_items``, the run's length in windows: ``max_iters``, else ``epochs`` worth).

    A window is ``batch_size × grad_accum × processes`` items, for SFT and DPO alike.
    """
    window = cfg.batch_size * cfg.grad_accum * world
    sampler = WindowSampler(n_items, window, cfg.batch_sampling_mode, cfg.seed)
    return sampler, cfg.max_iters or math.ceil((cfg.epochs or 1.0) * n_items / window)


def optimizer_step(acc: Any, model: Any, optimizer: Any, grad_clip: float, record: dict[str, Any],
                   counters: dict[str, int]) -> None:
    """End a trained window: clip the gradients (``grad_norm`` into ``record`` when ``grad_clip`` > 0), step,
    zero them and count the step. One place, so SFT and DPO windows cannot drift apart."""
    if grad_clip > 0:
        record["grad_norm"] = float(acc.clip_grad_norm_(model.parameters(), grad_clip))
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    counters["optimizer_steps"] += 1


class _Run:
    """One training invocation: owns the accelerator, model, optimizer, data position and counters."""

    def __init__(self, args: TrainArgs):
        from accelerate.utils import DistributedType

        self.args = args
        self.cfg = cfg = args.config
        self.out = Path(args.out)
        self.acc = make_accelerator(cfg.use_amp, cfg.amp_dtype)
        self.rank, self.world = self.acc.process_index, self.acc.num_processes
        self.is_main = self.acc.is_main_process
        self.fsdp = self.acc.distributed_type == DistributedType.FSDP
        if self.is_main:
            prepare_out_dir(self.out, resume=bool(args.resume), overwrite=args.overwrite)
        self.acc.wait_for_everyone()
        self.train_ds, self.val_ds, self.tokenizer, metadata = open_data(args)

        resume_dir = None
        if args.resume:
            resume_dir = latest_checkpoint(self.out) if args.resume is True else Path(args.resume)
            # Another process count is fine when the global window (batch_size × grad_accum × processes)
            # is the same: the data position is global; the sampler checks the window size.
            saved, permutation, saved_rng = load_trainer_state(resume_dir, self.rank)

        seed_everything(cfg.seed)  # identical model construction on every process
        model, self.run_info = make_model(args, cfg, self.tokenizer, resume_dir)
        self.run_info["dataset_metadata"] = metadata
        if not (args.quantize or self.fsdp):
            model.to(self.acc.device)
        vocab = model.get_input_embeddings().weight.shape[0]
        self.attention = packed_attention_mode(model, vocab) if is_packed(self.train_ds) else POSITION_IDS
        self.neftune = NEFTune(model, cfg.neftune_alpha) if cfg.neftune_alpha > 0 else None
        if cfg.gradient_checkpointing:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        self.model, self.optimizer = self.acc.prepare(model, make_optimizer(model, cfg))

        self.sampler, self.max_iters = training_windows(len(self.train_ds), cfg, self.world)
        self.counters = dict.fromkeys(COUNTERS, 0)
        if resume_dir is not None:
            self.sampler.load_state_dict(saved["sampler"], permutation)
            self.counters.update(saved["counters"])
            load_optimizer_state(self.acc, self.optimizer, self.model, resume_dir, self.fsdp)
            if saved_rng is not None:
                set_rng_state(saved_rng)
            else:  # a process the checkpoint did not have: a fresh stream of its own
                seed_everything(cfg.seed + self.rank + 7919 * self.sampler.iteration)
        else:
            seed_everything(cfg.seed + self.rank)  # dropout and NEFTune noise differ between processes
        resumed_at = self.sampler.iteration if resume_dir else None
        self.log = MetricsLog(self.out, resume_iteration=resumed_at, enabled=self.is_main)
        self.pad_id = pad_id(self.tokenizer)
        self.val_batches = (
            eval_micro_batches(len(self.val_ds), cfg.batch_size, cfg.eval_iters, self.world, self.rank)
            if self.val_ds
            else []
        )

    def _batch(self, dataset, indices) -> Batch:
        batch = collate([dataset[int(i)] for i in indices], self.cfg.block_size, self.cfg.use_loss_mask, self.pad_id)
        return batch.to(self.acc.device)

    def _sum(self, values: list[float]) -> list[float]:
        tensor = torch.tensor(values, dtype=torch.float64, device=self.acc.device)
        return self.acc.reduce(tensor, "sum").tolist()

    def train(self) -> TrainResult:
        cfg, start = self.cfg, self.sampler.iteration
        train_loss = val_loss = None
        last_saved = last_eval = None
        stopped = False
        warned = self.counters["truncated"] > 0
        clock, tokens_at_clock = time.perf_counter(), self.counters["tokens"]
        initial_val_loss = None
        if self.val_ds and start == 0:  # the untrained model's loss: the baseline every report compares with
            initial_val_loss = self.evaluate()
            self.log.write({"iter": 0, "val_loss": initial_val_loss})
        bar = progress_bar(self.is_main and self.args.progress)
        with bar:
            task = bar.add_task("train", total=self.max_iters, completed=start, loss="-", lr="-", tps="-", trained="-")
            for it in range(start, self.max_iters):
                if self.args.stop_after is not None and it - start >= self.args.stop_after:
                    stopped = True
                    break
                record = self.window(it)
                done = it + 1
                if record["loss"] is not None:
                    train_loss = record["loss"]
                elif self.is_main:
                    bar.console.print(f"[yellow]window {done} has no trained token: optimizer step skipped")
                if self.counters["truncated"] and not warned and self.is_main:
                    bar.console.print(f"[yellow]items longer than block_size {cfg.block_size} are cut (see metrics)")
                    warned = True
                tps = (self.counters["tokens"] - tokens_at_clock) / max(time.perf_counter() - clock, 1e-9)
                record.update(self.counters, tokens_per_s=tps)
                if done % cfg.log_interval == 0 or done == self.max_iters or record["loss"] is None:
                    self.log.write(record)
                shown = "-" if train_loss is None else f"{train_loss:.4f}"
                trained = f"{self.counters['trained_tokens']:,}"
                bar.update(
                    task, completed=done, loss=shown, lr=f"{record['lr']:.2e}", tps=f"{tps:,.0f}", trained=trained
                )
                if self.val_ds and cfg.eval_interval and done % cfg.eval_interval == 0:
                    val_loss, last_eval = self.evaluate(), done
                    self.log.write({"iter": done, "val_loss": val_loss})
                if cfg.save_interval and done % cfg.save_interval == 0 and done < self.max_iters:
                    self.save(done)
                    last_saved = done
        done = self.sampler.iteration
        if self.val_ds and not stopped and last_eval != done:
            val_loss = self.evaluate()
            self.log.write({"iter": done, "val_loss": val_loss})
        final = checkpoint_path(self.out, done) if last_saved == done else self.save(done)
        if not stopped and self.is_main:
            link_final(self.out, final)
        self.acc.wait_for_everyone()
        self.log.close()
        plot = plot_loss(self.log.path, self.out / "loss.png") if self.is_main else None
        if self.neftune is not None:
            self.neftune.remove()
        return TrainResult(
            out_dir=self.out,
            final_dir=final if stopped else self.out / "final",
            finished=not stopped,
            iterations=done,
            max_iters=self.max_iters,
            optimizer_steps=self.counters["optimizer_steps"],
            skipped_windows=self.counters["skipped_windows"],
            train_loss=train_loss,
            initial_val_loss=initial_val_loss,
            val_loss=val_loss,
            tokens=self.counters["tokens"],
            trained_tokens=self.counters["trained_tokens"],
            truncated=self.counters["truncated"],
            metrics_path=self.log.path,
            loss_plot=plot,
        )

    def window(self, it: int) -> dict[str, Any]:
        """Train on window ``it``: fetch it, all-reduce its weight, accumulate, step. Returns its metrics."""
        cfg = self.cfg
        indices = rank_micro_batches(self.sampler.next_window(), cfg.grad_accum, self.world, self.rank)
        batches = [self._batch(self.train_ds, idx) for idx in indices]
        weight, tokens, trained, truncated = self._sum(
            [
                sum(b.weight_sum for b in batches),
                sum(b.tokens for b in batches),
                sum(b.trained_tokens for b in batches),
                sum(b.truncated for b in batches),
            ]
        )
        lr = set_lr(self.optimizer, it, cfg, self.max_iters)
        record: dict[str, Any] = {"iter": it + 1, "lr": lr, "loss": None}
        if weight > 0:
            self.model.train()
            share = window_backward(
                self.model,
                batches,
                weight,
                grad_scale=float(self.world),  # DDP and FSDP average gradients over processes
                attention=self.attention,
                neftune=self.neftune,
                backward=self.acc.backward,
                no_sync=self.acc.no_sync,
            )
            record["loss"] = self._sum([share])[0]
            optimizer_step(self.acc, self.model, self.optimizer, cfg.grad_clip, record, self.counters)
        else:
            self.counters["skipped_windows"] += 1
            record["skipped"] = True
        self.counters["tokens"] += int(tokens)
        self.counters["trained_tokens"] += int(trained)
        self.counters["truncated"] += int(truncated)
        return record

    def evaluate(self) -> float | None:
        """Weighted loss over the fixed validation prefix, on all processes; None when it has no trained token."""
        self.model.eval()
        total = weight = 0.0
        for idx in self.val_batches:
            s, w = loss_sums(self.model, [self._batch(self.val_ds, idx)], self.attention)
            total, weight = total + s, weight + w
        self.model.train()
        total, weight = self._sum([total, weight])
        return total / weight if weight > 0 else None

    def save(self, iteration: int) -> Path:
        """A checkpoint after ``iteration`` windows (every process takes part); returns its directory."""
        path = checkpoint_path(self.out, iteration)
        state_dict = self.acc.get_state_dict(self.model) if self.fsdp else None
        state = {
            "iteration": iteration,
            "max_iters": self.max_iters,
            "world_size": self.world,
            "sampler": self.sampler.state_dict(),
            "counters": self.counters,
            "config": self.cfg.to_dict(),
        }
        with atomic_directory(path, self.is_main, self.acc.wait_for_everyone) as tmp:
            if self.is_main:
                save_model_files(tmp, self.acc.unwrap_model(self.model), state_dict, self.tokenizer, self.run_info)
            save_trainer_state(
                tmp,
                rank=self.rank,
                is_main=self.is_main,
                state=state,
                permutation=self.sampler.permutation,
                optimizer_state=None if self.fsdp else self.optimizer.state_dict(),
            )
            if self.fsdp:
                from accelerate.utils import save_fsdp_optimizer

                plugin = self.acc.state.fsdp_plugin
                save_fsdp_optimizer(plugin, self.acc, self.optimizer, self.model, str(tmp / STATE_DIR))
        if self.is_main:
            prune_checkpoints(self.out, self.cfg.keep_checkpoints)
        return path
