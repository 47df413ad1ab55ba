"""Mask agreement: lossmask's loss mask against TRL's assistant mask, token by token, with the reasons.

Both prepare the same generated conversations with the same real tokenizer: lossmask with its default
policies, TRL through ``SFTTrainer._prepare_dataset`` with ``assistant_only_loss=True`` (trained =
``labels != -100``). Two levels of comparison:

- token level, where both produced the same token ids: every token whose mask differs is counted under
  a category (which side trains it, and what the token is: e.g. the newline after ``<end_of_turn>``);
- turn level, where the token sequences differ (TRL renders its own training template, or lossmask
  split the conversation into one example per turn): the trained text of each assistant turn (the
  decoded runs of trained tokens) is compared, and the difference named.
"""
from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as `python benchmarks/mask_agreement.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import common
from benchmarks.baselines import TRL_FAMILY, LossmaskCore, TrlPreparer

NAME = "mask_agreement"
EXAMPLES_PER_CATEGORY = 2


def build_parser():
    p = common.parser(NAME, __doc__.splitlines()[0], timed=False)
    p.add_argument("--conversations", type=int, default=300, help="generated conversations per tokenizer")
    p.add_argument("--tokenizers", nargs="+", default=list(common.TOKENIZERS), choices=common.TOKENIZERS)
    return p


def trained_runs(ids, trained) -> list[tuple[int, int]]:
    """Maximal [lo, hi) runs of trained tokens."""
    runs, start = [], None
    for i, t in enumerate(trained):
        if t and start is None:
            start = i
        elif not t and start is not None:
            runs.append((start, i))
            start = None
    if start is not None:
        runs.append((start, len(ids)))
    return runs


class Tally:
    """Counts per category, keeping the first few examples of each."""

    def __init__(self):
        self.counts: Counter = Counter()
        self.examples: dict[str, list[str]] = {}

    def add(self, category: str, example: str) -> None:
        self.counts[category] += 1
        shown = self.examples.setdefault(category, [])
        if len(shown) < EXAMPLES_PER_CATEGORY:
            shown.append(example)

    def to_dict(self) -> dict[str, Any]:
        return {c: {"count": n, "examples": self.examples[c]} for c, n in self.counts.most_common()}


class Comparer:
    """Compares one tokenizer's two masks; knows the tokenizer's stop strings for naming the categories."""

    def __init__(self, tokenizer, stop_strings: tuple[str, ...]):
        from lossmask.render.base import Label

        self.tok = tokenizer
        self.stops = stop_strings
        self.label_name = {int(v): v.name.lower() for v in Label}
        self.tokens = Tally()
        self.turns = Tally()
        self.sequences = Tally()
        self.compared_tokens = self.agreeing_tokens = 0
        self.compared_turns = self.equal_turns = 0
        self.identical_sequences = 0

    def piece(self, token_id: int) -> str:
        return self.tok.decode([int(token_id)], skip_special_tokens=False)

    def context(self, ids, j: int) -> str:
        """The token in brackets between its neighbours, as a Python literal (newlines visible)."""
        before = self.tok.decode([int(t) for t in ids[max(j - 3, 0):j]], skip_special_tokens=False)
        after = self.tok.decode([int(t) for t in ids[j + 1:j + 3]], skip_special_tokens=False)
        return repr(before) + " [" + repr(self.piece(ids[j])) + "] " + repr(after)

    def token_category(self, ids, labels, j: int, trl_trains: bool) -> str:
        side = "TRL only" if trl_trains else "lossmask only"
        text, previous = self.piece(ids[j]), self.piece(ids[j - 1]) if j else ""
        if text.strip() == "" and previous in self.stops:
            return f"{side}: {text!r} after the stop token {previous}"
        return f"{side}: a {self.label_name[int(labels[j])]} token"

    def conversation(self, examples: list, trl_ids: list[int], trl_labels: list[int], trl_own_template: bool) -> None:
        trl_trained = [label != -100 for label in trl_labels]
        if len(examples) == 1 and len(examples[0]) == len(trl_ids) and list(map(int, examples[0].input_ids)) == trl_ids:
            self.identical_sequences += 1
            ex = examples[0]
            for j, (mine, theirs) in enumerate(zip((ex.weights > 0).tolist(), trl_trained)):
                self.compared_tokens += 1
                if mine == theirs:
                    self.agreeing_tokens += 1
                else:
                    self.tokens.add(self.token_category(trl_ids, ex.labels, j, theirs), self.context(trl_ids, j))
        else:
            reasons = []
            if len(examples) > 1:
                reasons.append("lossmask split it into one example per turn (history policy auto)")
            if not trl_own_template:
                reasons.append("TRL rendered its stored training template, not the tokenizer's")
            shape = f"{len(examples)} lossmask examples ({sum(len(e) for e in examples)} tokens), {len(trl_ids)} TRL tokens"
            self.sequences.add("; ".join(reasons) or "token ids differ", shape)
        self.compare_turns(examples, trl_ids, trl_trained)

    def compare_turns(self, examples: list, trl_ids: list[int], trl_trained: list[bool]) -> None:
        mine = [self.decode(ex.input_ids, lo, hi) for ex in examples
                for lo, hi in trained_runs(ex.input_ids, (ex.weights > 0).tolist())]
        theirs = [self.decode(trl_ids, lo, hi) for lo, hi in trained_runs(trl_ids, trl_trained)]
        if len(mine) != len(theirs):
            self.turns.add("different number of trained turns", f"lossmask {len(mine)}, TRL {len(theirs)}")
            return
        for a, b in zip(mine, theirs):
            self.compared_turns += 1
            if a == b:
                self.equal_turns += 1
            else:
                self.turns.add(turn_difference(a, b), f"lossmask …{a[-24:]!r} | TRL …{b[-24:]!r}")

    def decode(self, ids, lo: int, hi: int) -> str:
        return self.tok.decode([int(t) for t in ids[lo:hi]], skip_special_tokens=False)

    def to_dict(self) -> dict[str, Any]:
        return {
            "identical_token_sequences": self.identical_sequences,
            "tokens_compared": self.compared_tokens,
            "tokens_agreeing": self.agreeing_tokens,
            "token_disagreements": self.tokens.to_dict(),
            "differing_sequences": self.sequences.to_dict(),
            "turns_compared": self.compared_turns,
            "turns_equal": self.equal_turns,
            "turn_differences": self.turns.to_dict(),
        }


def turn_difference(mine: str, theirs: str) -> str:
    """Name how TRL's trained text of a turn differs from lossmask's."""
    if theirs.startswith(mine):
        return f"TRL also trains {theirs[len(mine):]!r} after the turn"
    if mine.startswith(theirs):
        return f"TRL leaves {mine[len(theirs):]!r} at the end of the turn untrained"
    if theirs.endswith(mine):
        return f"TRL also trains {theirs[:len(theirs) - len(mine)]!r} before the turn"
    if mine.endswith(theirs):
        return f"TRL leaves {mine[:len(mine) - len(theirs)]!r} at the start of the turn untrained"
    return "trained text differs"


def compare_tokenizer(name: str, convs: list[dict]) -> dict[str, Any]:
    core = LossmaskCore(common.load(name))
    examples = core.run(common.episodes(convs))
    trl = TrlPreparer(common.load(name), TRL_FAMILY[name])
    prepared = trl.run(trl.dataset([common.chat_messages(c) for c in convs]))
    trl.close()
    comparer = Comparer(common.load(name), core.renderer.stop_strings)
    for per, row in zip(examples, prepared):
        comparer.conversation(per, row["input_ids"], row["labels"], trl.own_template)
    return {"tokenizer": name, "conversations": len(convs), "trl_template": trl.template_note, **comparer.to_dict()}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    convs = common.conversations(args.conversations, args.seed)
    results = [compare_tokenizer(name, convs) for name in args.tokenizers]
    report(results)
    return common.write_results(args.out, NAME, vars(args), results)


def report(results: list[dict[str, Any]]) -> None:
    common.table(
        "Mask agreement, lossmask vs TRL assistant_only_loss",
        ("tokenizer", "conversations", "same token ids", "tokens compared", "tokens agreeing", "agree %",
         "turns compared", "turns equal"),
        [(r["tokenizer"], r["conversations"], r["identical_token_sequences"], r["tokens_compared"],
          r["tokens_agreeing"], 100 * r["tokens_agreeing"] / r["tokens_compared"] if r["tokens_compared"] else None,
          r["turns_compared"], r["turns_equal"]) for r in results],
        caption="tokens: where both produced the same ids; turns: trained text per assistant turn, every conversation",
    )
    rows = []
    for r in results:
        for level, key in (("token", "token_disagreements"), ("sequence", "differing_sequences"),
                           ("turn", "turn_differences")):
            for category, item in r[key].items():
                rows.append((r["tokenizer"], level, category, item["count"], " / ".join(item["examples"][:1])))
    common.table("Disagreements by category", ("tokenizer", "level", "category", "count", "example"), rows)
    for r in results:
        print(f"{r['tokenizer']}: TRL used {r['trl_template']}")


if __name__ == "__main__":
    main()
