"""``lossmask demo``: the whole system on a fresh machine with no network and no GPU, in minutes.

1. generate format-lock data (English and German short questions, echo and anti-echo) and a held-out
   set of prompts never seen in training;
2. build a small byte-level BPE tokenizer on that text, with the 19 myPT special tokens;
3. prepare it in the myPT format with the weighted mask and packing; write the HTML mask view;
4. train the ``tiny`` Llama preset from scratch on the CPU;
5. gate: on the held-out prompts the model must end its answer with ``</myPT_assistant><myPT_eot>``
   within 20 generated tokens, with no runaway;
6. report: loss before and after, gate pass rate, where everything is (also ``demo_report.json``).

The recipe is written out below, explicit, like a training recipe should be.
"""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from lossmask.errors import LossmaskError

DEFAULT_OUT = "lossmask-demo"
TRAIN_EPISODES = 3000
HELD_OUT_PROMPTS = 100
BLOCK_SIZE = 256
GATE_THRESHOLD = 0.9

# The tiny Llama and its recipe: ~0.9M parameters, ~250 optimizer steps on 2 CPU cores.
DEMO_CONFIG = {
    "batch_size": 8,
    "grad_accum": 1,
    "block_size": BLOCK_SIZE,
    "lr": 3e-3,
    "warmup_iters": 20,
    "decay": "cosine",
    "min_lr": 3e-4,
    "epochs": 6,
    "weight_decay": 0.1,
    "grad_clip": 1.0,
    "eval_interval": 50,
    "eval_iters": 8,
    "log_interval": 10,
    "seed": 1337,
    "hidden_size": 128,
    "num_layers": 4,
    "num_heads": 4,
    "intermediate_size": 384,
}


def run_demo(out: str = DEFAULT_OUT, *, seed: int = 0, train_episodes: int = TRAIN_EPISODES,
             held_out: int = HELD_OUT_PROMPTS, config: dict | None = None, console: Console | None = None) -> dict:
    """Run every step; returns the report (also written to ``OUT/demo_report.json``)."""
    from lossmask.gate import format_lock_gate, passes, print_gate
    from lossmask.generate.format_lock import generate_format_lock, record_texts, write_jsonl
    from lossmask.inspect import inspect_dataset
    from lossmask.prepare import PrepareOptions, prepare
    from lossmask.render import RenderOptions
    from lossmask.report import print_prepare_summary
    from lossmask.tiny_tokenizer import build_tiny_tokenizer
    from lossmask.train import TrainArgs, config_from_dict, run_training
    from lossmask.train.generate import load_for_inference

    console = console or Console()
    root = _fresh(Path(out))
    started = time.perf_counter()
    timings: dict[str, float] = {}

    def step(name: str, title: str):
        timings[name] = time.perf_counter()
        console.rule(f"[bold]{title}")

    step("data", "1/5 generate format-lock data")
    train_records = generate_format_lock(train_episodes, seed)
    held_records = generate_format_lock(held_out, seed, held_out=True)
    data = root / "data"
    write_jsonl(train_records, data / "train.jsonl")
    write_jsonl(held_records, data / "held_out.jsonl")
    console.print(f"{len(train_records)} training episodes, {len(held_records)} held-out prompts → {data}")

    step("tokenizer", "2/5 build the tokenizer")
    tokenizer = build_tiny_tokenizer(record_texts(train_records), root / "tokenizer")
    console.print(f"byte-level BPE, {len(tokenizer)} tokens incl. the 19 myPT tags → {root / 'tokenizer'}")

    step("prepare", "3/5 prepare: render, mask, verify, pack")
    summary = prepare(PrepareOptions(
        inputs=[str(data / "train.jsonl")], tokenizer=str(root / "tokenizer"), out=str(root / "dataset"),
        render=RenderOptions(format="mypt", weighted_mask=True), val_split=0.05, seed=seed, pack=BLOCK_SIZE,
    ), progress=False)
    print_prepare_summary(summary, console)
    html = root / "mask_view.html"
    inspect_dataset(str(root / "dataset"), samples=3, html=str(html))

    step("train", "4/5 train the tiny Llama from scratch on the CPU")
    cfg = config_from_dict({**DEMO_CONFIG, **(config or {})}, "demo recipe")
    result = run_training(TrainArgs(model="tiny", data=str(root / "dataset"), out=str(root / "model"), config=cfg))

    step("gate", "5/5 format-lock gate on held-out prompts")
    model, tok = load_for_inference(result.final_dir)
    gate = format_lock_gate(model, tok, held_records, max_new_tokens=20)
    print_gate(gate, console)
    timings["end"] = time.perf_counter()

    report = {
        "gate_pass_rate": gate.pass_rate,
        "gate_passed": passes(gate, GATE_THRESHOLD),
        "gate_threshold": GATE_THRESHOLD,
        "gate_per_language": {k: v.pass_rate for k, v in gate.per_language.items()},
        "exact_match_rate": gate.exact_match_rate,
        "initial_val_loss": result.initial_val_loss,
        "final_val_loss": result.val_loss,
        "final_train_loss": result.train_loss,
        "optimizer_steps": result.optimizer_steps,
        "trained_tokens": result.trained_tokens,
        "packing_efficiency": summary.packing["splits"]["train"]["efficiency"] if summary.packing else None,
        "paths": {
            "data": str(data), "tokenizer": str(root / "tokenizer"), "dataset": str(root / "dataset"),
            "mask_view": str(html), "checkpoint": str(result.final_dir), "loss_plot": str(result.loss_plot),
            "metrics": str(result.metrics_path),
        },
        "seconds": _durations(timings, started),
    }
    (root / "demo_report.json").write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
    _print_report(console, report, root)
    return report


def _fresh(root: Path) -> Path:
    """The output directory, emptied if it holds a previous demo; anything else is never deleted."""
    if root.exists() and any(root.iterdir()):
        if not (root / "demo_report.json").exists() and not (root / "data" / "train.jsonl").exists():
            raise LossmaskError(f"{root} exists and is not a lossmask demo output; choose another --out")
        shutil.rmtree(root)
    root.mkdir(parents=True, exist_ok=True)
    return root


def _durations(timings: dict[str, float], started: float) -> dict[str, float]:
    names = list(timings)
    out = {n: round(timings[nxt] - timings[n], 1) for n, nxt in zip(names, names[1:])}
    out["total"] = round(timings["end"] - started, 1)
    return out


def _print_report(console: Console, report: dict, root: Path) -> None:
    table = Table(title="lossmask demo", show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    verdict = "[green]PASS" if report["gate_passed"] else "[red]FAIL"
    table.add_row("format-lock gate", f"{report['gate_pass_rate']:.1%} of held-out prompts "
                  f"(threshold {report['gate_threshold']:.0%}) {verdict}")
    per_lang = ", ".join(f"{k} {v:.1%}" for k, v in sorted(report["gate_per_language"].items()))
    table.add_row("  per language", per_lang)
    table.add_row("  exact answers", f"{report['exact_match_rate']:.1%}")
    if report["initial_val_loss"] is not None and report["final_val_loss"] is not None:
        table.add_row("val loss", f"{report['initial_val_loss']:.3f} → {report['final_val_loss']:.3f}")
    table.add_row("optimizer steps", str(report["optimizer_steps"]))
    for name, path in report["paths"].items():
        table.add_row(name.replace("_", " "), path)
    table.add_row("time", f"{report['seconds']['total']:.0f} s (train {report['seconds']['train']:.0f} s)")
    console.print(table)
    console.print(f"report: {root / 'demo_report.json'}")
