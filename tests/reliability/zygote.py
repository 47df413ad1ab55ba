"""A fork server for the crash tests: run ``lossmask`` commands in forked children and SIGKILL them on cue.

A fresh interpreter spends seconds importing torch and transformers before a command writes its first byte;
this server imports them once, then forks one child per command, so a test can afford many kills. The child
is the whole command (``lossmask.cli.main``) in its own process group: a kill takes its worker processes too,
as ``kill -9`` of a job does. Protocol: one JSON request per stdin line, one JSON reply per stdout line.

Request: ``argv`` (lossmask arguments), ``log`` (file for the child's stdout and stderr), optional
``kill_after`` (seconds after the fork), ``kill_on`` (a glob: kill as soon as a path matches it, e.g. a
temporary file the command is writing), ``fsize`` (RLIMIT_FSIZE bytes, with SIGXFSZ ignored so an oversized
write fails with EFBIG: a full disk), ``user`` (uid/gid to drop to, for read-only directories under root).
Reply: ``rc`` (exit status; -9 when killed; 99 when the command escaped with a traceback), ``killed``,
``hung`` (still running after HANG_SECONDS, then killed), ``seconds``.
"""
from __future__ import annotations

import glob
import json
import os
import resource
import signal
import sys
import time
import traceback
from pathlib import Path

TRACEBACK = 99
HANG_SECONDS = 300  # a command still running after this is killed and reported as hung


def _child(request: dict) -> int:
    fd = os.open(request["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    if request.get("fsize") is not None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (request["fsize"], request["fsize"]))
    if request.get("user") is not None:
        os.setgroups([])
        os.setgid(request["user"])
        os.setuid(request["user"])
    try:
        from lossmask.cli import main

        return int(main(request["argv"]) or 0)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 1
    except BaseException:  # noqa: BLE001  anything else escaping the command is what the tests look for
        traceback.print_exc()
        return TRACEBACK


def run(request: dict) -> dict:
    start = time.monotonic()
    pid = os.fork()
    if pid == 0:
        code = TRACEBACK
        try:
            os.setpgid(0, 0)
            code = _child(request)
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    try:
        os.setpgid(pid, pid)
    except OSError:  # the child got there first, or already ended
        pass
    killed = False
    deadline = None if request.get("kill_after") is None else start + request["kill_after"]
    pattern = request.get("kill_on")
    hung = False
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        due = deadline is not None and time.monotonic() >= deadline
        hung = time.monotonic() - start > HANG_SECONDS
        if due or hung or (pattern is not None and glob.glob(pattern)):
            try:
                os.killpg(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            killed = True
            _, status = os.waitpid(pid, 0)
            break
        time.sleep(0.001)
    rc = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
    seconds = time.monotonic() - start
    return {"rc": rc, "killed": killed and rc == -signal.SIGKILL and not hung, "hung": hung, "seconds": seconds}


def main() -> None:
    """Import what the commands import (so each fork starts warm), then serve requests until stdin closes."""
    import torch  # noqa: F401
    from transformers import AutoTokenizer, PreTrainedTokenizerFast  # noqa: F401  (lazy modules: load them now)

    import lossmask.cli
    import lossmask.mix
    import lossmask.pack
    import lossmask.prepare
    import lossmask.render.mypt
    import lossmask.validate

    if "--train" in sys.argv:
        import accelerate  # noqa: F401
        import matplotlib.pyplot  # noqa: F401
        from transformers import AutoConfig, AutoModelForCausalLM, LlamaForCausalLM  # noqa: F401

        import lossmask.train
        import lossmask.train.loop  # noqa: F401
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        print(json.dumps(run(json.loads(line))), flush=True)


class Zygote:
    """The test side: starts the server and sends it requests."""

    def __init__(self, train: bool = False):
        import subprocess

        env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
               "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}  # tests run 2 at a time on 2 cores: no oversubscription
        args = [sys.executable, "-m", "tests.reliability.zygote"] + (["--train"] if train else [])
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        self.proc = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=root, env=env)
        assert json.loads(self.proc.stdout.readline()) == {"ready": True}

    def run(self, argv: list[str], log, **options) -> dict:
        self.proc.stdin.write(json.dumps({"argv": [str(a) for a in argv], "log": str(log), **options}) + "\n")
        self.proc.stdin.flush()
        reply = json.loads(self.proc.stdout.readline())
        reply["output"] = Path(log).read_text(encoding="utf-8", errors="replace")
        assert not reply["hung"], f"lossmask {argv[0]} hung (no result after {HANG_SECONDS} s): {reply['output']}"
        return reply

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


if __name__ == "__main__":
    main()
