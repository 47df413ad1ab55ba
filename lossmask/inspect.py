"""``lossmask inspect``: show a prepared dataset token by token, coloured by loss weight."""
from __future__ import annotations

from rich.console import Console

from lossmask.errors import LossmaskError


def inspect_dataset(path: str, split: str = "train", samples: int = 3, line: int | None = None,
                    html: str | None = None) -> int:
    """Print (or write as HTML) the first ``samples`` examples, or those from input ``line``."""
    from lossmask.store import open_dataset
    from lossmask.tokenizer import load_tokenizer
    from lossmask.view import html_page, print_episode, token_rows, write_html

    ds = open_dataset(path, split=split)
    tokenizer = load_tokenizer(str(ds.tokenizer_path))
    if line is not None:
        chosen = [i for i in range(len(ds)) if _lines(ds[i]).count(line)]
        if not chosen:
            raise LossmaskError(f"no {split} example comes from input line {line} (it may be in another split "
                                "or rejected: see rejects.jsonl)")
    else:
        chosen = list(range(min(samples, len(ds))))
    episodes = []
    for i in chosen:
        item = ds[i]
        # a preference pair (lossmask.pairs) shows both sides, which share their prompt tokens
        sides = [(f" {side}", item[side]) for side in ("chosen", "rejected")] if "chosen" in item else [("", item)]
        for name, seq in sides:
            rows = token_rows(seq["input_ids"], seq["loss_mask"], seq["labels"], tokenizer)
            episodes.append((f"{split}[{i}]{name} ← {_where(item)}", rows))
    if html:
        summary = {k: v for k, v in ds.metadata.get("summary", {}).items()
                   if v is not None and not isinstance(v, (dict, list))}
        packing = ds.metadata.get("packing", {}).get("splits", {}).get(split)
        if packing:
            summary["packing"] = f"block {ds.metadata['packing']['block_size']}, {packing['efficiency']:.2%} full"
        write_html(html, html_page(episodes, f"lossmask inspect {path}", summary))
        Console().print(f"wrote {html} ({len(episodes)} examples)")
        return 0
    console = Console()
    for n, (title, rows) in enumerate(episodes):
        print_episode(console, rows, title, legend=n == 0)
    return 0


def _lines(item) -> list[int]:
    if "source" in item:
        return [int(item["source"][1])]
    return [int(s[1]) for s in item.get("sources", [])]


def _where(item) -> str:
    if "source" in item:
        return f"{item['source'][0]}:{item['source'][1]}"
    return ", ".join(f"{f}:{n}" for f, n in item.get("sources", []))
