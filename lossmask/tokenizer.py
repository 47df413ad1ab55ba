"""Loading tokenizers (local directory or hub id) and the facts about them the renderers need."""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from lossmask.errors import LossmaskError


@dataclass(frozen=True)
class TokenizerInfo:
    """What renderers and checks need to know about a tokenizer, without holding the tokenizer.

    ``bos`` is set only when the tokenizer puts BOS in front of plain text by default, so text formats
    write it once themselves (text is always tokenized with ``add_special_tokens=False``).
    """

    bos: str | None
    eos: str | None
    special_tokens: tuple[str, ...]  # every added token marked special: must not appear in content
    added_tokens: tuple[str, ...]  # every added token, special or not

    @classmethod
    def of(cls, tokenizer) -> "TokenizerInfo":
        backend = tokenizer.backend_tokenizer
        added = backend.get_added_tokens_decoder()
        special = tuple(sorted({t.content for t in added.values() if t.special}))
        every = tuple(sorted({t.content for t in added.values()}))
        bos = tokenizer.bos_token
        adds_bos = False
        if bos is not None and tokenizer.bos_token_id is not None:
            ids = tokenizer("a", add_special_tokens=True)["input_ids"]
            adds_bos = bool(ids) and ids[0] == tokenizer.bos_token_id
        return cls(bos=bos if adds_bos else None, eos=tokenizer.eos_token, special_tokens=special, added_tokens=every)


def load_tokenizer(name_or_path: str, trust_remote_code: bool = False):
    """Load a fast tokenizer from a local directory or a hub id (where a hub is reachable).

    Only fast (Rust) tokenizers are accepted: the mask needs exact character offsets.
    """
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    except Exception as exc:  # transformers raises many types; the user needs one clear message
        where = "directory" if Path(name_or_path).exists() else "hub id"
        raise LossmaskError(
            f"could not load tokenizer {name_or_path!r} ({where}): {exc}. "
            "Pass a local directory with tokenizer.json, or a hub id where a hub is reachable."
        ) from exc
    if not getattr(tok, "is_fast", False):
        raise LossmaskError(
            f"tokenizer {name_or_path!r} is not a fast tokenizer; lossmask needs exact character offsets, "
            "which only `tokenizers` (tokenizer.json) provides"
        )
    return tok


def exact_backend(tokenizer):
    """The Rust tokenizer that encodes text exactly as it is: no padding, no truncation.

    Used as it is when it already is (no copy: copying a 262k-token tokenizer costs seconds and
    hundreds of MB); copied with both switched off otherwise, leaving the caller's tokenizer untouched.
    """
    from tokenizers import Tokenizer

    if isinstance(tokenizer, Tokenizer):
        backend = tokenizer
    else:
        backend = tokenizer.backend_tokenizer
    if backend.padding is None and backend.truncation is None:
        return backend
    backend = Tokenizer.from_str(backend.to_str())
    backend.no_padding()
    backend.no_truncation()
    return backend


IDENTITY_KEYS = ("tokenizer_sha256", "chat_template_sha256", "vocab_size")
SPECIAL_KEYS = ("bos_token", "eos_token", "pad_token")


def identity_mismatches(found: dict, expected: dict) -> list[str]:
    """Why a tokenizer is not the one that made a dataset's ids, one line a key; empty when it is.

    Special tokens are compared only once vocabulary, merges and template agree: otherwise they are noise.
    """
    differ = [key for key in IDENTITY_KEYS if found.get(key) != expected.get(key)]
    return [
        f"{key} is {found.get(key)!r} but the token ids were made by a tokenizer with {expected.get(key)!r}"
        for key in differ or [key for key in SPECIAL_KEYS if found.get(key) != expected.get(key)]
    ]


def tokenizer_identity(tokenizer) -> dict:
    """A stable fingerprint of everything that changes token ids: vocabulary, merges, added tokens, template."""
    backend_json = tokenizer.backend_tokenizer.to_str()
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):
        template = json.dumps(template, sort_keys=True)
    return {
        "name_or_path": str(tokenizer.name_or_path),
        "class": type(tokenizer).__name__,
        "vocab_size": len(tokenizer),
        "tokenizer_sha256": hashlib.sha256(backend_json.encode("utf-8")).hexdigest(),
        "chat_template_sha256": hashlib.sha256(template.encode("utf-8")).hexdigest() if template else None,
        "bos_token": tokenizer.bos_token,
        "eos_token": tokenizer.eos_token,
        "pad_token": tokenizer.pad_token,
    }
