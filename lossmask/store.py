"""The binary dataset users train from: memory-mapped token, mask, weight and label files per split.

Layout of a dataset directory ``DIR`` (every number little-endian)::

    DIR/dataset_metadata.json  counts, sha256 and size of every file, tokenizer identity, the caller's
                               settings; sorted keys, fixed indentation: same inputs, same bytes
    DIR/tokenizer/             the tokenizer the ids came from (checked to reload to the same identity)
    DIR/<split>/tokens.bin     uint32 token ids, every sequence back to back
                mask.bin       uint8 per token: 1 = trained, 0 = no loss
                weights.bin    float32 per token; only when some trained weight is not 1.0
                labels.bin     uint8 per token: the ``Label`` of the text it came from
                episodes.idx   uint64 (start, length) per episode
                sources.idx    uint64 (input file index, line) per episode; names in metadata "inputs"
                flags.bin      uint8 per episode: bit 0 = truncated to max_length at prepare time

A packed split (``pack.py``) stores fixed-size blocks of whole episodes in the same files, plus::

                segments.bin   uint32 per token: 1..n for the episodes of its block, 0 for padding
                blocks.idx     uint64 (start, length) per block; blocks are back to back, all block_size

Inside a block episodes sit back to back from the block start; padding (pad id, weight 0, label PAD)
fills the end. ``episodes.idx`` still lists every episode, so packed data can be shown per episode.

A preference-pair dataset (metadata ``"kind": "pairs"``, written by lossmask.pairs) stores pair split ``S``
as two ordinary splits ``S.chosen`` and ``S.rejected``, aligned by episode index (same count, same
sources.idx); ``open_dataset(DIR, "train")`` reads them together as a PairDataset. In ``S.rejected``,
flags bit 0 also marks a response stored without its stop on purpose (a truncated negative).

Everything is written into ``.DIR.tmp-<pid>`` beside DIR and renamed into place only once complete and
fsynced: a crash never leaves a DIR that looks complete, and ``force`` replaces an old DIR only then.
"""
from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import glob
import hashlib
import json
import operator
import os
import re
import shutil
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lossmask import __version__
from lossmask.errors import LossmaskError
from lossmask.example import Example
from lossmask.render.base import Label
from lossmask.tokenizer import identity_mismatches, load_tokenizer, tokenizer_identity

FORMAT_VERSION = 1
METADATA = "dataset_metadata.json"
TOKENIZER_DIR = "tokenizer"
TRUNCATED = 1  # bit in flags.bin

# name -> (dtype, values per row); token files have one row per token, index files one per episode/block.
TOKEN_FILES: dict[str, str] = {"tokens.bin": "<u4", "mask.bin": "u1", "weights.bin": "<f4", "labels.bin": "u1"}
EPISODE_FILES: dict[str, tuple[str, int]] = {
    "episodes.idx": ("<u8", 2), "sources.idx": ("<u8", 2), "flags.bin": ("u1", 1),
}
PACKED_FILES: dict[str, tuple[str, int]] = {"segments.bin": ("<u4", 1), "blocks.idx": ("<u8", 2)}
# Keys the writer owns in dataset_metadata.json; a caller's metadata may not set them ("inputs" excepted).
WRITER_KEYS = ("files", "format_version", "lossmask_version", "splits", "tokenizer")
# Files a tokenizer directory may consist of: copied when save_pretrained does not reload faithfully.
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "chat_template.jinja", "chat_template.json", "tokenizer.model", "vocab.json", "merges.txt",
)
PAIRS_KIND = "pairs"  # metadata "kind" of a preference-pair dataset (lossmask.pairs)
PAIR_SIDES = ("chosen", "rejected")  # pair split S is stored as the splits S.chosen and S.rejected
_SPLIT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
# Tokenizer directories (files with sizes and mtimes, and the identity) already shown to reload faithfully
# when copied: reloading a large tokenizer takes seconds, and a process often writes several datasets.
_FAITHFUL_COPIES: set[tuple] = set()
_CHUNK = 1 << 20


@dataclass
class Problem:
    """One thing wrong with a stored dataset, located as precisely as the check can.

    ``file`` is relative to the dataset directory; ``episode`` and ``position`` (token inside the
    episode) are set when the problem is in one episode; ``offset`` is the token offset in the split's
    token files; ``block`` the packed block.
    """

    check: str  # short key: metadata, missing, size, checksum, index, mask_direction, turn_end, ...
    file: str
    message: str
    episode: int | None = None
    position: int | None = None
    block: int | None = None
    offset: int | None = None

    def __str__(self) -> str:
        where = [self.file]
        if self.block is not None:
            where.append(f"block {self.block}")
        if self.episode is not None:
            where.append(f"episode {self.episode}")
        if self.position is not None:
            where.append(f"position {self.position}")
        if self.offset is not None:
            where.append(f"(offset {self.offset})")
        return f"{' '.join(where)}: {self.message}"


