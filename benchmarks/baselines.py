"""The contenders, each set up once and then timed on the same conversations.

- ``LossmaskCore``: lossmask's in-memory path, ``ChatTemplateRenderer.render`` + ``Masker.mask`` in
  chunks of 256 episodes (what one ``prepare`` worker does, without reading JSONL or writing the store).
- ``floor``: the least any template-based preparation must do: render every conversation with the
  tokenizer's template, then one batched tokenization with offsets. It produces no mask at all.
- ``TrlPreparer``: TRL's ``SFTTrainer._prepare_dataset`` with ``assistant_only_loss=True`` (apply the
  chat template, tokenize, build the assistant mask, build labels), called directly on an SFTTrainer
  built around a tiny random Llama (no download, no training).

TRL needs ``{% generation %}`` markers, which no shipped template has: ``get_training_chat_template``
swaps in a patched copy, but only for templates it knows byte for byte. When it refuses the tokenizer's
own template and stores a template of that model family (Qwen3: the cached tokenizer ships an older
revision of the Qwen3 template than TRL's copy), we give the tokenizer TRL's stored original, so TRL
trains with its patched version of it; ``TrlPreparer.template_note`` says which case applied.
"""
from __future__ import annotations

import logging
import tempfile
import warnings
from collections.abc import Sequence
from typing import Any

# Families whose original template TRL stores (trl.chat_template_utils.<family>_chat_template).
TRL_FAMILY = {"llama3_1": "llama3", "qwen3": "qwen3", "gemma3": "gemma3"}


class LossmaskCore:
    """Renderer and masker built once (as in a prepare worker); ``run`` renders and masks every episode."""

    def __init__(self, tokenizer, history: str = "auto", chunk: int = 256):
        from lossmask.mask import Masker
        from lossmask.render import RenderOptions, make_renderer
        from lossmask.tokenizer import TokenizerInfo

        self.renderer = make_renderer(tokenizer, TokenizerInfo.of(tokenizer), RenderOptions(history=history))
        self.masker = Masker(tokenizer)
        self.chunk = chunk

    def run(self, episodes: Sequence) -> list[list]:
        """Per episode, its examples (several when the history policy splits it). Raises on a rejected one."""
        owners: list[int] = []
        rendered = []
        for i, episode in enumerate(episodes):
            for r in self.renderer.render(episode):
                owners.append(i)
                rendered.append(r)
        out: list[list] = [[] for _ in episodes]
        for lo in range(0, len(rendered), self.chunk):
            for owner, example in zip(owners[lo:lo + self.chunk], self.masker.mask(rendered[lo:lo + self.chunk])):
                if isinstance(example, Exception):
                    raise example
                out[owner].append(example)
        return out


def floor(tokenizer, message_lists: Sequence[list[dict]]) -> dict[str, list]:
    """Render each conversation with the tokenizer's template, then tokenize them all in one batch."""
    texts = [tokenizer.apply_chat_template(m, tokenize=False) for m in message_lists]
    return tokenizer(texts, return_offsets_mapping=True, add_special_tokens=False)


class TrlPreparer:
    """TRL's SFT dataset preparation with assistant-only loss, on a given tokenizer (modified in place)."""

    def __init__(self, tokenizer, family: str | None, num_proc: int | None = None):
        import datasets
        import transformers
        from trl import SFTConfig, SFTTrainer
        from trl import chat_template_utils as ctu

        datasets.disable_progress_bars()
        datasets.logging.set_verbosity_error()
        transformers.logging.set_verbosity_error()
        logging.getLogger("trl").setLevel(logging.ERROR)
        self.tokenizer = tokenizer
        try:
            ctu.get_training_chat_template(tokenizer)
            self.template_note = "its training variant of the tokenizer's own template"
            self.own_template = True
        except ValueError:
            stored = getattr(ctu, f"{family}_chat_template", None) if family else None
            if stored is None:
                raise
            tokenizer.chat_template = stored
            self.template_note = (
                f"the training variant of its stored {family} template: it refuses the tokenizer's own "
                "template (not byte-identical to any template it knows)"
            )
            self.own_template = False
        self._tmp = tempfile.TemporaryDirectory(prefix="lossmask-bench-trl-")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            args = SFTConfig(
                output_dir=self._tmp.name, assistant_only_loss=True, dataset_num_proc=num_proc, max_length=None,
                report_to="none", use_cpu=True, bf16=False, save_strategy="no", logging_strategy="no",
            )
            self.trainer = SFTTrainer(
                model=_tiny_model(tokenizer), args=args, processing_class=tokenizer,
                train_dataset=datasets.Dataset.from_list([{"messages": _probe_messages()}]),
            )
        self.args = args

    @staticmethod
    def dataset(message_lists: Sequence[list[dict]]):
        import datasets

        return datasets.Dataset.from_dict({"messages": list(message_lists)})

    def run(self, dataset) -> Any:
        """``_prepare_dataset`` as SFTTrainer calls it for the train split (no packing)."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return self.trainer._prepare_dataset(dataset, self.tokenizer, self.args, False, None, "train")

    def close(self) -> None:
        self._tmp.cleanup()


def _probe_messages() -> list[dict]:
    return [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]


def _tiny_model(tokenizer):
    """A one-layer random Llama with the tokenizer's vocabulary: SFTTrainer needs a model to exist."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return LlamaForCausalLM(config)
