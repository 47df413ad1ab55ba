"""Budgets, figures and small tools shared by the reliability tests.

Budgets (environment variables): ``LOSSMASK_FUZZ_EXAMPLES`` inputs per fuzzed path (default 60; a larger
run is also randomized, the default one derandomized so CI is reproducible), ``LOSSMASK_CRASH_KILLS`` kills per
command (default 6), ``LOSSMASK_CRASH_SEED`` (default 0) for the kill times.

Figures: with ``LOSSMASK_RELIABILITY_FIGURES=FILE`` every test family appends one JSON line per run to FILE
(inputs tried, faults injected, outcomes); ``python -m tests.reliability.figures FILE`` prints the table of
docs/reliability.md.
"""
from __future__ import annotations

import json
import os
import signal
from collections import Counter
from contextlib import contextmanager
from pathlib import Path

from hypothesis import HealthCheck, settings

FUZZ_EXAMPLES = int(os.environ.get("LOSSMASK_FUZZ_EXAMPLES", "60"))
CRASH_KILLS = int(os.environ.get("LOSSMASK_CRASH_KILLS", "6"))
CRASH_SEED = int(os.environ.get("LOSSMASK_CRASH_SEED", "0"))
HANG_SECONDS = 60  # one input taking longer than this is a hang


def fuzz_settings(scale: float = 1.0) -> settings:
    """Hypothesis settings for one fuzzed path: the budget, no per-example deadline (no_hang guards hangs)."""
    return settings(
        max_examples=max(1, int(FUZZ_EXAMPLES * scale)),
        deadline=None,
        derandomize="LOSSMASK_FUZZ_EXAMPLES" not in os.environ,
        suppress_health_check=list(HealthCheck),
        database=None,
    )


class Tally:
    """Counts outcomes of one test family and writes them to the figures file (if one is asked for)."""

    def __init__(self, family: str, path: str):
        self.family = family
        self.path = path
        self.counts: Counter = Counter()

    def __call__(self, outcome: str, n: int = 1) -> None:
        self.counts[outcome] += n

    def write(self, **extra) -> None:
        target = os.environ.get("LOSSMASK_RELIABILITY_FIGURES")
        if not target:
            return
        record = {"family": self.family, "path": self.path, "counts": dict(self.counts), **extra}
        with open(target, "a", encoding="utf-8") as f:  # one short append per line: safe across xdist workers
            f.write(json.dumps(record, sort_keys=True) + "\n")


@contextmanager
def no_hang(seconds: int = HANG_SECONDS):
    """Fail (instead of waiting forever) when the block runs longer than ``seconds``."""

    def expire(signum, frame):
        raise TimeoutError(f"no result after {seconds} s: a hang")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def tree_bytes(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` by relative path (symlinks followed), for byte-for-byte comparisons."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(Path(root).rglob("*")) if p.is_file()}


def write_jsonl(path: Path, records) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n" for r in records),
                    encoding="utf-8")
    return path


def build_tokenizer(out: Path):
    """The project's tiny byte-level BPE with the myPT tokens (about a second): fast runs, any text encodes."""
    from lossmask.tiny_tokenizer import build_tiny_tokenizer

    corpus = [f"Question {i}? Answer {i}. The quick brown fox jumps over the lazy dog {i}." for i in range(200)]
    corpus += ["Übergrößenträger äöü ß — 東京 🙂 {{ 7*7 }} {% for %} <tool_call> \\n \t"]
    return build_tiny_tokenizer(corpus, out, vocab_size=512)