# -- writing ----------------------------------------------------------------------------------------------
def make_block(examples: Sequence[Example], block_size: int, pad_id: int) -> dict[str, Any]:
    """Lay whole examples back to back in one block of ``block_size`` tokens, padded at the end.

    Padding has id ``pad_id``, weight 0, label PAD and segment 0; its positions continue those of the
    episode before it (no real token attends to padding, so its positions only need to be valid).
    """
    lengths = [len(e) for e in examples]
    if not examples or sum(lengths) > block_size:
        raise LossmaskError(f"a block of {block_size} tokens cannot hold episodes of lengths {lengths}")
    if not 0 <= pad_id < 2**32:
        raise LossmaskError(f"pad id {pad_id} is not a valid token id")
    ids = np.full(block_size, pad_id, dtype=np.uint32)
    weights = np.zeros(block_size, dtype=np.float32)
    labels = np.full(block_size, int(Label.PAD), dtype=np.uint8)
    segments = np.zeros(block_size, dtype=np.int32)
    at = 0
    for k, (ex, n) in enumerate(zip(examples, lengths), start=1):
        ids[at : at + n] = ex.input_ids
        weights[at : at + n] = ex.weights
        labels[at : at + n] = ex.labels
        segments[at : at + n] = k
        at += n
    return {
        "input_ids": ids,
        "loss_mask": weights,
        "labels": labels,
        "segment_ids": segments,
        "position_ids": position_ids_from_segments(segments),
        "sources": [(ex.source.file, ex.source.line) for ex in examples],
    }


def position_ids_from_segments(segment_ids: np.ndarray) -> np.ndarray:
    """Positions restarting at 0 at every episode start (last axis); padding (0) continues the run before it."""
    seg = np.asarray(segment_ids)
    idx = np.broadcast_to(np.arange(seg.shape[-1]), seg.shape)
    start = np.ones(seg.shape, dtype=bool)
    start[..., 1:] = (seg[..., 1:] != seg[..., :-1]) & (seg[..., 1:] != 0)
    last_start = np.maximum.accumulate(np.where(start, idx, 0), axis=-1)
    return (idx - last_start).astype(np.int64)


class _Sink:
    """An output file that hashes what it writes, so closing needs no second read of the data."""

    def __init__(self, path: Path):
        self.path = path
        self.file = open(path, "wb")
        self.sha = hashlib.sha256()
        self.size = 0

    def write(self, array: np.ndarray, dtype: str) -> None:
        self.write_bytes(np.ascontiguousarray(array, dtype=dtype).tobytes())

    def write_bytes(self, data: bytes) -> None:
        self.file.write(data)
        self.sha.update(data)
        self.size += len(data)

    def close(self) -> None:
        if not self.file.closed:
            self.file.flush()
            os.fsync(self.file.fileno())
            self.file.close()

    def entry(self) -> dict:
        return {"bytes": self.size, "sha256": self.sha.hexdigest()}


class _SplitWriter:
    """Appends episodes (or packed blocks) of one split and keeps its counts."""

    def __init__(self, directory: Path, packed: bool):
        directory.mkdir()
        names = [*TOKEN_FILES, *EPISODE_FILES, *(PACKED_FILES if packed else ())]
        self.sinks = {name: _Sink(directory / name) for name in names}
        self.packed = packed
        self.block_size: int | None = None
        self.episodes = self.tokens = self.trained = self.truncated = self.blocks = self.padding = 0
        self.weight_sum = 0.0
        self.weighted = False

    def _tokens(self, ids: np.ndarray, weights: np.ndarray, labels: np.ndarray) -> None:
        trained = weights > 0
        self.sinks["tokens.bin"].write(ids, "<u4")
        self.sinks["mask.bin"].write(trained, "u1")
        self.sinks["weights.bin"].write(weights, "<f4")
        self.sinks["labels.bin"].write(labels, "u1")
        self.trained += int(np.count_nonzero(trained))
        self.weight_sum += float(weights.sum(dtype=np.float64))
        self.weighted = self.weighted or bool(np.any(weights[trained] != 1.0))

    def _episode(self, start: int, ex: Example, file_index: int) -> None:
        self.sinks["episodes.idx"].write(np.array([start, len(ex)]), "<u8")
        self.sinks["sources.idx"].write(np.array([file_index, ex.source.line]), "<u8")
        self.sinks["flags.bin"].write(np.array([TRUNCATED if ex.truncated else 0]), "u1")
        self.episodes += 1
        self.truncated += int(ex.truncated)

    def add(self, ex: Example, file_index: int) -> None:
        self._tokens(ex.input_ids, ex.weights, ex.labels)
        self._episode(self.tokens, ex, file_index)
        self.tokens += len(ex)

    def add_block(self, examples: Sequence[Example], file_indices: Sequence[int], block_size: int, pad_id: int) -> None:
        if self.block_size is None:
            self.block_size = block_size
        elif block_size != self.block_size:
            raise LossmaskError(f"block size {block_size} differs from this split's earlier blocks ({self.block_size})")
        block = make_block(examples, block_size, pad_id)
        self._tokens(block["input_ids"], block["loss_mask"], block["labels"])
        self.sinks["segments.bin"].write(block["segment_ids"], "<u4")
        self.sinks["blocks.idx"].write(np.array([self.tokens, block_size]), "<u8")
        at = self.tokens
        for ex, file_index in zip(examples, file_indices):
            self._episode(at, ex, file_index)
            at += len(ex)
        self.padding += self.tokens + block_size - at
        self.tokens += block_size
        self.blocks += 1

    def finish(self, split: str) -> dict[str, dict]:
        """Close every file (dropping weights.bin when all trained weights are 1.0); their metadata entries."""
        for sink in self.sinks.values():
            sink.close()
        if not self.weighted:
            self.sinks.pop("weights.bin").path.unlink()
        return {f"{split}/{name}": sink.entry() for name, sink in self.sinks.items()}

    def summary(self) -> dict:
        out = {
            "episodes": self.episodes,
            "tokens": self.tokens,
            "trained_tokens": self.trained,
            "loss_weight_sum": self.weight_sum,
            "weighted": self.weighted,
            "truncated_episodes": self.truncated,
        }
        if self.packed:
            real = self.tokens - self.padding
            out["packed"] = {
                "block_size": self.block_size,
                "blocks": self.blocks,
                "real_tokens": real,
                "padding_tokens": self.padding,
                "efficiency": round(real / self.tokens, 6) if self.tokens else 0.0,
            }
        return out


