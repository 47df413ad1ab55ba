"""Turn scaling: time per token for conversations of 1, 10, 40 and 80 turns of the same total length.

- lossmask: render + mask in memory with the default history policy (``auto``). Its render is linear in
  the conversation: one full render, one small render per assistant turn, one tokenization.
- floor: render each conversation once with the template and tokenize it (no mask): how much of the
  per-token cost of many short turns is the template's and the tokenizer's own;
- naive (the common way): for every assistant turn ``k`` render ``messages[:k]`` with the generation
  prompt and ``messages[:k+1]``, tokenize both, and train the tokens between; then tokenize the whole
  conversation once. Every turn re-renders and re-tokenizes its whole prefix: quadratic in turns, so it
is timed on the first ``--naive-conversations`` only.

Llama 3.1 is the main row: its template renders every turn the same way in history as at the end.
Qwen3's drops earlier turns' reasoning block, so lossmask splits such a conversation into one example
per assistant turn, each the exact prefix as at inference; its output then grows with the square of the
turns, and the fair figure is time per *output* token (tokens written), shown beside it.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as `python benchmarks/turns_scaling.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import common
from benchmarks.baselines import LossmaskCore, floor

NAME = "turns_scaling"


def build_parser():
    p = common.parser(NAME, __doc__.splitlines()[0])
    p.add_argument("--turns", type=int, nargs="+", default=[1, 10, 40, 80], help="assistant turns per conversation")
    p.add_argument("--words", type=int, default=2400, help="words per conversation, whatever its turn count")
    p.add_argument("--conversations", type=int, default=32, help="conversations per turn count")
    p.add_argument("--naive-conversations", type=int, default=4, help="of those, how many the naive approach gets")
    p.add_argument("--tokenizers", nargs="+", default=["llama3_1", "qwen3"], choices=common.TOKENIZERS)
    return p


def naive_mask(tokenizer, messages: list[dict]) -> tuple[list[int], list[int]]:
    """Token ids of the conversation and a 0/1 mask, found by re-rendering the prefix of every assistant turn."""

    def count(msgs: list[dict], generation_prompt: bool) -> int:
        text = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=generation_prompt)
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    ids = tokenizer(tokenizer.apply_chat_template(messages, tokenize=False), add_special_tokens=False)["input_ids"]
    mask = [0] * len(ids)
    for k, message in enumerate(messages):
        if message["role"] == "assistant":
            lo, hi = count(messages[:k], True), count(messages[:k + 1], False)
            mask[lo:hi] = [1] * (hi - lo)
    return ids, mask


def bench(name: str, turns: int, args) -> dict[str, Any]:
    convs = [common.fixed_size_conversation(args.seed, i, turns, args.words) for i in range(args.conversations)]
    messages = [common.chat_messages(c) for c in convs]
    episodes = common.episodes(convs)
    core = LossmaskCore(common.load(name))
    tokenizer = common.load(name)
    few = messages[:args.naive_conversations]
    timed = common.best_of_each({
        "lossmask": lambda: core.run(episodes),
        "floor": lambda: floor(tokenizer, messages),
        "naive": lambda: [naive_mask(tokenizer, m) for m in few],
    }, args.repeats)
    mine, flo, naive = timed["lossmask"], timed["floor"], timed["naive"]
    tokens = sum(len(ids) for ids in flo.result["input_ids"])
    naive_tokens = sum(len(ids) for ids, _ in naive.result)
    written = sum(len(e) for per in mine.result for e in per)
    return {
        "tokenizer": name,
        "turns": turns,
        "conversations": len(convs),
        "tokens": tokens,
        "lossmask_examples": sum(len(per) for per in mine.result),
        "lossmask_tokens_written": written,
        "lossmask_us_per_token": 1e6 * mine.best / tokens,
        "lossmask_us_per_output_token": 1e6 * mine.best / written,
        "floor_us_per_token": 1e6 * flo.best / tokens,
        "naive_us_per_token": 1e6 * naive.best / naive_tokens,
        "timings": {"lossmask": mine.to_dict(), "floor": flo.to_dict(), "naive": naive.to_dict()},
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    common.single_threaded_tokenizers()
    results = [bench(name, turns, args) for name in args.tokenizers for turns in args.turns]
    for r in results:
        base = next(b for b in results if b["tokenizer"] == r["tokenizer"] and b["turns"] == args.turns[0])
        r["lossmask_vs_first"] = r["lossmask_us_per_token"] / base["lossmask_us_per_token"]
        r["lossmask_output_vs_first"] = r["lossmask_us_per_output_token"] / base["lossmask_us_per_output_token"]
        r["floor_vs_first"] = r["floor_us_per_token"] / base["floor_us_per_token"]
        r["naive_vs_first"] = r["naive_us_per_token"] / base["naive_us_per_token"]
    common.table(
        f"Time per token by turns ({args.words} words per conversation, {args.conversations} conversations, "
        f"best of {args.repeats})",
        ("tokenizer", "turns", "tokens/conv", "lossmask µs/token", f"× vs {args.turns[0]} turn",
         "examples/conv", "lossmask µs/output token", "×", "floor µs/token", "×", "naive µs/token", "×"),
        [(r["tokenizer"], r["turns"], r["tokens"] // r["conversations"], r["lossmask_us_per_token"],
          r["lossmask_vs_first"], r["lossmask_examples"] / r["conversations"], r["lossmask_us_per_output_token"],
          r["lossmask_output_vs_first"], r["floor_us_per_token"], r["floor_vs_first"], r["naive_us_per_token"],
          r["naive_vs_first"]) for r in results],
        caption="target: lossmask's time per token at 80 turns within 1.5× of 1 turn (Llama 3.1); "
        "output tokens = tokens of the examples lossmask writes",
    )
    return common.write_results(args.out, NAME, vars(args), results)


if __name__ == "__main__":
    main()
