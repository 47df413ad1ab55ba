"""Preparation throughput: lossmask against TRL's SFT dataset preparation and the template+tokenizer floor.

Contenders, on the same generated conversations and the same real tokenizer (see baselines.py):

- ``lossmask prepare``: the whole run, JSONL in → verified dataset on disk (temporary directory), with
  1 worker and with ``--workers`` (default: every core);
- ``lossmask render+mask``: the in-memory core of one worker, for a like-for-like comparison;
- ``floor``: render with the tokenizer's template, then one batched tokenization with offsets (no mask);
- ``TRL``: ``SFTTrainer._prepare_dataset`` with ``assistant_only_loss=True``, in-process
  (``dataset_num_proc=None``, TRL's default) and with ``dataset_num_proc=1``, which datasets 5 runs in
  a one-process pool. TRL's fixed cost per call (datasets fingerprints every map by hashing its
  arguments, the tokenizer included) is measured on a one-conversation dataset and reported apart.

Every single-process contender runs with TOKENIZERS_PARALLELISM=false: "1 worker" is one core.
"""
from __future__ import annotations

import itertools
import shutil
import sys
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as `python benchmarks/prep_throughput.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import common
from benchmarks.baselines import TRL_FAMILY, LossmaskCore, TrlPreparer, floor

NAME = "prep_throughput"


def build_parser():
    p = common.parser(NAME, __doc__.splitlines()[0])
    p.add_argument("--conversations", type=int, default=1000, help="generated conversations per tokenizer")
    p.add_argument("--tokenizers", nargs="+", default=list(common.TOKENIZERS), choices=common.TOKENIZERS)
    p.add_argument("--workers", type=int, default=common.cores(), help="workers of the parallel run")
    p.add_argument("--trl-pool", action="store_true",
                   help="also time TRL with dataset_num_proc=1 (datasets runs it in a one-process pool; slow)")
    return p


def _row(seconds: float, conversations: int, tokens: int) -> dict[str, Any]:
    return {
        "seconds": round(seconds, 6),
        "conversations_per_s": conversations / seconds,
        "tokens": tokens,
        "tokens_per_s": tokens / seconds,
    }


def _prepare_fn(name: str, data: Path, work: Path, workers: int):
    """The whole ``lossmask.prepare`` as a timed function; each call writes a fresh output directory."""
    from lossmask.prepare import PrepareOptions, prepare

    options = PrepareOptions([str(data)], common.tokenizer_path(name), "", workers=workers)
    count = itertools.count()
    return lambda: prepare(replace(options, out=str(work / f"ds-{data.stem}-{workers}-{next(count)}")),
                           progress=False)


def bench_tokenizer(name: str, convs: list[dict], work: Path, args) -> dict[str, Any]:
    n = len(convs)
    messages = [common.chat_messages(c) for c in convs]
    episodes = common.episodes(convs)
    data = common.write_jsonl(convs, work / "conversations.jsonl")
    one = common.write_jsonl(convs[:1], work / "one.jsonl")
    rows: dict[str, dict[str, Any]] = {}
    timings: dict[str, dict[str, Any]] = {}

    def record(key: str, timing: common.Timing, tokens: int | None) -> None:
        rows[key] = _row(timing.best, n, tokens) if tokens is not None else {"seconds": round(timing.best, 6)}
        timings[key] = timing.to_dict()

    prepared = common.best_of_each({
        "1": _prepare_fn(name, data, work, 1),
        "n": _prepare_fn(name, data, work, args.workers),
        "fixed": _prepare_fn(name, one, work, 1),
    }, args.repeats)
    for path in work.glob("ds-*"):
        shutil.rmtree(path)
    prep1, prep_fixed = prepared["1"], prepared["fixed"]
    record("lossmask prepare, 1 worker", prep1, prep1.result.tokens)
    record(f"lossmask prepare, {args.workers} workers", prepared["n"], prepared["n"].result.tokens)
    record("lossmask prepare fixed cost (1 conversation)", prep_fixed, None)

    core = LossmaskCore(common.load(name))
    tokenizer = common.load(name)
    trl = TrlPreparer(common.load(name), TRL_FAMILY[name])
    full, single = trl.dataset(messages), trl.dataset(messages[:1])
    timed = common.best_of_each({
        "core": lambda: core.run(episodes),
        "floor": lambda: floor(tokenizer, messages),
        "trl": lambda: trl.run(full),
        "trl_fixed": lambda: trl.run(single),
    }, args.repeats)
    trl.close()
    run, flo, out, trl_fixed = timed["core"], timed["floor"], timed["trl"], timed["trl_fixed"]
    examples = [e for per in run.result for e in per]
    floor_tokens = sum(len(ids) for ids in flo.result["input_ids"])
    trl_tokens = sum(len(ids) for ids in out.result["input_ids"])
    record("lossmask render+mask (in memory)", run, sum(len(e) for e in examples))
    record("floor: template + batched tokenization", flo, floor_tokens)
    record("TRL _prepare_dataset (in-process)", out, trl_tokens)
    record("TRL fixed cost (1 conversation)", trl_fixed, None)
    if args.trl_pool:
        pool = TrlPreparer(common.load(name), TRL_FAMILY[name], num_proc=1)
        pooled = common.best_of(lambda: pool.run(full), args.repeats)
        record("TRL _prepare_dataset (dataset_num_proc=1)", pooled, trl_tokens)
        pool.close()

    def marginal(timing: common.Timing, fixed: common.Timing) -> float | None:
        """Seconds beyond the fixed cost; None where load noise makes the fixed cost look like all of it."""
        rest = timing.best - fixed.best
        return rest if rest > 0.1 * timing.best else None

    ratios = {
        "core_vs_floor": flo.best / run.best,
        "prepare1_vs_floor": flo.best / prep1.best,
        "prepare1_marginal_vs_floor": common.ratio(flo.best, marginal(prep1, prep_fixed)),
        "core_vs_trl": out.best / run.best,
        "core_vs_trl_marginal": common.ratio(marginal(out, trl_fixed), run.best),
        "prepare1_vs_trl": out.best / prep1.best,
    }
    if args.trl_pool:
        ratios["prepare1_vs_trl_pool"] = pooled.best / prep1.best
    return {
        "tokenizer": name,
        "conversations": n,
        "input_tokens": floor_tokens,
        "lossmask_examples": len(examples),
        "history_split": sum(len(per) > 1 for per in run.result),
        "trl_template": trl.template_note,
        "rows": rows,
        "timings": timings,
        "ratios": ratios,
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    common.single_threaded_tokenizers()
    convs = common.conversations(args.conversations, args.seed)
    results = []
    with tempfile.TemporaryDirectory(prefix="lossmask-bench-") as tmp:
        for name in args.tokenizers:
            results.append(bench_tokenizer(name, convs, Path(tmp), args))
    report(results, args)
    return common.write_results(args.out, NAME, vars(args), results)


def report(results: list[dict[str, Any]], args) -> None:
    rows = []
    for r in results:
        for contender, row in r["rows"].items():
            rows.append((r["tokenizer"], contender, row["seconds"], row.get("conversations_per_s"), row.get("tokens"),
                         row.get("tokens_per_s")))
    common.table(
        f"Preparation throughput: {args.conversations} generated conversations, best of {args.repeats}",
        ("tokenizer", "contender", "seconds", "conv/s", "tokens written", "tokens/s"), rows,
        caption="tokens written: tokens of the prepared sequences (lossmask splits a Qwen3 conversation whose "
        "history renders differently into one example per turn)",
    )
    keys = ("core_vs_floor", "prepare1_vs_floor", "prepare1_marginal_vs_floor", "core_vs_trl", "core_vs_trl_marginal",
            "prepare1_vs_trl", "prepare1_vs_trl_pool")
    common.table(
        "Speed ratios (higher = lossmask faster; targets: ≥ 0.7× floor at 1 worker, ≥ 5× TRL)",
        ("tokenizer", "core/floor", "prep/floor", "prep marg./floor", "core/TRL", "core/TRL marg.", "prep/TRL",
         "prep/TRL pool"),
        [(r["tokenizer"], *(r["ratios"].get(k) for k in keys)) for r in results],
        caption="core = lossmask render+mask in memory; prep = whole lossmask prepare, 1 worker; TRL = in-process "
        "_prepare_dataset; marg. = without the fixed cost per call; TRL pool = dataset_num_proc=1 (--trl-pool)",
    )
    for r in results:
        print(f"{r['tokenizer']}: TRL used {r['trl_template']}; lossmask split {r['history_split']} of "
              f"{r['conversations']} conversations by its history policy")


if __name__ == "__main__":
    main()