class DatasetWriter:
    """Writes a dataset directory atomically; use as a context manager so a failure leaves nothing behind.

    Streaming: memory does not grow with the data (only counts are kept). Holds an exclusive lock beside
    DIR (``.DIR.lock``) so two writers to the same DIR refuse rather than interleave. ``inputs`` names the
    input files by index (every example's source file must be one); ``tokenizer_name`` replaces the
    tokenizer's ``name_or_path`` in the recorded identity.
    """

    def __init__(
        self,
        out_dir: str | os.PathLike,
        tokenizer,
        *,
        force: bool = False,
        inputs: Sequence[str],
        trust_remote_code: bool = False,
        tokenizer_name: str | None = None,
    ):
        self.out = Path(os.path.abspath(out_dir))
        self.inputs = [str(name) for name in inputs]
        self._input_index: dict[str, int] = {}
        for i, name in enumerate(self.inputs):
            self._input_index.setdefault(name, i)
        self._splits: dict[str, _SplitWriter] = {}
        self._extra: dict[str, dict] = {}
        self._tmp: Path | None = None
        self._closed = False
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self._lock_path = self.out.parent / f".{self.out.name}.lock"
        self._lock_fd: int | None = _acquire_lock(self._lock_path, self.out)
        try:
            _clean_stale(self.out)
            _check_target(self.out, force)
            self._tmp = self.out.parent / f".{self.out.name}.tmp-{os.getpid()}"
            self._tmp.mkdir()
            self.identity = tokenizer_identity(tokenizer)
            if tokenizer_name is not None:  # e.g. packing: the user's tokenizer, not the source's copy of it
                self.identity["name_or_path"] = tokenizer_name
            _save_tokenizer(tokenizer, self._tmp / TOKENIZER_DIR, self.identity, trust_remote_code)
        except BaseException:
            self._abort()
            raise

    def __enter__(self) -> "DatasetWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if self._closed:
            return False
        self._abort()
        if exc_type is None:
            raise LossmaskError(f"DatasetWriter for {self.out} left without close(metadata): nothing was written")
        return False

    def _split(self, split: str, packed: bool) -> _SplitWriter:
        if self._closed or self._tmp is None:
            raise LossmaskError(f"DatasetWriter for {self.out} is closed")
        writer = self._splits.get(split)
        if writer is None:
            if not _SPLIT_NAME.fullmatch(split) or split == TOKENIZER_DIR or split in self._extra:
                raise LossmaskError(f"bad split name {split!r}: use letters, digits, '_', '-' or '.'")
            writer = self._splits[split] = _SplitWriter(self._tmp / split, packed)
        if writer.packed != packed:
            raise LossmaskError(f"split {split!r} cannot mix packed blocks and single episodes")
        return writer

    def _file_index(self, ex: Example) -> int:
        index = self._input_index.get(ex.source.file)
        if index is None:
            raise LossmaskError(
                f"{ex.source.file}:{ex.source.line}: this input file is not in the writer's inputs {self.inputs}; "
                "pass every input file in inputs="
            )
        return index

    def add(self, split: str, example: Example) -> None:
        """Append one episode to ``split``."""
        _check_example(example)
        self._split(split, packed=False).add(example, self._file_index(example))

    def add_block(self, split: str, examples: Sequence[Example], block_size: int, pad_id: int) -> None:
        """Append one packed block holding ``examples`` whole, padded to ``block_size`` (see make_block)."""
        for ex in examples:
            _check_example(ex)
        indices = [self._file_index(ex) for ex in examples]
        self._split(split, packed=True).add_block(examples, indices, block_size, pad_id)

    def add_file(self, name: str, content: str | bytes) -> None:
        """An extra file at the top of DIR (e.g. rejects.jsonl), checksummed like the rest."""
        reserved = name in (METADATA, TOKENIZER_DIR) or name in self._splits or name in self._extra
        if not _SPLIT_NAME.fullmatch(name) or reserved or self._tmp is None or self._closed:
            raise LossmaskError(f"cannot add file {name!r} to the dataset (bad, reserved or duplicate name)")
        data = content.encode("utf-8") if isinstance(content, str) else bytes(content)
        sink = _Sink(self._tmp / name)
        sink.write_bytes(data)
        sink.close()
        self._extra[name] = sink.entry()

    def close(self, metadata: dict) -> Path:
        """Finish every file, write dataset_metadata.json, and move the dataset into place atomically."""
        if self._closed or self._tmp is None:
            raise LossmaskError(f"DatasetWriter for {self.out} is already closed")
        tmp = self._tmp
        try:
            if not any(w.episodes for w in self._splits.values()):
                raise LossmaskError(f"no episodes were added: nothing to write to {self.out}")
            files: dict[str, dict] = dict(self._extra)
            splits = {}
            for split in sorted(self._splits):
                files.update(self._splits[split].finish(split))
                splits[split] = self._splits[split].summary()
            _write_json(tmp / METADATA, self._metadata(metadata, splits, files))
            _fsync_tree(tmp)
            _publish(tmp, self.out)
            self._tmp = None  # it is the dataset now
            _fsync_dir(self.out.parent)
        except BaseException:
            self._abort()
            raise
        self._closed = True
        self._release()
        return self.out

    def _metadata(self, metadata: dict, splits: dict, files: dict) -> dict:
        clash = sorted(set(metadata) & set(WRITER_KEYS))
        if clash:
            raise LossmaskError(f"metadata keys {clash} are written by the DatasetWriter itself; remove them")
        meta = dict(metadata)
        given = meta.get("inputs")
        if given is None:
            meta["inputs"] = list(self.inputs)
        elif input_names(meta) != self.inputs:
            raise LossmaskError(
                f"metadata 'inputs' {input_names(meta)} does not match the writer's inputs {self.inputs}"
            )
        meta.update(
            format_version=FORMAT_VERSION,
            lossmask_version=__version__,
            splits=splits,
            files=files,
            tokenizer=self.identity,
        )
        return meta

    def _abort(self) -> None:
        for writer in self._splits.values():
            for sink in writer.sinks.values():
                if not sink.file.closed:
                    with contextlib.suppress(OSError):  # flushing onto a full disk fails: the rmtree must still run
                        sink.file.close()
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None
        self._release()

    def _release(self) -> None:
        if self._lock_fd is not None:
            _unlock(self._lock_path, self._lock_fd)
            self._lock_fd = None


