"""Batched greedy generation for the gates: the same call for every phase, so results compare across phases.

Prompts are sorted by length and generated in batches with left padding (every row's last prompt token sits
where generation continues), in eval mode and without gradients; the model's mode is restored afterwards.
Generation stops at ``<myPT_eot>``; with ``stop_after_toolcall`` a row also stops at ``</myPT_assistant>``
right after ``</myPT_toolcall>``, where the runtime stops to run the tool.
"""
from __future__ import annotations

from lossmask.errors import LossmaskError

OPEN = "<myPT_assistant>"
CLOSE = "</myPT_assistant>"
EOT = "<myPT_eot>"
TOOLCALL_CLOSE = "</myPT_toolcall>"


def tag_ids(tokenizer, tags: tuple[str, ...] = (CLOSE, EOT)) -> dict[str, int]:
    """The single token id of each myPT tag; a tokenizer without them is an error saying how to add them."""
    ids = {}
    for tag in tags:
        encoded = tokenizer.encode(tag, add_special_tokens=False)
        if len(encoded) != 1:
            raise LossmaskError(
                f"tokenizer has no single token for {tag}; add the myPT tokens first (lossmask add-tokens)"
            )
        ids[tag] = encoded[0]
    return ids


def pad_id(tokenizer) -> int:
    """The tokenizer's pad id, or ``<myPT_eot>`` when it has none (generation pads finished rows with it)."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tag_ids(tokenizer, (EOT,))[EOT]


def special_ids(tokenizer) -> set[int]:
    """Ids of every special added token (the myPT tags, pad, EOS, ...)."""
    return {int(i) for i, t in tokenizer.backend_tokenizer.get_added_tokens_decoder().items() if t.special}


def special_strings(tokenizer) -> set[str]:
    """The text of every special added token: what a decoded generation may hold besides plain text."""
    return {t.content for t in tokenizer.backend_tokenizer.get_added_tokens_decoder().values() if t.special}


def generate_greedy(
    model,
    encoded: list[list[int]],
    eot_id: int,
    pad: int,
    max_new_tokens: int,
    batch_size: int,
    stop_after: tuple[int, int] | None = None,
) -> list[list[int]]:
    """Greedy new tokens per prompt, in prompt order (see the module docstring).

    ``stop_after`` = (``</myPT_toolcall>`` id, ``</myPT_assistant>`` id) also stops a row at that pair.
    Rows that stopped early are right-padded with ``pad`` up to the batch's longest row.
    """
    import torch

    generated: list[list[int]] = [[] for _ in encoded]
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    device = getattr(model, "device", torch.device("cpu"))
    extra = {"stopping_criteria": _stop_after_pair(*stop_after)} if stop_after else {}
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for start in range(0, len(order), batch_size):
                batch = order[start : start + batch_size]
                input_ids, attention = left_pad([encoded[i] for i in batch], pad, device)
                out = model.generate(
                    input_ids=input_ids,
                    attention_mask=attention,
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                    eos_token_id=eot_id,
                    pad_token_id=pad,
                    **extra,
                )
                for row, i in enumerate(batch):
                    generated[i] = out[row, input_ids.shape[1] :].tolist()
    finally:
        model.train(was_training)
    return generated


def _stop_after_pair(first: int, second: int):
    """A stopping criterion: a row is done once its last two tokens are ``first, second``."""
    from transformers import StoppingCriteria, StoppingCriteriaList

    class _Pair(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            if input_ids.shape[1] < 2:
                return input_ids.new_zeros(input_ids.shape[0], dtype=bool)
            return (input_ids[:, -2] == first) & (input_ids[:, -1] == second)

    return StoppingCriteriaList([_Pair()])


def left_pad(rows: list[list[int]], pad: int, device):
    """Left padding, so every row's last prompt token sits at the end where generation continues."""
    import torch

    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
    attention = torch.zeros((len(rows), width), dtype=torch.long)
    for k, r in enumerate(rows):
        if r:
            input_ids[k, width - len(r) :] = torch.tensor(r, dtype=torch.long)
            attention[k, width - len(r) :] = 1
    return input_ids.to(device), attention.to(device)


def strip_padding(new: list[int], pad: int, eot_id: int) -> list[int]:
    """A generation without the batch's right padding (padding that is also ``<myPT_eot>`` is kept)."""
    end = len(new)
    while end and new[end - 1] == pad != eot_id:
        end -= 1
    return new[:end]
