"""Training throughput: tokens/s and trained tokens/s, packed vs padded, through ``lossmask.train.run_training``.

CPU (default): the ``tiny`` preset (Llama, 128 hidden, 4 layers) with the project's from-scratch recipe:
a tiny byte-level BPE (``lossmask.tiny_tokenizer``, 2048 tokens) trained on the generated conversations,
which are prepared in the myPT format. (A real tokenizer's 128k-262k vocabulary would make the tiny
model's output layer nearly all of the work.) Two datasets from the same conversations: unpacked (each
micro-batch padded to its longest episode) and packed into blocks of ``--block-size``; each is trained
for ``--steps`` optimizer steps with the same settings apart from the batch size.

Throughput comes from the run's ``metrics.jsonl`` (one record per window with the cumulative tokens and
the loop's tokens/s), over the windows after ``--warmup``: model building, the packed-attention probe
and the final checkpoint are outside it. tokens = real (non-padding) tokens; trained = weight > 0.

``--gpu``: a Qwen3-0.6B-sized model (Qwen3Config, random weights, no download) with the Qwen3 tokenizer
and its chat template, bf16 autocast, peak GPU memory. Runs only where CUDA is available.
"""
from __future__ import annotations

import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

if __package__ in (None, ""):  # run as `python benchmarks/train_throughput.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import common

NAME = "train_throughput"
# Qwen3-0.6B's architecture (its config.json), built from the config with random weights.
QWEN3_0_6B = {
    "vocab_size": 151936, "hidden_size": 1024, "intermediate_size": 3072, "num_hidden_layers": 28,
    "num_attention_heads": 16, "num_key_value_heads": 8, "head_dim": 128, "tie_word_embeddings": True,
    "max_position_embeddings": 40960, "rms_norm_eps": 1e-6,
}
NO_GPU = "not measured: no GPU was available"


def build_parser():
    p = common.parser(NAME, __doc__.splitlines()[0])
    p.add_argument("--conversations", type=int, default=1000, help="generated conversations to train on")
    p.add_argument("--steps", type=int, default=20, help="optimizer steps per run")
    p.add_argument("--warmup", type=int, default=2, help="first steps left out of the throughput")
    p.add_argument("--block-size", type=int, default=512, help="block size (and max length of unpacked episodes)")
    p.add_argument("--padded-batch", type=int, default=4, help="unpacked episodes per micro-batch")
    p.add_argument("--packed-batch", type=int, default=4, help="packed blocks per micro-batch")
    p.add_argument("--gpu", action="store_true", help="the Qwen3-0.6B-sized run on CUDA (bf16) instead of tiny on CPU")
    return p


def prepare_pair(convs: list[dict], tokenizer: str, fmt: str | None, block: int, work: Path) -> dict[str, Path]:
    """The same conversations prepared twice: unpacked (cut after the last whole turn that fits ``block``
    tokens) and packed into blocks. A conversation whose first turn alone does not fit is left out."""
    from lossmask.mask import MaskOptions
    from lossmask.prepare import PrepareOptions, prepare
    from lossmask.render import RenderOptions

    data = common.write_jsonl(convs, work / "conversations.jsonl")
    out = {"padded": work / "unpacked", "packed": work / "packed"}
    for kind, path in out.items():
        prepare(PrepareOptions(
            [str(data)], tokenizer, str(path), render=RenderOptions(format=fmt), mask=MaskOptions(max_length=block),
            val_split=0, on_error="skip", pack=block if kind == "packed" else None,
        ), progress=False)
    return out


def padding_fraction(data: Path, batch: int, block: int, steps: int, seed: int) -> float:
    """The share of model positions that are padding over the run's windows (replays its sampler)."""
    from lossmask.store import open_dataset
    from lossmask.train.data import WindowSampler

    ds = open_dataset(data)
    if ds.packed:
        width = np.full(len(ds), ds.block_size)
        real = np.array([int(np.count_nonzero(ds[i]["segment_ids"])) for i in range(len(ds))])
    else:
        width = real = np.minimum(ds.episode_lengths, block)
    sampler = WindowSampler(len(ds), batch, "epoch", seed)
    positions = tokens = 0
    for _ in range(steps):
        window = sampler.next_window()
        positions += int(width[window].max()) * len(window)
        tokens += int(real[window].sum())
    return 1 - tokens / positions


def train_run(model: str, data: Path, out: Path, config, warmup: int) -> dict[str, Any]:
    """One run_training; throughput over the windows after ``warmup`` (from metrics.jsonl)."""
    from lossmask.train import TrainArgs, run_training
    from lossmask.train.metrics import read_metrics

    result = run_training(TrainArgs(model=model, data=str(data), out=str(out), config=config, progress=False,
                                    overwrite=True))
    records = [r for r in read_metrics(result.metrics_path) if "tokens_per_s" in r]
    end = records[-1]
    start = records[warmup - 1] if 0 < warmup < len(records) else {"tokens": 0, "trained_tokens": 0, "tokens_per_s": 1}
    elapsed = end["tokens"] / end["tokens_per_s"] - start["tokens"] / start["tokens_per_s"]
    tokens = end["tokens"] - start["tokens"]
    trained = end["trained_tokens"] - start["trained_tokens"]
    return {"seconds": elapsed, "tokens": tokens, "trained_tokens": trained, "steps": result.optimizer_steps,
            "final_loss": result.train_loss}