def _check_example(ex: Example) -> None:
    n = len(ex)
    where = f"{ex.source.file}:{ex.source.line}"
    if n == 0:
        raise LossmaskError(f"{where}: empty example (0 tokens) cannot be stored")
    if ex.weights.shape != (n,) or ex.labels.shape != (n,):
        raise LossmaskError(
            f"{where}: example has {n} tokens but {ex.weights.shape[0]} weights and {ex.labels.shape[0]} labels"
        )
    w = np.asarray(ex.weights, dtype=np.float32)
    if not np.all(np.isfinite(w)) or np.any(w < 0):
        raise LossmaskError(f"{where}: loss weights must be finite and >= 0")
    ids = np.asarray(ex.input_ids)
    if ids.min() < 0 or ids.max() >= 2**32:
        raise LossmaskError(f"{where}: token ids must fit uint32")
    if int(np.asarray(ex.labels).max()) > max(Label):
        raise LossmaskError(f"{where}: unknown label value {int(np.asarray(ex.labels).max())}")


def _acquire_lock(path: Path, target: Path) -> int:
    busy = LossmaskError(
        f"another process is writing {target} (lock {path} is held); wait for it to finish or choose another directory"
    )
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        # The holder before us unlinks the file on release; a lock on an unlinked file guards nothing.
        if os.fstat(fd).st_ino != os.stat(path).st_ino:
            raise busy
    except (BlockingIOError, FileNotFoundError):
        os.close(fd)
        raise busy from None
    except BaseException:
        os.close(fd)
        raise
    return fd


def _unlock(path: Path, fd: int) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    os.close(fd)


@contextlib.contextmanager
def exclusive_lock(path: Path, target: Path) -> Iterator[None]:
    """Hold the lock file ``path`` for work on ``target``; another process holding it is refused, not waited for.

    For work that spans several writers (``prepare --pack`` stages, then packs): a crashed holder's
    leftovers can then be removed safely, because no one else can be using them.
    """
    fd = _acquire_lock(path, target)
    try:
        yield
    finally:
        _unlock(path, fd)


def _clean_stale(out: Path) -> None:
    """Remove temp dirs a crashed writer left (we hold the lock, so none is in use)."""
    old = sorted(out.parent.glob(f".{glob.escape(out.name)}.old-*"))
    if old and not out.exists():  # a crash between the two renames of the non-Linux fallback
        os.rename(old.pop(), out)
    for stale in [*old, *out.parent.glob(f".{glob.escape(out.name)}.tmp-*")]:
        _remove(stale)


