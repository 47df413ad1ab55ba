"""lossmask: exact loss masks for supervised fine-tuning and preference tuning of causal LMs.

The public API. Names are imported on first use, so ``import lossmask`` stays cheap (reading a dataset
does not load transformers or torch).
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

_API = {
    # episodes and errors
    "Conversation": "lossmask.episode", "Message": "lossmask.episode", "TextPair": "lossmask.episode",
    "MarkedText": "lossmask.episode", "Replay": "lossmask.episode", "Source": "lossmask.episode",
    "LossmaskError": "lossmask.errors", "InputProblem": "lossmask.errors",
    # sources → render → mask
    "read_episodes": "lossmask.sources", "parse_record": "lossmask.sources",
    "RenderOptions": "lossmask.render", "make_renderer": "lossmask.render",
    "Label": "lossmask.render.base", "Span": "lossmask.render.base", "Rendered": "lossmask.render.base",
    "Masker": "lossmask.mask", "MaskOptions": "lossmask.mask", "Example": "lossmask.example",
    "load_tokenizer": "lossmask.tokenizer", "TokenizerInfo": "lossmask.tokenizer",
    # prepare → store → validate
    "prepare": "lossmask.prepare", "PrepareOptions": "lossmask.prepare",
    "open_dataset": "lossmask.store", "DatasetWriter": "lossmask.store",
    "validate_dataset": "lossmask.validate",
    "pack_dataset": "lossmask.pack", "merge_shards": "lossmask.shards",
    # training, preference tuning, evaluation
    "run_training": "lossmask.train", "TrainArgs": "lossmask.train", "load_config": "lossmask.train",
    "run_dpo": "lossmask.train", "DPOArgs": "lossmask.train",
    "prepare_pairs": "lossmask.pairs", "build_negatives": "lossmask.negatives", "build_pairs": "lossmask.negatives",
    "compare_models": "lossmask.compare", "run_gate": "lossmask.gate", "run_demo": "lossmask.demo",
}

__all__ = ["__version__", *_API]


def __getattr__(name: str):
    module = _API.get(name)
    if module is None:
        raise AttributeError(f"module 'lossmask' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