def measure(model: str, datasets: dict[str, Path], configs: dict[str, Any], work: Path, args,
            peak_memory=None) -> dict[str, dict[str, Any]]:
    """Best of ``repeats`` runs per dataset kind (run round-robin, so load from other processes hits both alike):
    tokens/s, trained tokens/s, padding share (and peak memory)."""
    runs: dict[str, list[dict[str, Any]]] = {kind: [] for kind in datasets}
    for repeat in range(args.repeats):
        for kind, data in datasets.items():
            if peak_memory is not None:
                peak_memory(reset=True)
            run = train_run(model, data, work / f"run-{kind}-{repeat}", configs[kind], args.warmup)
            if peak_memory is not None:
                run["peak_memory_gib"] = peak_memory()
            runs[kind].append(run)
    rows = {}
    for kind, data in datasets.items():
        cfg = configs[kind]
        best = min(runs[kind], key=lambda r: r["seconds"])
        rows[kind] = {
            **best,
            "runs_s": [round(r["seconds"], 6) for r in runs[kind]],
            "batch_size": cfg.batch_size,
            "tokens_per_s": best["tokens"] / best["seconds"],
            "trained_tokens_per_s": best["trained_tokens"] / best["seconds"],
            "padding": padding_fraction(data, cfg.batch_size, cfg.block_size, cfg.max_iters, cfg.seed),
        }
    return rows


def configs_for(args, **common_settings) -> dict[str, Any]:
    from lossmask.train import TrainConfig

    shared = {"block_size": args.block_size, "max_iters": args.steps, "log_interval": 1, "eval_interval": 0,
              "lr": 1e-3, "warmup_iters": 0, "decay": "constant", **common_settings}
    return {"padded": TrainConfig(batch_size=args.padded_batch, **shared),
            "packed": TrainConfig(batch_size=args.packed_batch, **shared)}


def bench_cpu(args, work: Path) -> dict[str, Any]:
    from lossmask.tiny_tokenizer import build_tiny_tokenizer

    convs = common.conversations(args.conversations, args.seed)
    texts = [m["content"] for c in convs for m in c["messages"]] + [c["system"] for c in convs]
    build_tiny_tokenizer(texts, work / "tokenizer")
    datasets = prepare_pair(convs, str(work / "tokenizer"), "mypt", args.block_size, work)
    return {"device": "cpu", "model": "tiny preset", "rows": measure("tiny", datasets, configs_for(args), work, args)}


def qwen3_sized_model(path: Path, sizes: dict[str, Any]) -> Path:
    """Save a randomly initialised Qwen3 of the given sizes (the architecture only; nothing is downloaded)."""
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        Qwen3ForCausalLM(Qwen3Config(**sizes)).save_pretrained(path)
    return path


def bench_gpu(args, work: Path, sizes: dict[str, Any] = QWEN3_0_6B) -> dict[str, Any]:
    import torch

    if not torch.cuda.is_available():
        return {"device": "cuda", "status": NO_GPU}

    def peak_memory(reset: bool = False) -> float | None:
        if reset:
            torch.cuda.reset_peak_memory_stats()
            return None
        return torch.cuda.max_memory_allocated() / 2**30

    convs = common.conversations(args.conversations, args.seed)
    datasets = prepare_pair(convs, common.tokenizer_path("qwen3"), None, args.block_size, work)
    model = qwen3_sized_model(work / "qwen3-0.6b-sized", sizes)
    configs = configs_for(args, use_amp=True, amp_dtype="bf16", attn_implementation="sdpa")
    return {"device": torch.cuda.get_device_name(0), "model": "Qwen3-0.6B-sized (random weights)",
            "rows": measure(str(model), datasets, configs, work, args, peak_memory)}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="lossmask-bench-train-") as tmp:
        result = bench_gpu(args, Path(tmp)) if args.gpu else bench_cpu(args, Path(tmp))
    report(result, args)
    return common.write_results(args.out, NAME, vars(args), result)


def report(result: dict[str, Any], args) -> None:
    if "rows" not in result:
        print(f"{result.get('model', 'GPU run')}: {result['status']}")
        return
    rows = [(kind, r["batch_size"], r["steps"], 100 * r["padding"], r["tokens_per_s"], r["trained_tokens_per_s"],
             r.get("peak_memory_gib"), r["final_loss"]) for kind, r in result["rows"].items()]
    common.table(
        f"Training throughput, {result['model']} on {result['device']}, block {args.block_size}, "
        f"{args.steps} steps, best of {args.repeats}",
        ("data", "batch", "steps", "padding %", "tokens/s", "trained tokens/s", "peak GiB", "last loss"), rows,
        caption=f"throughput over the steps after the first {args.warmup}; tokens = non-padding tokens",
    )


if __name__ == "__main__":
    main()
