"""A small byte-level BPE tokenizer trained on the project's own data, for models trained from scratch.

The embedded demo has no network, so it cannot fetch a tokenizer: it trains one in about a second on
the text it generated. Choices:

- Byte-level BPE (GPT-2 style pre-tokenization, no normalizer): every string, umlauts and emoji
  included, encodes and decodes back exactly, and character offsets stay exact for the mask.
- Special tokens: ``<myPT_pad>`` (id 0, the pad token), then the 19 myPT tags added by
  ``add_mypt_tokens``, which also pads the vocabulary with filler tokens to a multiple of 64.
  ``len(tokenizer)`` is at most ``vocab_size`` rounded up to 64: the BPE gets what remains after the
  special tokens, and a corpus too small to fill it leaves a smaller, still 64-aligned vocabulary.
- EOS is ``<myPT_eot>``, the token that ends an assistant turn. No BOS: the myPT format starts every
  episode with a tag, so a BOS token would carry no information (``TokenizerInfo.bos`` is None).
- Special tokens and tags that occur in the training text are cut out before training, so rendered
  episodes can be passed as they are without teaching merges of tag fragments.
- Deterministic: the same texts give a byte-identical ``tokenizer.json``. The BPE trainer has no
  randomness; its alphabet is sorted and ties between merges break on token ids. Only trainers with a
  continuing-subword prefix (WordPiece style) assign ids in hash order (huggingface/tokenizers#1794),
  and byte-level BPE has none.
"""
from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from lossmask.atomic import save_tokenizer
from lossmask.errors import LossmaskError
from lossmask.mypt_tokens import MYPT_TOKENS, PAD_TEMPLATE, add_mypt_tokens

PAD_TOKEN = "<myPT_pad>"
EOS_TOKEN = "<myPT_eot>"
MIN_VOCAB_SIZE = 320  # 256 byte symbols + the special tokens + room for merges

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

_FILLER = r"\d+".join(map(re.escape, PAD_TEMPLATE.split("{}")))
_SPECIAL = re.compile("|".join([*(re.escape(t) for t in (PAD_TOKEN, *MYPT_TOKENS)), _FILLER]))


def build_tiny_tokenizer(texts: Iterable[str], out_dir: str | Path, vocab_size: int = 2048) -> PreTrainedTokenizerFast:
    """Train the tokenizer on ``texts``, save it to ``out_dir`` atomically, and return it.

    ``out_dir`` is replaced when it exists (it is the caller's build directory).
    ``AutoTokenizer.from_pretrained(out_dir)`` loads the result.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < MIN_VOCAB_SIZE:
        raise LossmaskError(f"vocab_size must be an integer >= {MIN_VOCAB_SIZE}, got {vocab_size!r}")
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(MYPT_TOKENS),
        special_tokens=[PAD_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(_without_special(texts), trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token=PAD_TOKEN, clean_up_tokenization_spaces=False
    )
    add_mypt_tokens(tokenizer)
    tokenizer.eos_token = EOS_TOKEN
    save_tokenizer(tokenizer, out_dir)
    return tokenizer


def _without_special(texts: Iterable[str]) -> Iterator[str]:
    for text in texts:
        if not isinstance(text, str):
            raise LossmaskError(f"tokenizer training text must be str, got {type(text).__name__}")
        yield from (piece for piece in _SPECIAL.split(text) if piece)
