"""Turn a figures file written by the reliability tests into the table of docs/reliability.md.

    LOSSMASK_RELIABILITY_FIGURES=/tmp/fig.jsonl python -m pytest tests/test_reliability_*.py
    python -m tests.reliability.figures /tmp/fig.jsonl
"""
from __future__ import annotations

import json
import sys
from collections import Counter, defaultdict


def table(lines: list[str]) -> str:
    rows: dict[tuple[str, str], Counter] = defaultdict(Counter)
    for line in lines:
        record = json.loads(line)
        rows[record["family"], record["path"]].update(record["counts"])
    out = ["| family | path | outcomes (count) |", "|---|---|---|"]
    for (family, path), counts in sorted(rows.items()):
        shown = ", ".join(f"{key} {value:,}" for key, value in sorted(counts.items()))
        out.append(f"| {family} | {path} | {shown} |")
    return "\n".join(out)


if __name__ == "__main__":
    with open(sys.argv[1], encoding="utf-8") as f:
        print(table([line for line in f if line.strip()]))
