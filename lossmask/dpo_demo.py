"""SFT → DPO end to end on the ``tiny`` preset, on a CPU in about a minute: the preference-tuning recipe.

1. format-lock data (train and held-out prompts) and a tiny BPE tokenizer with the myPT tokens;
2. SFT: prepare (mypt format) and train the tiny Llama from scratch for a few steps;
3. negatives of the SFT answers (five kinds) → a balanced pair set, for training and from the held-out
   prompts for evaluation;
4. ``prepare --pairs`` (same renderer and masks as SFT), validated;
5. DPO from the SFT checkpoint (full fine-tuning, precomputed reference);
6. ``compare`` SFT and DPO on the held-out pairs.

Everything is written under ``OUT`` (``dpo_demo_report.json`` sums it up). The sizes are those of a smoke
run, not of a useful model: pass larger ones to see DPO move the preference accuracy.
"""
from __future__ import annotations

import json
from pathlib import Path

from rich.console import Console

SFT_CONFIG = {
    "batch_size": 8, "grad_accum": 1, "block_size": 256, "lr": 3e-3, "warmup_iters": 5, "decay": "cosine",
    "min_lr": 3e-4, "weight_decay": 0.1, "eval_interval": 0, "eval_iters": 4, "log_interval": 5, "seed": 1337,
    "hidden_size": 64, "num_layers": 2, "num_heads": 4, "intermediate_size": 192,
}
DPO_CONFIG = {
    "batch_size": 4, "grad_accum": 2, "block_size": 256, "lr": 1e-3, "warmup_iters": 2, "decay": "linear",
    "beta": 0.1, "eval_interval": 0, "eval_iters": 4, "log_interval": 1, "seed": 1337,
}


def run_dpo_demo(
    out: str | Path, *, seed: int = 0, sft_episodes: int = 300, held_out: int = 40, sft_iters: int = 30,
    dpo_iters: int = 10, pairs_per_kind: int = 40, console: Console | None = None,
) -> dict:
    """Run every step into ``out`` (created; must not hold anything else); returns the report."""
    from lossmask.compare import compare_models, print_comparison
    from lossmask.errors import LossmaskError
    from lossmask.generate.format_lock import generate_format_lock, record_texts, write_jsonl
    from lossmask.negatives import REFUSALS, build_negatives, build_pairs, print_pair_composition
    from lossmask.pairs import prepare_pairs
    from lossmask.prepare import PrepareOptions, prepare
    from lossmask.render import RenderOptions
    from lossmask.tiny_tokenizer import build_tiny_tokenizer
    from lossmask.train import DPOArgs, TrainArgs, config_from_dict, dpo_config_from_dict, run_dpo, run_training
    from lossmask.validate import format_report, validate_dataset

    console = console or Console()
    root = Path(out)
    if root.exists() and any(root.iterdir()):
        raise LossmaskError(f"{root} is not empty; choose a new output directory for the DPO demo")
    data = root / "data"
    mypt = RenderOptions(format="mypt")

    console.rule("[bold]1/6 data and tokenizer")
    train_records = generate_format_lock(sft_episodes, seed)
    held_records = generate_format_lock(held_out, seed, held_out=True)
    write_jsonl(train_records, data / "sft.jsonl")
    write_jsonl(held_records, data / "held_out.jsonl")
    texts = [*record_texts(train_records), *(t for ts in REFUSALS.values() for t in ts)]
    build_tiny_tokenizer(texts, root / "tokenizer")

    console.rule("[bold]2/6 SFT")
    prepare(PrepareOptions(inputs=[str(data / "sft.jsonl")], tokenizer=str(root / "tokenizer"),
                           out=str(root / "sft_data"), render=mypt, val_split=0.0, seed=seed), progress=False)
    sft = run_training(TrainArgs(
        model="tiny", data=str(root / "sft_data"), out=str(root / "sft"),
        config=config_from_dict({**SFT_CONFIG, "max_iters": sft_iters}, "demo SFT recipe"), progress=False,
    ))

    console.rule("[bold]3/6 negatives and pairs")
    for name in ("sft", "held_out"):
        build_negatives([str(data / f"{name}.jsonl")], str(data / f"{name}_negatives.jsonl"), seed=seed)
    composition = build_pairs([str(data / "sft.jsonl")], [str(data / "sft_negatives.jsonl")],
                              str(data / "pairs.jsonl"), seed=seed, per_kind=pairs_per_kind)
    print_pair_composition(composition, console)
    build_pairs([str(data / "held_out.jsonl")], [str(data / "held_out_negatives.jsonl")],
                str(data / "held_out_pairs.jsonl"), seed=seed)

    console.rule("[bold]4/6 prepare --pairs")
    summary = prepare_pairs(PrepareOptions(inputs=[str(data / "pairs.jsonl")], tokenizer=str(root / "tokenizer"),
                                           out=str(root / "pair_data"), render=mypt, val_split=0.1, seed=seed),
                            progress=False)
    validation = validate_dataset(root / "pair_data")
    console.print(format_report(validation))

    console.rule("[bold]5/6 DPO from the SFT checkpoint")
    dpo = run_dpo(DPOArgs(
        model=str(sft.final_dir), data=str(root / "pair_data"), out=str(root / "dpo"),
        config=dpo_config_from_dict({**DPO_CONFIG, "max_iters": dpo_iters}, "demo DPO recipe"), progress=False,
    ))

    console.rule("[bold]6/6 compare SFT and DPO on held-out pairs")
    comparison = compare_models([("sft", str(sft.final_dir)), ("dpo", str(dpo.final_dir))],
                                data / "held_out_pairs.jsonl", render=mypt, max_new_tokens=16,
                                json_out=root / "comparison.json")
    print_comparison(comparison, console)

    report = {
        "pairs": composition.pairs,
        "pairs_per_kind": composition.per_kind,
        "pair_dataset": {"examples": summary.examples, "valid": validation.ok},
        "sft_train_loss": sft.train_loss,
        "dpo_first": _first_window(dpo.metrics_path),
        "dpo_last": dpo.last,
        "dpo_val": dpo.val,
        "comparison": {m.name: {k: v for k, v in m.__dict__.items() if k != "samples"} for m in comparison.models},
        "paths": {"sft": str(sft.final_dir), "pair_data": str(root / "pair_data"), "dpo": str(dpo.final_dir),
                  "metrics": str(dpo.metrics_path), "comparison": str(root / "comparison.json")},
    }
    (root / "dpo_demo_report.json").write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
    return report


def _first_window(metrics_path: Path) -> dict | None:
    from lossmask.train.metrics import read_metrics

    return next((r for r in read_metrics(metrics_path) if r.get("loss") is not None), None)
