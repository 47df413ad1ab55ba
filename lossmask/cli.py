"""The ``lossmask`` command: a thin layer of argument parsing over the public API."""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from lossmask import __version__
from lossmask.errors import LossmaskError

EPILOG = "Run `lossmask COMMAND --help` for the options of a command."


def _prepare_parser(sub) -> None:
    from lossmask.mask import STRADDLE_POLICIES, TRUNCATION_POLICIES
    from lossmask.prepare import ON_ERROR
    from lossmask.render import FORMATS
    from lossmask.render.chat_template import HISTORY_POLICIES
    from lossmask.special import SPECIAL_POLICIES
    from lossmask.sources import INPUT_FORMATS

    p = sub.add_parser(
        "prepare",
        help="render, mask, verify and store episodes as a binary dataset",
        description="Turn JSONL episodes into a binary SFT dataset with exact, verified loss masks. "
        "Every example is checked: its trained tokens must decode back to exactly the text the renderer "
        "meant to train. Bad lines are reported with file, line and field.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="JSONL files (one episode per line)")
    p.add_argument("--tokenizer", required=True, help="local tokenizer directory or hub id (e.g. Qwen/Qwen3-0.6B)")
    p.add_argument("--out", required=True, help="output dataset directory (written atomically)")
    p.add_argument("--format", choices=FORMATS, default=None,
                   help="renderer; default: chat-template when the tokenizer has one")
    p.add_argument("--input-format", choices=INPUT_FORMATS, default="auto", help="input schema, detected per line")
    p.add_argument("--chat-template", metavar="FILE", help="a Jinja chat template file to use instead of the tokenizer's")
    p.add_argument("--template-kwargs", metavar="JSON", default="{}",
                   help='extra template variables, e.g. \'{"enable_thinking": false}\'')
    p.add_argument("--history", choices=HISTORY_POLICIES, default="auto",
                   help="how to train earlier assistant turns when the template renders them differently from "
                   "the final turn: auto splits such conversations into one example per turn")
    p.add_argument("--stop-token", action="append", default=[], metavar="STRING",
                   help="text that ends an assistant turn (default: the tokenizer's EOS); repeatable")
    p.add_argument("--response-marker", help="for text records: the string after which the response starts")
    p.add_argument("--end-marker", help="for text records: the string that ends the response (trained as stop)")
    p.add_argument("--weighted-mask", action="store_true", help="mypt: apply the default weight profile")
    p.add_argument("--weight-profile", metavar="JSON_FILE", help="mypt: weight profile overriding the default")
    p.add_argument("--max-length", type=int, help="maximum tokens per example")
    p.add_argument("--truncation", choices=TRUNCATION_POLICIES, default="turn",
                   help="what to do with examples longer than --max-length")
    p.add_argument("--straddle", choices=STRADDLE_POLICIES, default="include",
                   help="whether a token straddling a trained span edge is trained")
    p.add_argument("--special-in-content", choices=SPECIAL_POLICIES, default="reject",
                   help="special-token strings inside message content")
    p.add_argument("--val-split", type=float, default=0.05, help="fraction of episodes for the val split")
    p.add_argument("--seed", type=int, default=0, help="seed of the val split")
    p.add_argument("--workers", type=int, default=1, help="worker processes")
    p.add_argument("--on-error", choices=ON_ERROR, default="fail",
                   help="fail: stop at the first bad line, write nothing; skip: write the rest and rejects.jsonl")
    p.add_argument("--pack", type=int, metavar="BLOCK",
                   help="pack episodes into blocks of BLOCK tokens (best-fit decreasing, isolated by segment); "
                   "--max-length defaults to BLOCK")
    p.add_argument("--pack-by-field", metavar="FIELD",
                   help="with --pack: only episodes with the same value of FIELD (e.g. _meta.operator) share a block")
    p.add_argument("--num-shards", type=int, metavar="N", help="split the input into N disjoint shards (by episode)")
    p.add_argument("--shard-index", type=int, metavar="I",
                   help="prepare only shard I of N, into OUT/shard-IIIII-of-NNNNN (one job of a job array)")
    p.add_argument("--backend", choices=("local", "ray"), default="local",
                   help="ray: prepare all --num-shards shards as Ray tasks (a local Ray, or --ray-address)")
    p.add_argument("--ray-address", help="the Ray cluster to run on (default: start a local one)")
    p.add_argument("--pairs", action="store_true",
                   help="inputs are preference pairs (prompt, chosen, rejected): store both sides, sharing the "
                   "exact same prompt tokens, for `lossmask dpo`")
    p.add_argument("--force", action="store_true", help="replace an existing dataset")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--trust-remote-code", action="store_true", help="allow tokenizer code from the model repo")
    p.set_defaults(func=cmd_prepare)


def cmd_prepare(args) -> int:
    from lossmask.mask import MaskOptions
    from lossmask.prepare import PrepareOptions, prepare
    from lossmask.render import RenderOptions

    try:
        template_kwargs = json.loads(args.template_kwargs)
    except json.JSONDecodeError as exc:
        raise LossmaskError(f"--template-kwargs is not valid JSON: {exc}") from exc
    profile = None
    if args.weight_profile:
        from lossmask.render.mypt import load_weight_profile

        profile = load_weight_profile(args.weight_profile)
    render = RenderOptions(
        format=args.format,
        history=args.history,
        stop_tokens=tuple(args.stop_token),
        template_kwargs=template_kwargs,
        chat_template=Path(args.chat_template).read_text() if args.chat_template else None,
        response_marker=args.response_marker,
        end_marker=args.end_marker,
        weighted_mask=args.weighted_mask or profile is not None,
        weight_profile=profile,
    )
    options = PrepareOptions(
        inputs=args.inputs, tokenizer=args.tokenizer, out=args.out, render=render,
        mask=MaskOptions(args.max_length, args.truncation, args.straddle),
        input_format=args.input_format, special_in_content=args.special_in_content,
        val_split=args.val_split, seed=args.seed, workers=args.workers, on_error=args.on_error,
        force=args.force, trust_remote_code=args.trust_remote_code, pack=args.pack,
        pack_by_field=args.pack_by_field, num_shards=args.num_shards, shard_index=args.shard_index,
    )
    if args.pack_by_field and not args.pack:
        raise LossmaskError("--pack-by-field needs --pack BLOCK")
    if args.backend == "ray":
        if args.pairs:
            raise LossmaskError("--backend ray prepares SFT shards; prepare --pairs in one run (--workers N)")
        from lossmask.ray_backend import prepare_on_ray

        summaries = prepare_on_ray(options, args.ray_address)
        kept = sum(s["episodes_kept"] for s in summaries)
        print(f"{len(summaries)} shards in {args.out}: {kept:,} episodes kept, "
              f"{sum(sum(s['rejected'].values()) for s in summaries):,} rejected, "
              f"{sum(s['tokens'] for s in summaries):,} tokens; `lossmask merge {args.out} --out DIR` joins them")
        return 0
    if args.pairs:
        from lossmask.pairs import prepare_pairs

        summary = prepare_pairs(options, progress=not args.quiet)
    else:
        summary = prepare(options, progress=not args.quiet)
    from lossmask.report import print_prepare_summary

    print_prepare_summary(summary)
    return 0


def _inspect_parser(sub) -> None:
    p = sub.add_parser(
        "inspect",
        help="show tokens coloured by loss weight (terminal or HTML)",
        description="Show examples of a prepared dataset token by token, coloured by loss weight: trained, "
        "masked, weighted, padding. --html writes a standalone page with per-token hover.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("dataset", help="prepared dataset directory")
    p.add_argument("--split", default="train")
    p.add_argument("--show-samples", type=int, default=3, metavar="N", help="how many examples to show")
    p.add_argument("--line", type=int, metavar="N", help="show the example(s) from this input line")
    p.add_argument("--html", metavar="OUT.html", help="write a standalone HTML page instead of printing")
    p.set_defaults(func=cmd_inspect)


def cmd_inspect(args) -> int:
    from lossmask.inspect import inspect_dataset

    return inspect_dataset(args.dataset, args.split, args.show_samples, args.line, args.html)


def _validate_parser(sub) -> None:
    p = sub.add_parser(
        "validate",
        help="check a dataset's integrity and mask direction",
        description="Checksums, index bounds, mask direction (no trained token in system, user or tool-result "
        "text; every assistant turn ends with a trained stop token) and tokenizer identity. Exits 1 with a "
        "report when anything is wrong.",
    )
    p.add_argument("dataset", help="prepared dataset directory")
    p.set_defaults(func=cmd_validate)


def cmd_validate(args) -> int:
    from lossmask.validate import format_report, validate_dataset

    report = validate_dataset(args.dataset)
    print(format_report(report))
    return 0 if report.ok else 1


def _add_tokens_parser(sub) -> None:
    p = sub.add_parser(
        "add-tokens",
        help="add the 19 myPT special tokens to a tokenizer",
        description="Add the myPT tag tokens to any tokenizer and pad the vocabulary to a multiple of 64 "
        "(GPT-2: 50257 + 19 -> 50304). Writes a new tokenizer directory.",
    )
    p.add_argument("tokenizer", help="local tokenizer directory or hub id")
    p.add_argument("--out", required=True, help="directory for the extended tokenizer")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out directory")
    p.set_defaults(func=cmd_add_tokens)


def cmd_add_tokens(args) -> int:
    from lossmask.mypt_tokens import add_tokens_cli

    result = add_tokens_cli(args.tokenizer, args.out, overwrite=args.overwrite)
    print(f"vocabulary {result.before} → {result.after} tokens (19 myPT tags, padded to a multiple of 64); "
          f"wrote {result.out_dir}\nresize the model's embeddings to {result.after} before training")
    return 0


def _pack_parser(sub) -> None:
    p = sub.add_parser(
        "pack",
        help="pack a prepared dataset into fixed-size blocks",
        description="Best-fit-decreasing packing over each whole split: episodes are never split across blocks, "
        "blocks are padded only at the end, and each block carries segment ids and position ids that restart "
        "per episode, so packed episodes neither attend to nor predict each other.",
    )
    p.add_argument("dataset", help="prepared (unpacked) dataset directory")
    p.add_argument("--block", type=int, required=True, help="block size in tokens")
    p.add_argument("--out", required=True, help="output dataset directory")
    p.add_argument("--force", action="store_true", help="replace an existing output")
    p.set_defaults(func=cmd_pack)


def cmd_pack(args) -> int:
    from lossmask.pack import pack_dataset

    print(pack_dataset(args.dataset, args.out, args.block, force=args.force).summary())
    return 0


def _train_parser(sub) -> None:
    p = sub.add_parser(
        "train",
        help="SFT on a prepared dataset (any AutoModelForCausalLM, or a preset built from scratch)",
        description="Train with the weighted, masked loss normalised over the whole accumulation window and "
        "across processes. Runs under `accelerate launch` / `torchrun` unchanged (DDP, FSDP). Writes Hugging Face "
        "checkpoints (safetensors), metrics.jsonl and loss.png to OUT.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--data", required=True, help="prepared dataset directory (packed or not)")
    p.add_argument("--model", required=True,
                   help="hub id, local HF model directory, or a preset: tiny (CPU), mypt-750m")
    p.add_argument("--config", help="JSON or YAML config (see configs/train/tiny.yaml); unknown keys are errors")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    p.add_argument("--out", required=True, help="run directory")
    p.add_argument("--init-from", metavar="CKPT", help="start from these weights (fresh optimizer and schedule)")
    p.add_argument("--resume", nargs="?", const=True, default=False, metavar="CKPT",
                   help="continue exactly from the newest checkpoint in OUT (or from CKPT)")
    p.add_argument("--lora", metavar="SPEC", help="LoRA through peft, e.g. r=16,alpha=32,targets=q_proj,v_proj")
    p.add_argument("--quantize", choices=("4bit", "8bit"), help="quantized base for LoRA (CUDA + bitsandbytes)")
    p.add_argument("--overwrite", action="store_true", help="replace a previous run in OUT")
    p.add_argument("--stop-after", type=int, metavar="N", help="stop after N optimizer windows (checkpointed)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_train)


def cmd_train(args) -> int:
    from lossmask.train import TrainArgs, load_config, parse_overrides, run_training

    config = load_config(args.config, parse_overrides(args.set))
    result = run_training(TrainArgs(
        model=args.model, data=args.data, out=args.out, config=config, init_from=args.init_from,
        resume=args.resume, overwrite=args.overwrite, lora=args.lora, quantize=args.quantize,
        stop_after=args.stop_after, progress=not args.quiet,
    ))
    if os.environ.get("RANK", "0") != "0":  # under torchrun / accelerate launch: one report, from rank 0
        return 0
    losses = f"val loss {result.initial_val_loss:.4f} → {result.val_loss:.4f}" \
        if result.initial_val_loss is not None and result.val_loss is not None else \
        f"train loss {result.train_loss}"
    print(f"{'finished' if result.finished else 'stopped'} after {result.iterations}/{result.max_iters} windows "
          f"({result.optimizer_steps} optimizer steps, {result.skipped_windows} skipped), {losses}, "
          f"{result.trained_tokens:,} trained tokens\ncheckpoint: {result.final_dir}\nmetrics: {result.metrics_path}"
          + (f"\nloss plot: {result.loss_plot}" if result.loss_plot else ""))
    return 0


def _generate_parser(sub) -> None:
    p = sub.add_parser(
        "generate",
        help="generate from a checkpoint, stopping on the renderer's stop strings",
        description="A quick look at a checkpoint: a raw text prompt (tokenized as written) or a conversation "
        "(--messages, rendered with the chat template); stops on EOS and the training data's stop strings.",
    )
    p.add_argument("--model", required=True, help="checkpoint directory")
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("--prompt", help="raw text prompt")
    group.add_argument("--messages", metavar="FILE.json", help="a JSON list of {role, content} messages")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--stop", action="append", metavar="STRING", help="stop string (default: the dataset's)")
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    p.set_defaults(func=cmd_generate)


def cmd_generate(args) -> int:
    from lossmask.train import generate

    prompt = json.loads(Path(args.messages).read_text()) if args.messages else args.prompt
    print(generate(args.model, prompt, args.max_new_tokens, args.stop, args.temperature))
    return 0


def _merge_parser(sub) -> None:
    p = sub.add_parser("merge", help="fold a LoRA adapter into its base, or join dataset shards into one",
                       description="Given a LoRA adapter checkpoint: write a plain Hugging Face model directory "
                       "with the adapter merged in. Given a directory of dataset shards (prepare --num-shards): "
                       "write one dataset with every episode in input order, as an unsharded run would.")
    p.add_argument("source", help="adapter checkpoint directory, or a directory of dataset shards")
    p.add_argument("--out", required=True, help="output model or dataset directory")
    p.add_argument("--force", action="store_true", help="shards: replace an existing dataset")
    p.set_defaults(func=cmd_merge)


def cmd_merge(args) -> int:
    from lossmask.shards import is_shard_root, merge_shards

    if is_shard_root(args.source):
        print(f"merged dataset: {merge_shards(args.source, args.out, force=args.force)}")
        return 0
    from lossmask.train import merge_adapter

    print(f"merged model: {merge_adapter(args.source, args.out)}")
    return 0


def _demo_parser(sub) -> None:
    from lossmask.demo import DEFAULT_OUT

    p = sub.add_parser(
        "demo",
        help="the whole system in minutes on a CPU: data, tokenizer, masks, packing, training, gate",
        description="Generate format-lock data (EN/DE), build a tiny BPE tokenizer with the myPT tokens, prepare "
        "with weighted masks and packing, train the tiny Llama preset from scratch on the CPU, and gate it on "
        "held-out prompts. Writes OUT/demo_report.json.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--out", default=DEFAULT_OUT, help="output directory (a previous demo there is replaced)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_demo)


def cmd_demo(args) -> int:
    from lossmask.demo import run_demo

    report = run_demo(args.out, seed=args.seed)
    return 0 if report["gate_passed"] else 3


def _mix_parser(sub) -> None:
    from lossmask.mix import DEFAULT_SHUFFLE_MEMORY, ON_ERROR

    p = sub.add_parser(
        "mix",
        help="blend JSONL sources at set proportions (streaming, seeded)",
        description="Blend sources at set proportions. The number after ':' is a relative weight: weights are "
        "normalised to shares of the output, so a.jsonl:19.0 b.jsonl:1.0 is a 95%/5% blend and "
        "a.jsonl:0.85 replay.jsonl:0.15 gives replay a 15% slice. By default the scarcest source is used in "
        "full and no line repeats. Lines are copied unchanged.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--inputs", nargs="+", required=True, metavar="FILE:WEIGHT", help="sources and weights")
    p.add_argument("--output", required=True, help="output JSONL (written atomically)")
    p.add_argument("--total", type=int, help="output lines (default: as many as the scarcest source allows)")
    p.add_argument("--shuffle", action="store_true", help="uniformly random output order (bounded memory)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--allow-repeat", action="store_true", help="repeat lines of a source its share outgrows")
    p.add_argument("--tag-source", action="store_true", help="add _meta.mix_source to every line")
    p.add_argument("--on-error", choices=ON_ERROR, default="fail", help="lines that are not JSON objects")
    p.add_argument("--shuffle-memory", type=int, default=DEFAULT_SHUFFLE_MEMORY, metavar="BYTES")
    p.set_defaults(func=cmd_mix)


def cmd_mix(args) -> int:
    from lossmask.mix import mix, print_mix_report

    print_mix_report(mix(args.inputs, args.output, total=args.total, shuffle=args.shuffle, seed=args.seed,
                         allow_repeat=args.allow_repeat, tag_source=args.tag_source, on_error=args.on_error,
                         shuffle_memory=args.shuffle_memory))
    return 0


def _replay_parser(sub) -> None:
    from lossmask.replay import DOCUMENTS

    p = sub.add_parser(
        "replay",
        help="build a pre-training replay buffer ({\"_replay\": true, \"text\": ...} episodes)",
        description="Cut plain text files, JSONL 'text' fields or a prepared dataset's episodes into replay "
        "episodes of at most --max-tokens tokens (cut at a paragraph, sentence or space near the limit). Replay "
        "episodes are trained on every token. Mix them in with `lossmask mix`.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("inputs", nargs="+", metavar="INPUT", help=".txt files, .jsonl with 'text', or dataset dirs")
    p.add_argument("--output", required=True)
    p.add_argument("--tokenizer", help="tokenizer to count tokens with (default: a dataset input's own)")
    p.add_argument("--max-tokens", type=int, required=True)
    p.add_argument("--split", default="train", help="split to read from dataset inputs")
    p.add_argument("--documents", choices=DOCUMENTS, default="file", help="how .txt files hold documents")
    p.add_argument("--max-episodes", type=int, help="sample this many episodes (seeded)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--trust-remote-code", action="store_true")
    p.set_defaults(func=cmd_replay)


def cmd_replay(args) -> int:
    from lossmask.replay import build_replay, print_replay_report

    print_replay_report(build_replay(args.inputs, args.output, args.tokenizer, max_tokens=args.max_tokens,
                                     split=args.split, documents=args.documents, max_episodes=args.max_episodes,
                                     seed=args.seed, trust_remote_code=args.trust_remote_code))
    return 0


def _dedup_parser(sub) -> None:
    from lossmask.dedup import BY
    from lossmask.mix import ON_ERROR
    from lossmask.sources import INPUT_FORMATS

    p = sub.add_parser("dedup", help="drop exact duplicates and duplicates by normalised user message",
                       description="Keep the first of each duplicate: exact (same JSON, any key order) and/or by "
                       "the normalised user messages (NFKC, case, whitespace, end punctuation).",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("inputs", nargs="+", metavar="INPUT")
    p.add_argument("--output", required=True)
    p.add_argument("--by", choices=BY, default="both")
    p.add_argument("--input-format", choices=INPUT_FORMATS, default="auto")
    p.add_argument("--on-error", choices=ON_ERROR, default="fail")
    p.set_defaults(func=cmd_dedup)


def cmd_dedup(args) -> int:
    from lossmask.dedup import dedup, print_dedup_report

    print_dedup_report(dedup(args.inputs, args.output, by=args.by, input_format=args.input_format,
                             on_error=args.on_error))
    return 0


def _stats_parser(sub) -> None:
    from lossmask.sources import INPUT_FORMATS

    p = sub.add_parser("stats", help="counts, lengths and (--diversity) n-gram diversity of episode files",
                       description="Episodes, messages per role, turns and length histograms; with --diversity "
                       "distinct-n ratios and the most repeated user templates.")
    p.add_argument("inputs", nargs="+", metavar="INPUT")
    p.add_argument("--diversity", action="store_true")
    p.add_argument("--input-format", choices=INPUT_FORMATS, default="auto")
    p.set_defaults(func=cmd_stats)


def cmd_stats(args) -> int:
    from lossmask.stats import compute_stats, print_stats

    print_stats(compute_stats(args.inputs, diversity=args.diversity, input_format=args.input_format))
    return 0


def _convert_parser(sub) -> None:
    from lossmask.convert import KINDS, SYSTEM_TOOLS

    p = sub.add_parser(
        "convert",
        help="convert a Hugging Face dataset (hub id or local parquet/json/arrow) to episodes",
        description="oasst2 message trees (best-ranked paths), Alpaca, ShareGPT/UltraChat and tool-use data with "
        "XML tool calls, into the episode JSONL schema. Every record is validated before it is written.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("kind", choices=KINDS)
    p.add_argument("source", help="hub id (where a hub exists) or a local file or directory")
    p.add_argument("--output", required=True)
    p.add_argument("--languages", nargs="+", metavar="LANG", help="keep these languages (e.g. en de)")
    p.add_argument("--max-examples", type=int, help="seeded sample of at most N episodes")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--split", default="train")
    p.add_argument("--min-depth", type=int, default=2, help="oasst2: minimum messages in a path")
    p.add_argument("--system-tools", choices=SYSTEM_TOOLS, default="keep",
                   help="tool-xml: keep, cut or drop the tool listing in the system prompt")
    p.set_defaults(func=cmd_convert)


def cmd_convert(args) -> int:
    from lossmask.convert import convert, print_convert_report

    report = convert(args.kind, args.source, args.output, languages=args.languages,
                     max_examples=args.max_examples, seed=args.seed, split=args.split, min_depth=args.min_depth,
                     system_tools=args.system_tools)
    print_convert_report(report)
    return 0 if report.episodes_written else 1


def _generate_data_parser(sub) -> None:
    p = sub.add_parser(
        "generate-data",
        help="generate curriculum data for a phase (deterministic, English and German)",
        description="Phases: 1 format lock, 2 operators, 3 chat, 4 multi-turn, 5 tool call, 6 agentic, "
        "1b long context (or a generator name). Tool phases run the real tools against a document "
        "workspace (--workspace, default: the shipped bilingual sample). --held-out writes prompts never "
        "used in training, for the gates.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("phase", help="1, 2, 3, 4, 5, 6, 1b, or a generator name")
    p.add_argument("--n", type=int, required=True, help="episodes to generate")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--languages", nargs="+", default=["en", "de"])
    p.add_argument("--held-out", action="store_true", help="held-out prompts (disjoint from training data)")
    p.add_argument("--workspace", help="tool phases: a folder of documents to run the tools against")
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help="a generator option (e.g. target_tokens=3000 for 1b)")
    p.add_argument("--out", required=True, help="output JSONL (written atomically)")
    p.set_defaults(func=cmd_generate_data)


def cmd_generate_data(args) -> int:
    from lossmask.generate import generate_phase
    from lossmask.generate.format_lock import write_jsonl
    from lossmask.train.config import parse_overrides

    options = parse_overrides(args.option)
    if args.workspace:
        options["workspace"] = args.workspace
    records = generate_phase(args.phase, args.n, args.seed, tuple(args.languages), args.held_out, **options)
    print(f"wrote {write_jsonl(records, args.out)} episodes to {args.out}")
    return 0


def _build_tokenizer_parser(sub) -> None:
    p = sub.add_parser("build-tokenizer", help="train a small byte-level BPE with the myPT tokens on episode files",
                       description="The demo's tokenizer: byte-level BPE trained on the text of JSONL episodes, "
                       "plus the 19 myPT special tokens, vocabulary padded to a multiple of 64.",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("inputs", nargs="+", metavar="INPUT.jsonl")
    p.add_argument("--out", required=True, help="tokenizer directory (written atomically)")
    p.add_argument("--vocab-size", type=int, default=2048)
    p.set_defaults(func=cmd_build_tokenizer)


def cmd_build_tokenizer(args) -> int:
    from lossmask.pipeline import build_tokenizer

    tok = build_tokenizer([Path(p) for p in args.inputs], Path(args.out), args.vocab_size)
    print(f"wrote {args.out}: {len(tok)} tokens")
    return 0


def _gate_parser(sub) -> None:
    p = sub.add_parser(
        "gate",
        help="generation-based success gate of a curriculum phase on a checkpoint",
        description="Phases 1 (format lock), 2 (operators), 3 (chat), 4 (multi-turn), 1b (long context), 5 (tool "
        "call), 6 (agentic). Generates on held-out prompts (--prompts, or generated held-out data), prints a "
        "table and exits 1 when the gate fails. --regression runs every earlier phase's gate too; the "
        "out-of-distribution prompt files are reported as warnings.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("phase")
    p.add_argument("--model", required=True, help="checkpoint directory")
    p.add_argument("--prompts", help="held-out records (JSONL); default: generated held-out data")
    p.add_argument("--regression", action="store_true", help="also gate every earlier phase")
    p.add_argument("--n", type=int, help="generated held-out prompts")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-new-tokens", type=int)
    p.add_argument("--workspace", help="tool phases: the document workspace")
    p.add_argument("--no-ood", action="store_true", help="skip the out-of-distribution warnings")
    p.add_argument("--report", help="write the reports as JSON")
    p.set_defaults(func=cmd_gate)


def cmd_gate(args) -> int:
    from lossmask.gate import gate_checkpoint

    options = {"n": args.n, "seed": args.seed, "batch_size": args.batch_size, "ood": not args.no_ood}
    if args.max_new_tokens:
        options["max_new_tokens"] = args.max_new_tokens
    if args.workspace:
        options["workspace"] = args.workspace
    reports = gate_checkpoint(args.phase, args.model, args.prompts, regression=args.regression, report=args.report,
                              **options)
    return 0 if all(r.passed for r in reports) else 1


def _pipeline_parser(sub) -> None:
    p = sub.add_parser(
        "pipeline",
        help="one curriculum phase end to end: generate, mix with replay, prepare, train, gate",
        description="Runs the steps of a phase config (configs/pipelines/phase*.yaml); complete steps are skipped, "
        "so an interrupted pipeline continues. --dry-run prints each step as its lossmask command.",
    )
    p.add_argument("config")
    p.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    p.add_argument("--preset", help="a preset of the config, e.g. tiny (a quick end-to-end check on a CPU)")
    p.add_argument("--force", action="store_true", help="redo steps whose outputs exist")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override (dotted keys)")
    p.set_defaults(func=cmd_pipeline)


def cmd_pipeline(args) -> int:
    from lossmask.pipeline import load_pipeline, run
    from lossmask.train.config import parse_overrides

    result = run(load_pipeline(args.config, parse_overrides(args.set), args.preset), args.dry_run, args.force)
    return 3 if result.passed is False else 0


def _negatives_parser(sub) -> None:
    from lossmask.negatives import KINDS, ON_ERROR

    p = sub.add_parser(
        "negatives",
        help="build diverse negatives from good SFT responses (for preference pairs)",
        description="Five kinds, each labelled in _meta.negative_kind: an unwarranted refusal, a truncated answer "
        "(no stop), an answer to a different question, a format violation, a factual corruption.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("inputs", nargs="+", metavar="SFT.jsonl")
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--kinds", nargs="+", choices=KINDS, default=list(KINDS))
    p.add_argument("--on-error", choices=ON_ERROR, default="fail")
    p.set_defaults(func=cmd_negatives)


def cmd_negatives(args) -> int:
    from lossmask.negatives import build_negatives, print_negatives_report

    print_negatives_report(build_negatives(args.inputs, args.out, seed=args.seed, kinds=tuple(args.kinds),
                                           on_error=args.on_error))
    return 0


def _pairs_parser(sub) -> None:
    from lossmask.negatives import KINDS, ON_ERROR

    p = sub.add_parser(
        "pairs",
        help="combine SFT responses with negatives into a balanced, deduplicated pair set",
        description="Joins each negative to its SFT episode (chosen = the SFT answer, rejected = the negative), "
        "drops duplicates, balances the kinds and prints the composition.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--sft", nargs="+", required=True, metavar="SFT.jsonl")
    p.add_argument("--negatives", nargs="+", required=True, metavar="NEG.jsonl")
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--per-kind", type=int, help="pairs per kind (default: as many as the scarcest kind has)")
    p.add_argument("--kinds", nargs="+", choices=KINDS)
    p.add_argument("--on-error", choices=ON_ERROR, default="fail")
    p.set_defaults(func=cmd_pairs)


def cmd_pairs(args) -> int:
    from lossmask.negatives import build_pairs, print_pair_composition

    print_pair_composition(build_pairs(args.sft, args.negatives, args.out, seed=args.seed, per_kind=args.per_kind,
                                       kinds=tuple(args.kinds) if args.kinds else None, on_error=args.on_error))
    return 0


def _dpo_parser(sub) -> None:
    p = sub.add_parser(
        "dpo",
        help="DPO from an SFT checkpoint on a pair dataset (prepare --pairs)",
        description="Sigmoid DPO (beta 0.1 by default) with sequence log-probabilities summed over trained tokens "
        "only, against a frozen reference: the starting model (log-probabilities computed once), or with --lora "
        "the same model with the new adapter disabled (an SFT adapter is merged first). Loss normalised over the "
        "pairs of the whole accumulation window and across processes.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--data", required=True, help="pair dataset directory")
    p.add_argument("--model", required=True, help="SFT checkpoint (model directory or LoRA adapter)")
    p.add_argument("--out", required=True)
    p.add_argument("--config", help="JSON or YAML (see configs/train/dpo.yaml): SFT keys plus beta")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--lora", metavar="SPEC", help="train a new LoRA adapter, e.g. r=16,alpha=32")
    p.add_argument("--quantize", choices=("4bit", "8bit"))
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_dpo)


def cmd_dpo(args) -> int:
    from lossmask.train import DPOArgs, load_dpo_config, parse_overrides, run_dpo

    result = run_dpo(DPOArgs(args.model, args.data, args.out, config=load_dpo_config(args.config,
                             parse_overrides(args.set)), lora=args.lora, quantize=args.quantize,
                             overwrite=args.overwrite, progress=not args.quiet))
    if os.environ.get("RANK", "0") == "0":
        shown = ", ".join(f"{k} {v:.4f}" for k, v in sorted((result.val or result.last).items()))
        print(f"{result.optimizer_steps} optimizer steps; {shown}\nreference: {result.reference}\n"
              f"checkpoint: {result.final_dir}\nmetrics: {result.metrics_path}")
    return 0


def _compare_parser(sub) -> None:
    from lossmask.render import FORMATS

    p = sub.add_parser(
        "compare",
        help="compare models side by side (format, refusals, preference accuracy, length)",
        description="Loads the models one after another (never two at once) and reports format compliance and "
        "refusal rate (pattern checks) on generations, preference accuracy by log-likelihood on held-out pairs, "
        "and average length.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--models", required=True, metavar="NAME=DIR,...", help="e.g. base=DIR,sft=DIR,dpo=DIR")
    p.add_argument("--eval", required=True, metavar="FILE", help="held-out pairs (JSONL)")
    p.add_argument("--format", choices=FORMATS)
    p.add_argument("--chat-template", metavar="FILE")
    p.add_argument("--template-kwargs", metavar="JSON", default="{}")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--json", metavar="OUT", help="also write the comparison as JSON")
    p.set_defaults(func=cmd_compare)


def cmd_compare(args) -> int:
    from lossmask.compare import compare_models, parse_models, print_comparison
    from lossmask.render import RenderOptions

    render = RenderOptions(format=args.format, template_kwargs=json.loads(args.template_kwargs),
                           chat_template=Path(args.chat_template).read_text() if args.chat_template else None)
    print_comparison(compare_models(parse_models(args.models), args.eval, render=render,
                                    max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                                    json_out=args.json))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lossmask",
        description="Exact loss masks for SFT and DPO of causal language models: prepare, inspect, validate, "
        "train.",
        epilog=EPILOG,
    )
    parser.add_argument("--version", action="version", version=f"lossmask {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _prepare_parser(sub)
    _inspect_parser(sub)
    _validate_parser(sub)
    _add_tokens_parser(sub)
    _pack_parser(sub)
    _mix_parser(sub)
    _replay_parser(sub)
    _dedup_parser(sub)
    _stats_parser(sub)
    _convert_parser(sub)
    _generate_data_parser(sub)
    _build_tokenizer_parser(sub)
    _gate_parser(sub)
    _pipeline_parser(sub)
    _negatives_parser(sub)
    _pairs_parser(sub)
    _dpo_parser(sub)
    _compare_parser(sub)
    _train_parser(sub)
    _generate_parser(sub)
    _merge_parser(sub)
    _demo_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return args.func(args)
    except LossmaskError as exc:
        print(f"lossmask {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:  # disk full, read-only directory, permissions: the system's words, not a traceback
        where = f"{exc.filename}: " if exc.filename else ""
        print(
            f"lossmask {args.command}: error: cannot read or write {where}{exc.strerror or exc}; "
            "free space or pick a writable location, then run again (outputs are written atomically, "
            "nothing partial was kept)",
            file=sys.stderr,
        )
        return 1
    except KeyboardInterrupt:
        print("interrupted; nothing partial was left behind", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
