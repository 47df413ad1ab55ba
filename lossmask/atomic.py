"""Atomic outputs: a file or directory appears complete, or not at all (temp + rename)."""
from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

from lossmask.errors import LossmaskError


@contextmanager
def atomic_file(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO]:
    """A file (``"wb"`` or ``"w"``, UTF-8) that replaces ``path`` only when the block ends without error."""
    out = Path(path)
    if out.is_dir():
        raise LossmaskError(f"cannot write {out}: it is a directory; give the output file's path")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    except OSError as exc:
        raise LossmaskError(f"cannot write {out}: {exc.strerror or exc}") from exc
    try:
        text = {"encoding": "utf-8", "newline": "\n"} if "b" not in mode else {}
        with os.fdopen(fd, mode, **text) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_file(path, "w") as f:
        f.write(text)


def replace_directory(staged: Path, final: Path) -> None:
    """Rename ``staged`` to ``final``; an existing ``final`` is moved aside first and removed after
    (a directory rename cannot overwrite a non-empty directory)."""
    old = final.parent / f".old-{final.name}"
    if old.exists() or old.is_symlink():
        _remove(old)
    if final.exists() or final.is_symlink():
        os.replace(final, old)
    os.replace(staged, final)
    if old.exists() or old.is_symlink():
        _remove(old)


def _remove(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink()
    else:
        shutil.rmtree(path)


def save_tokenizer(tokenizer, out: str | os.PathLike) -> Path:
    """``save_pretrained`` into a temporary sibling directory, then rename it into place."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    staged = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        tokenizer.save_pretrained(str(staged))
        os.chmod(staged, 0o755)
        replace_directory(staged, out)
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise
    return out
