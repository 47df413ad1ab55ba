"""The myPT tag tokens: adding them to a tokenizer so every tag is exactly one special token.

Tags are added as special tokens (never split, never normalized, dropped by
``decode(skip_special_tokens=True)``). The vocabulary is then padded with filler special tokens
``<myPT_pad_N>`` up to a multiple of ``pad_to_multiple`` (64 by default), because embedding matrices
sized to a multiple of 64 run faster on GPUs and the model's embeddings are resized to ``len(tokenizer)``.
Example: GPT-2 has 50257 tokens; + 19 tags = 50276; + 28 pads = 50304.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tokenizers import AddedToken

from lossmask.atomic import save_tokenizer
from lossmask.errors import LossmaskError
from lossmask.tokenizer import load_tokenizer

MYPT_TOKENS: tuple[str, ...] = (
    "<myPT_system>",
    "</myPT_system>",
    "<myPT_user>",
    "</myPT_user>",
    "<myPT_user_context>",
    "</myPT_user_context>",
    "<myPT_assistant>",
    "</myPT_assistant>",
    "<myPT_assistant_context>",
    "</myPT_assistant_context>",
    "<myPT_think>",
    "</myPT_think>",
    "<myPT_cite>",
    "</myPT_cite>",
    "<myPT_toolcall>",
    "</myPT_toolcall>",
    "<myPT_toolresult>",
    "</myPT_toolresult>",
    "<myPT_eot>",
)

PAD_TEMPLATE = "<myPT_pad_{}>"


def _special(content: str) -> AddedToken:
    return AddedToken(content, special=True, normalized=False, lstrip=False, rstrip=False, single_word=False)


def add_mypt_tokens(tokenizer, pad_to_multiple: int = 64) -> int:
    """Add the 19 myPT tags as special tokens and pad the vocabulary; return the new ``len(tokenizer)``.

    Idempotent: tags already present are not added again, and no pads are added when the size is
    already a multiple. Works on any HF fast tokenizer (mutates it in place).
    """
    if pad_to_multiple < 1:
        raise LossmaskError(f"pad_to_multiple must be a positive integer, got {pad_to_multiple}")
    vocab = tokenizer.get_vocab()
    missing = [t for t in MYPT_TOKENS if t not in vocab]
    if missing:
        tokenizer.add_special_tokens(
            {"extra_special_tokens": [_special(t) for t in missing]}, replace_extra_special_tokens=False
        )
    short = -len(tokenizer) % pad_to_multiple
    if short:
        vocab = tokenizer.get_vocab()
        pads: list[str] = []
        index = 0
        while len(pads) < short:
            name = PAD_TEMPLATE.format(index)
            if name not in vocab:
                pads.append(name)
            index += 1
        tokenizer.add_tokens([_special(p) for p in pads], special_tokens=True)
    for tag in MYPT_TOKENS:
        ids = tokenizer.encode(tag, add_special_tokens=False)
        if len(ids) != 1:
            raise LossmaskError(f"tokenizer encodes the myPT tag {tag} as {len(ids)} tokens, expected exactly 1")
    return len(tokenizer)


@dataclass(frozen=True)
class AddTokensResult:
    """What ``add_tokens_cli`` did, for the CLI to report."""

    before: int  # len(tokenizer) before
    after: int  # len(tokenizer) after: resize the model's embeddings to this
    out_dir: Path


def add_tokens_cli(
    tokenizer_path: str, out_dir: str | Path, pad_to_multiple: int = 64, overwrite: bool = False
) -> AddTokensResult:
    """Load a tokenizer, add the myPT tokens, and save it to ``out_dir`` atomically (temp dir + rename).

    An existing non-empty ``out_dir`` is replaced only with ``overwrite``, so a typo cannot wipe a
    directory.
    """
    out = Path(out_dir)
    if out.exists() and not _is_empty_dir(out) and not overwrite:
        raise LossmaskError(
            f"output directory {out} already exists and is not empty; choose a new directory or pass --overwrite"
        )
    tokenizer = load_tokenizer(tokenizer_path)
    before = len(tokenizer)
    after = add_mypt_tokens(tokenizer, pad_to_multiple)
    save_tokenizer(tokenizer, out)
    return AddTokensResult(before=before, after=after, out_dir=out)


def _is_empty_dir(path: Path) -> bool:
    return path.is_dir() and not any(path.iterdir())