def _remove(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink()
    else:
        shutil.rmtree(path, ignore_errors=True)


def _check_target(out: Path, force: bool) -> None:
    if not (out.exists() or out.is_symlink()):
        return
    if not force:
        raise LossmaskError(
            f"{out} already exists; pass --force to replace it "
            "(the old one is replaced only once the new one is complete)"
        )
    if not out.is_dir() or (any(out.iterdir()) and not (out / METADATA).is_file()):
        raise LossmaskError(
            f"refusing to replace {out}: it is not a lossmask dataset (no {METADATA}); "
            "remove it yourself or choose another output directory"
        )


def _save_tokenizer(tokenizer, dest: Path, identity: dict, trust_remote_code: bool) -> None:
    """Store the tokenizer so that it reloads to the same identity, or fail before any data is written.

    A tokenizer loaded from a local directory is stored as a copy of that directory's tokenizer files
    (exactly what prepare loaded); otherwise, or when the copy reloads differently (the tokenizer was
    changed in memory), with save_pretrained. Both are checked: save_pretrained alone does not always
    round-trip (transformers 5 reloads a saved legacy Llama tokenizer with a different pre-tokenizer).
    """
    source = Path(str(tokenizer.name_or_path))
    diff = ["not loaded from a local directory"]
    if source.is_dir():
        dest.mkdir()
        copied = []
        for name in TOKENIZER_FILES:
            if (source / name).is_file():
                shutil.copyfile(source / name, dest / name)
                stat = (source / name).stat()
                copied.append((name, stat.st_size, stat.st_mtime_ns))
        key = (str(source.resolve()), tuple(copied), json.dumps(identity, sort_keys=True))
        diff = [] if key in _FAITHFUL_COPIES else _reload_diff(dest, identity, trust_remote_code)
        if not diff:
            _FAITHFUL_COPIES.add(key)
    if diff:
        shutil.rmtree(dest, ignore_errors=True)
        tokenizer.save_pretrained(str(dest))
        diff = _reload_diff(dest, identity, trust_remote_code)
    if diff:
        raise LossmaskError(
            f"the tokenizer {tokenizer.name_or_path!r} does not reload to itself after saving ({'; '.join(diff)}); "
            "save it to a directory with save_pretrained and pass that directory as the tokenizer"
        )


def _reload_diff(directory: Path, identity: dict, trust_remote_code: bool) -> list[str]:
    try:
        reloaded = tokenizer_identity(load_tokenizer(str(directory), trust_remote_code=trust_remote_code))
    except LossmaskError as exc:
        return [str(exc)]
    return [
        f"{key}: {identity[key]!r} became {reloaded.get(key)!r}"
        for key in identity
        if key != "name_or_path" and reloaded.get(key) != identity[key]
    ]


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    raise LossmaskError(f"metadata value {value!r} of type {type(value).__name__} cannot be written as JSON")


def _write_json(path: Path, data: dict) -> None:
    text = json.dumps(data, sort_keys=True, indent=2, ensure_ascii=False, default=_json_default) + "\n"
    path.write_text(text, encoding="utf-8")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    for directory, _, names in os.walk(root):
        for name in names:
            fd = os.open(os.path.join(directory, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(directory))


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one atomic step (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _publish(tmp: Path, out: Path) -> None:
    if not (out.exists() or out.is_symlink()):
        os.rename(tmp, out)
        return
    if _exchange(tmp, out):
        _remove(tmp)  # now holds the old dataset
        return
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    os.rename(out, old)
    os.rename(tmp, out)
    _remove(old)


# -- reading ----------------------------------------------------------------------------------------------
def read_metadata(path: str | os.PathLike) -> dict:
    """dataset_metadata.json of a dataset, checked enough to be trusted by the readers."""
    root = Path(path)
    file = root / METADATA
    if not root.is_dir():
        raise LossmaskError(f"{root} is not a directory (expected a dataset written by lossmask prepare)")
    if not file.is_file():
        raise LossmaskError(f"{file} is missing: {root} is not a complete lossmask dataset (was prepare interrupted?)")
    try:
        meta = json.loads(file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise LossmaskError(f"{file} is not valid JSON ({exc}); the dataset is damaged, prepare it again") from exc
    if not isinstance(meta, dict):
        raise LossmaskError(f"{file} does not hold a JSON object; the dataset is damaged, prepare it again")
    if meta.get("format_version") != FORMAT_VERSION:
        raise LossmaskError(
            f"{file}: format_version {meta.get('format_version')!r} is not {FORMAT_VERSION}, the version this "
            f"lossmask ({__version__}) reads; prepare the dataset again with this version"
        )
    for key, kind in (("splits", dict), ("files", dict), ("inputs", list), ("tokenizer", dict)):
        if not isinstance(meta.get(key), kind):
            raise LossmaskError(f"{file}: '{key}' is missing or not a {kind.__name__}; the dataset is damaged")
    return meta


def input_names(metadata: dict) -> list[str]:
    """Input file names by index: metadata "inputs" holds names, or objects with a "path"."""
    return [item["path"] if isinstance(item, dict) else str(item) for item in metadata.get("inputs", [])]


def sha256_file(path: Path) -> str:
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            sha.update(chunk)
    return sha.hexdigest()


def split_files(entry: dict) -> dict[str, tuple[str, int]]:
    """The files a split must have: name -> (dtype, values per row)."""
    files = {name: (dtype, 1) for name, dtype in TOKEN_FILES.items() if name != "weights.bin" or entry.get("weighted")}
    files.update(EPISODE_FILES)
    if "packed" in entry:
        files.update(PACKED_FILES)
    return files


def _map(path: Path, dtype: str, width: int) -> np.ndarray:
    """Read-only memory map of a file as rows of ``width`` values (an empty array for an empty file)."""
    if path.stat().st_size == 0:
        array = np.empty(0, dtype=dtype)
    else:
        array = np.memmap(path, dtype=dtype, mode="r")
    return array.reshape(-1, width) if width > 1 else array


def split_problems(root: Path, metadata: dict, split: str, *, verify: bool = False) -> list[Problem]:
    """Cheap structural checks of one split (presence, sizes, index bounds); sha256 too with ``verify``."""
    entry = metadata["splits"][split]
    packed = entry.get("packed") if isinstance(entry, dict) else None
    if not isinstance(entry, dict) or not isinstance(packed, (dict, type(None))):
        return [Problem("metadata", METADATA, f"split {split!r}: entry {entry!r} is not a split description")]
    rows = {"tokens": entry.get("tokens"), "episodes": entry.get("episodes")}
    if packed is not None:
        rows["blocks"] = packed.get("blocks")
    for key, value in rows.items():
        if not isinstance(value, int) or value < 0:
            return [Problem("metadata", METADATA, f"split {split!r}: '{key}' is {value!r}, not a count")]
    problems = []
    for name, (dtype, width) in split_files(entry).items():
        rel = f"{split}/{name}"
        unit = "tokens" if name in TOKEN_FILES or name == "segments.bin" else "episodes"
        unit = "blocks" if name == "blocks.idx" else unit
        expected = rows[unit] * np.dtype(dtype).itemsize * width
        listed = metadata["files"].get(rel)
        path = root / rel
        if not isinstance(listed, dict) or listed.get("bytes") != expected:
            problems.append(Problem("metadata", METADATA, f"{rel}: listed as {listed!r}, expected {expected} bytes"))
        elif not path.is_file():
            problems.append(Problem("missing", rel, "file is missing; the dataset is incomplete, prepare it again"))
        elif path.stat().st_size != expected:
            problems.append(Problem(
                "size", rel, f"file is {path.stat().st_size} bytes but should be {expected} "
                f"({rows[unit]} {unit}); it was truncated or modified, prepare the dataset again",
            ))
        elif verify and sha256_file(path) != listed.get("sha256"):
            problems.append(
                Problem("checksum", rel, "sha256 does not match dataset_metadata.json: the file was modified")
            )
    if any(p.check != "checksum" for p in problems):
        return problems
    return problems + _index_problems(root, metadata, split)


def _index_problems(root: Path, metadata: dict, split: str) -> list[Problem]:
    entry = metadata["splits"][split]
    n_tokens = entry["tokens"]
    episodes = _map(root / split / "episodes.idx", "<u8", 2).astype(np.int64)
    starts, lengths = episodes[:, 0], episodes[:, 1]
    ends = starts + lengths
    rel = f"{split}/episodes.idx"

    def first(bad: np.ndarray, check: str, file: str, message: str) -> list[Problem]:
        hits = np.flatnonzero(bad)
        if not len(hits):
            return []
        more = f" ({len(hits)} episodes in all)" if len(hits) > 1 else ""
        return [Problem(check, file, message + more, episode=int(hits[0]))]

    problems = first(
        (lengths < 1) | (ends > n_tokens), "index", rel, f"episode is empty or reaches past the {n_tokens} tokens"
    )
    problems += first(
        np.r_[False, starts[1:] < ends[:-1]], "index", rel,
        "episode starts before the previous one ends (overlap or not in order)",
    )
    sources = _map(root / split / "sources.idx", "<u8", 2)
    n_inputs = len(metadata["inputs"])
    problems += first(
        sources[:, 0] >= n_inputs, "index", f"{split}/sources.idx", f"input file index >= {n_inputs} inputs"
    )
    packed = entry.get("packed")
    if problems or not len(starts):
        return problems
    if packed is None:
        gap = np.r_[starts[0] != 0, starts[1:] != ends[:-1]]
        problems += first(gap, "index", rel, "episodes do not follow each other back to back")
        if not problems and ends[-1] != n_tokens:
            problems.append(Problem("index", rel, f"episodes end at token {ends[-1]}, not at the end ({n_tokens})"))
        return problems
    return problems + _block_problems(root, split, packed, starts, ends, n_tokens)


def _block_problems(root: Path, split: str, packed: dict, starts, ends, n_tokens: int) -> list[Problem]:
    rel = f"{split}/blocks.idx"
    size = packed.get("block_size")
    blocks = _map(root / split / "blocks.idx", "<u8", 2).astype(np.int64)
    if not isinstance(size, int) or size < 1:
        return [Problem("metadata", METADATA, f"split {split!r}: packed block_size {size!r} is not a positive integer")]
    expected = np.arange(len(blocks), dtype=np.int64) * size
    bad = np.flatnonzero((blocks[:, 0] != expected) | (blocks[:, 1] != size))
    if len(bad):
        return [Problem("index", rel, f"block is not at {int(expected[bad[0]])} with {size} tokens", block=int(bad[0]))]
    if len(blocks) * size != n_tokens:
        return [Problem("index", rel, f"{len(blocks)} blocks of {size} do not cover the {n_tokens} tokens")]
    block_of = starts // size
    first_in_block = np.r_[True, block_of[1:] != block_of[:-1]]
    prev_end = np.r_[0, ends[:-1]]
    ok = ((ends - 1) // size == block_of) & np.where(first_in_block, starts == block_of * size, starts == prev_end)
    problems = []
    if not ok.all():
        e = int(np.flatnonzero(~ok)[0])
        problems.append(Problem(
            "index", f"{split}/episodes.idx", "episode is not whole inside its block, or not right after the "
            "episode before it in the block", episode=e, block=int(block_of[e]),
        ))
    empty = np.setdiff1d(np.arange(len(blocks)), block_of)
    if len(empty):
        problems.append(Problem("index", rel, "block holds no episode", block=int(empty[0])))
    return problems


def open_dataset(
    path: str | os.PathLike, split: str = "train", *, verify: bool = False
) -> "Dataset | PairDataset":
    """Open one split for reading; refuses a damaged split with a message naming the file.

    Always checks sizes against the metadata and the index bounds; ``verify`` also checks every sha256.
    In a pair dataset (metadata ``kind: pairs``) ``split`` names the pairs (``train``): a PairDataset over
    its ``train.chosen`` and ``train.rejected`` splits; each of those also opens alone as a Dataset.
    """
    root = Path(path)
    from lossmask.shards import ShardedDataset, is_shard_root

    if is_shard_root(root):
        return ShardedDataset(root, split, verify=verify)
    meta = read_metadata(root)
    if meta.get("kind") == PAIRS_KIND and split not in meta["splits"]:
        return _open_pairs(root, meta, split, verify)
    if split not in meta["splits"]:
        raise LossmaskError(f"{root} has no split {split!r} (it has: {', '.join(sorted(meta['splits']))})")
    problems = split_problems(root, meta, split, verify=verify)
    if problems:
        listed = "\n  ".join(str(p) for p in problems[:10])
        raise LossmaskError(
            f"{root}: split {split!r} is damaged:\n  {listed}\nrun `lossmask validate {root}` for details"
        )
    if verify:
        load_tokenizer_of(root)
    return Dataset(root, split, meta)


def pair_splits(metadata: dict) -> list[str]:
    """The pair splits of a pair dataset (``train``, ``val``): those whose two sides are both stored."""
    names = set(metadata["splits"])
    bases = {name.rsplit(".", 1)[0] for name in names if "." in name}
    return sorted(base for base in bases if all(f"{base}.{side}" in names for side in PAIR_SIDES))


def _open_pairs(root: Path, meta: dict, split: str, verify: bool) -> "PairDataset":
    if split not in pair_splits(meta):
        raise LossmaskError(
            f"{root} is a pair dataset with no pair split {split!r} (it has: {', '.join(pair_splits(meta)) or 'none'})"
        )
    chosen, rejected = (open_dataset(root, f"{split}.{side}", verify=verify) for side in PAIR_SIDES)
    if chosen.num_episodes != rejected.num_episodes or not np.array_equal(
        chosen.arrays["sources.idx"], rejected.arrays["sources.idx"]
    ):
        raise LossmaskError(
            f"{root}: {split}.chosen and {split}.rejected are not aligned (different counts or sources); "
            "the dataset is damaged, prepare it again"
        )
    return PairDataset(chosen, rejected)


class PairDataset(Sequence):
    """Preference pairs: item ``i`` is episode ``i`` of ``S.chosen`` with episode ``i`` of ``S.rejected``.

    Item: ``{"chosen": {...}, "rejected": {...}, "source": (file, line)}``, each side an unpacked item as
    ``Dataset`` yields it (``input_ids``, ``loss_mask``, ``labels``, ``source``, ``truncated``). The two sides
    share their prompt tokens exactly (checked at prepare time).
    """

    def __init__(self, chosen: "Dataset", rejected: "Dataset"):
        self.chosen = chosen
        self.rejected = rejected
        self.root = chosen.root
        self.split = chosen.split.rsplit(".", 1)[0]
        self.metadata = chosen.metadata

    @property
    def tokenizer_path(self) -> Path:
        return self.root / TOKENIZER_DIR

    def __len__(self) -> int:
        return self.chosen.num_episodes

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        chosen = self.chosen.episode(index)
        return {"chosen": chosen, "rejected": self.rejected.episode(index), "source": chosen["source"]}


def load_tokenizer_of(path: str | os.PathLike, trust_remote_code: bool = False):
    """The tokenizer stored with a dataset, refused unless it is the one that made the dataset's ids.

    A replaced tokenizer would otherwise train and save a model whose ids mean other text.
    """
    directory = Path(path) / TOKENIZER_DIR
    if not directory.is_dir():
        raise LossmaskError(f"{directory} is missing: the dataset has no stored tokenizer")
    tokenizer = load_tokenizer(str(directory), trust_remote_code=trust_remote_code)
    mismatches = identity_mismatches(tokenizer_identity(tokenizer), read_metadata(Path(path))["tokenizer"])
    if mismatches:
        raise LossmaskError(
            f"{directory}: the stored tokenizer was replaced or changed ({'; '.join(mismatches)}); "
            "restore it or prepare the dataset again with the tokenizer you want"
        )
    return tokenizer


class Dataset(Sequence):
    """One split as a sequence of items (episodes, or blocks when packed), read from memory maps.

    Unpacked item: ``input_ids`` (uint32), ``loss_mask`` (float32 weights, 0 = no loss), ``labels``
    (uint8), ``source`` (file, line), ``truncated``. Packed item: ``input_ids``, ``loss_mask``,
    ``labels``, ``segment_ids`` (int32, 1..n per episode, 0 = padding), ``position_ids`` (int64,
    restarting at 0 per episode; padding continues the run before it) and ``sources``.
    Pickles without its maps (they are reopened), so DataLoader workers do not copy the data.
    """

    def __init__(self, root: Path, split: str, metadata: dict):
        self.root = Path(root)
        self.split = split
        self.metadata = metadata
        self.entry = metadata["splits"][split]
        self.packed = "packed" in self.entry
        self.block_size: int | None = self.entry["packed"]["block_size"] if self.packed else None
        self._names = input_names(metadata)
        self._arrays: dict[str, np.ndarray] | None = None
        self._starts: np.ndarray | None = None

    @property
    def tokenizer_path(self) -> Path:
        return self.root / TOKENIZER_DIR

    @property
    def arrays(self) -> dict[str, np.ndarray]:
        """The split's memory maps by file name (weights.bin only when stored)."""
        if self._arrays is None:
            self._arrays = {
                name: _map(self.root / self.split / name, dtype, width)
                for name, (dtype, width) in split_files(self.entry).items()
            }
        return self._arrays

    @property
    def episode_starts(self) -> np.ndarray:
        """Token offset of every episode, in memory (searched to find the episodes of a block)."""
        if self._starts is None:
            self._starts = np.ascontiguousarray(self.arrays["episodes.idx"][:, 0], dtype=np.int64)
        return self._starts

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_arrays": None, "_starts": None}

    @property
    def num_episodes(self) -> int:
        return int(self.entry["episodes"])

    @property
    def episode_lengths(self) -> np.ndarray:
        return np.asarray(self.arrays["episodes.idx"][:, 1], dtype=np.int64)

    def __len__(self) -> int:
        return int(self.entry["packed"]["blocks"] if self.packed else self.entry["episodes"])

    def _loss_mask(self, start: int, end: int) -> np.ndarray:
        weights = self.arrays.get("weights.bin")
        if weights is not None:
            return np.asarray(weights[start:end], dtype=np.float32)
        return self.arrays["mask.bin"][start:end].astype(np.float32)

    def _source(self, episode: int) -> tuple[str, int]:
        file_index, line = self.arrays["sources.idx"][episode]
        return self._names[int(file_index)], int(line)

    def episode(self, index: int) -> dict[str, Any]:
        """One episode as an unpacked item, also in a packed split."""
        i = _position(index, self.num_episodes)
        start, length = (int(v) for v in self.arrays["episodes.idx"][i])
        return {
            "input_ids": self.arrays["tokens.bin"][start : start + length],
            "loss_mask": self._loss_mask(start, start + length),
            "labels": self.arrays["labels.bin"][start : start + length],
            "source": self._source(i),
            "truncated": bool(self.arrays["flags.bin"][i] & TRUNCATED),
        }

    def block(self, index: int) -> dict[str, Any]:
        i = _position(index, len(self))
        start, length = (int(v) for v in self.arrays["blocks.idx"][i])
        first, last = np.searchsorted(self.episode_starts, [start, start + length], side="left")
        segments = self.arrays["segments.bin"][start : start + length].astype(np.int32)
        return {
            "input_ids": self.arrays["tokens.bin"][start : start + length],
            "loss_mask": self._loss_mask(start, start + length),
            "labels": self.arrays["labels.bin"][start : start + length],
            "segment_ids": segments,
            "position_ids": position_ids_from_segments(segments),
            "sources": [self._source(e) for e in range(int(first), int(last))],
        }

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        return self.block(index) if self.packed else self.episode(index)


def _position(index, length: int) -> int:
    i = operator.index(index)
    if i < 0:
        i += length
    if not 0 <= i < length:
        raise IndexError(f"index {index} out of range for {length} items")
    return i
