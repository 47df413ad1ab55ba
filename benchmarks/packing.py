"""Packing: lossmask's ``plan_packing`` against TRL's best-fit-decreasing ``pack_dataset``, fill rate and time.

Fill rate = real tokens / (blocks × block size). Episode lengths come from three distributions:
``short`` (uniform 30-50 tokens, the hard case for plain BFD: every block ends with a gap no episode
fits), ``mixed`` (log-normal, median 150, 16..block) and ``chats`` (the token lengths of generated
conversations prepared by lossmask with the Llama 3.1 tokenizer, those that fit a block).

- lossmask: ``plan_packing`` (the plan), and ``pack_examples`` (plan + building every block's arrays);
- TRL: ``trl.data_utils.pack_dataset(strategy="bfd")`` on a datasets.Dataset with ``input_ids`` and
  ``labels``, as SFTTrainer packs: its ``map`` packs each batch of 1000 episodes separately (the
  default), and, as TRL's best case, the whole dataset as one batch (``batch_size=None``).
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import numpy as np

if __package__ in (None, ""):  # run as `python benchmarks/packing.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import common

NAME = "packing"
DISTRIBUTIONS = ("short", "mixed", "chats")


def build_parser():
    p = common.parser(NAME, __doc__.splitlines()[0])
    p.add_argument("--episodes", type=int, default=20000, help="episodes of the short and mixed distributions")
    p.add_argument("--chats", type=int, default=2000, help="generated conversations for the chats distribution")
    p.add_argument("--block-size", type=int, default=1024)
    p.add_argument("--distributions", nargs="+", default=list(DISTRIBUTIONS), choices=DISTRIBUTIONS)
    return p


def lengths_of(distribution: str, args) -> np.ndarray:
    rng = np.random.default_rng(args.seed)
    if distribution == "short":
        return rng.integers(30, 51, args.episodes)
    if distribution == "mixed":
        return np.clip(np.rint(rng.lognormal(np.log(150), 1.0, args.episodes)), 16, args.block_size).astype(np.int64)
    from benchmarks.baselines import LossmaskCore

    convs = common.conversations(args.chats, args.seed)
    per = LossmaskCore(common.load("llama3_1")).run(common.episodes(convs))
    lengths = np.array([len(e) for examples in per for e in examples], dtype=np.int64)
    return lengths[lengths <= args.block_size]


def fill(real_tokens: int, blocks: int, block_size: int) -> float:
    return real_tokens / (blocks * block_size)


def bench_lossmask(lengths: np.ndarray, block: int, repeats: int) -> dict[str, dict[str, Any]]:
    from lossmask.episode import Source
    from lossmask.example import Example
    from lossmask.pack import pack_examples, plan_packing

    plan = common.best_of(lambda: plan_packing(lengths, block), repeats)
    examples = [
        Example(np.arange(n, dtype=np.uint32), np.ones(n, np.float32), np.full(n, 5, np.uint8), Source("bench", i))
        for i, n in enumerate(lengths.tolist())
    ]
    built = common.best_of(lambda: pack_examples(examples, block), repeats)
    placed = sorted(i for b in plan.result for i in b)
    assert placed == list(range(len(lengths))), "plan_packing lost or repeated an episode"
    real = int(lengths.sum())
    return {
        "lossmask plan_packing": {"blocks": len(plan.result), "fill": fill(real, len(plan.result), block),
                                  **plan.to_dict()},
        "lossmask pack_examples (plan + blocks)": {"blocks": len(built.result),
                                                   "fill": fill(real, len(built.result), block), **built.to_dict()},
    }


def bench_trl(lengths: np.ndarray, block: int, repeats: int) -> dict[str, dict[str, Any]]:
    import datasets
    from trl.data_utils import pack_dataset

    datasets.disable_progress_bars()
    ids = [list(range(n)) for n in lengths.tolist()]
    dataset = datasets.Dataset.from_dict({"input_ids": ids, "labels": ids})
    out = {}
    for key, map_kwargs in (("TRL pack_dataset bfd (batches of 1000, as SFTTrainer)", {}),
                            ("TRL pack_dataset bfd (one batch)", {"batch_size": None})):
        timing = common.best_of(lambda kw=map_kwargs: pack_dataset(dataset, block, "bfd", dict(kw)), repeats)
        packed = timing.result
        real = sum(sum(s) for s in packed["seq_lengths"])
        assert real == int(lengths.sum()), "TRL dropped tokens"
        out[key] = {"blocks": len(packed), "fill": fill(real, len(packed), block), **timing.to_dict()}
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    common.single_threaded_tokenizers()
    results = []
    for distribution in args.distributions:
        lengths = lengths_of(distribution, args)
        contenders = {**bench_lossmask(lengths, args.block_size, args.repeats),
                      **bench_trl(lengths, args.block_size, args.repeats)}
        lower_bound = -(-int(lengths.sum()) // args.block_size)
        results.append({
            "distribution": distribution,
            "episodes": len(lengths),
            "tokens": int(lengths.sum()),
            "mean_length": float(lengths.mean()),
            "min_blocks": lower_bound,
            "contenders": contenders,
        })
    common.table(
        f"Packing into blocks of {args.block_size} tokens, best of {args.repeats}",
        ("distribution", "episodes", "mean len", "min blocks", "contender", "blocks", "fill %", "seconds"),
        [(r["distribution"], r["episodes"], r["mean_length"], r["min_blocks"], name, c["blocks"], 100 * c["fill"],
          c["best_s"]) for r in results for name, c in r["contenders"].items()],
        caption="fill = real tokens / (blocks × block size); min blocks = ceil(tokens / block size), no packing does better",
    )
    return common.write_results(args.out, NAME, vars(args), results)


if __name__ == "__main__":
    main()
