"""Memory: peak RSS of ``lossmask prepare`` (a subprocess) on N and 10×N conversations; it must stay flat.

The CLI runs exactly as a user would run it (``lossmask prepare FILE --tokenizer DIR --out DIR --quiet``).
Peak memory is measured two ways: the kernel's ``ru_maxrss`` of the child (``os.wait4``: the largest
resident set any one process of the run reached), and psutil polling every 10 ms of the whole process
tree (the parent plus its workers, summed), which also sees the workers of ``--workers`` > 1.
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as `python benchmarks/memory.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import common

NAME = "memory"
CLI = "import sys; from lossmask.cli import main; sys.exit(main())"


def build_parser():
    p = common.parser(NAME, __doc__.splitlines()[0])
    p.add_argument("--conversations", type=int, default=2000, help="N: the small run; the large one has 10×N")
    p.add_argument("--factor", type=int, default=10, help="the large run has factor×N conversations")
    p.add_argument("--tokenizer", default="llama3_1", choices=common.TOKENIZERS)
    p.add_argument("--workers", type=int, default=1, help="workers of each prepare run")
    p.set_defaults(repeats=1)
    return p


def tree_rss(process) -> int:
    """Resident bytes of a process and all its descendants (0 for any that vanished meanwhile)."""
    import psutil

    total = 0
    for p in [process, *process.children(recursive=True)]:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total


def peak_rss(command: list[str], log: Path, interval: float = 0.01) -> dict[str, Any]:
    """Run ``command`` (stderr to ``log``); its peak RSS by polling the process tree, and ru_maxrss from wait4."""
    import psutil

    start = time.perf_counter()
    with open(log, "wb") as err:
        child = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=err)
    process = psutil.Process(child.pid)
    polled = 0
    while True:
        pid, status, usage = os.wait4(child.pid, os.WNOHANG)
        if pid:
            break
        polled = max(polled, tree_rss(process))
        time.sleep(interval)
    seconds = time.perf_counter() - start
    child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode:
        tail = log.read_text(errors="replace")[-2000:]
        raise RuntimeError(f"{' '.join(command)} failed ({child.returncode}): {tail}")
    return {"seconds": seconds, "polled_peak_mib": polled / 2**20, "ru_maxrss_mib": usage.ru_maxrss / 1024}


def run_size(n: int, args, work: Path) -> dict[str, Any]:
    data = common.write_jsonl(common.conversations(n, args.seed), work / f"conversations-{n}.jsonl")
    tokenizer = common.tokenizer_path(args.tokenizer)
    best = None
    for repeat in range(args.repeats):
        out = work / f"ds-{n}-{repeat}"
        command = [sys.executable, "-c", CLI, "prepare", str(data), "--tokenizer", tokenizer, "--out", str(out),
                   "--workers", str(args.workers), "--quiet"]
        run = peak_rss(command, work / "stderr.log")
        if best is None or run["ru_maxrss_mib"] < best["ru_maxrss_mib"]:
            best = run
    return {"conversations": n, "input_mib": data.stat().st_size / 2**20, **best}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="lossmask-bench-memory-") as tmp:
        small = run_size(args.conversations, args, Path(tmp))
        large = run_size(args.conversations * args.factor, args, Path(tmp))
    result = {
        "tokenizer": args.tokenizer,
        "runs": [small, large],
        "ru_maxrss_ratio": large["ru_maxrss_mib"] / small["ru_maxrss_mib"],
        "polled_peak_ratio": large["polled_peak_mib"] / small["polled_peak_mib"],
    }
    common.table(
        f"Peak memory of `lossmask prepare` ({args.tokenizer}, {args.workers} worker(s))",
        ("conversations", "input MiB", "seconds", "ru_maxrss MiB", "polled tree peak MiB"),
        [(r["conversations"], r["input_mib"], r["seconds"], r["ru_maxrss_mib"], r["polled_peak_mib"])
         for r in result["runs"]],
        caption=f"{args.factor}× the conversations: ru_maxrss ×{result['ru_maxrss_ratio']:.3f}, "
        f"polled tree peak ×{result['polled_peak_ratio']:.3f}",
    )
    return common.write_results(args.out, NAME, vars(args), result)


if __name__ == "__main__":
    main()
