"""Quick generation from a trained checkpoint (full model or LoRA adapter), to eyeball what training did."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from lossmask.errors import LossmaskError
from lossmask.train.lora import is_adapter_dir, load_adapter_model, run_info


def load_for_inference(model_dir: str | Path) -> tuple[torch.nn.Module, Any]:
    """(model in eval mode, tokenizer) from a checkpoint directory; adapters are loaded onto their base."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file() and not is_adapter_dir(model_dir):
        raise LossmaskError(f"{model_dir} is not a model checkpoint (no config.json or adapter_config.json)")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    except Exception as exc:  # transformers raises many kinds
        raise LossmaskError(f"{model_dir} has no loadable tokenizer: {exc}") from exc
    model = (
        load_adapter_model(model_dir)
        if is_adapter_dir(model_dir)
        else AutoModelForCausalLM.from_pretrained(str(model_dir))
    )
    if torch.cuda.is_available():
        model = model.to("cuda")
    return model.eval(), tokenizer


def prompt_ids(tokenizer: Any, prompt: str | Sequence[dict[str, Any]]) -> list[int]:
    """A string is used verbatim, as the renderers write training text (BOS included where the format has
    one); a message list goes through the tokenizer's chat template with the generation prompt."""
    if isinstance(prompt, str):
        text = prompt
    else:
        if not getattr(tokenizer, "chat_template", None):
            raise LossmaskError("this tokenizer has no chat template: pass the prompt as text in the trained format")
        text = tokenizer.apply_chat_template(list(prompt), add_generation_prompt=True, tokenize=False)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


class StopOnText(StoppingCriteria):
    """Stops once the decoded continuation contains a stop string. Works for any tokenizer (transformers'
    own ``stop_strings`` needs one whose tokens map back to byte strings)."""

    def __init__(self, tokenizer: Any, stops: list[str], prompt_length: int):
        self.tokenizer, self.stops, self.prompt_length = tokenizer, stops, prompt_length

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        done = [
            any(
                s in self.tokenizer.decode(row[self.prompt_length :].tolist(), skip_special_tokens=False)
                for s in self.stops
            )
            for row in input_ids
        ]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


def generate(
    model_dir: str | Path,
    prompt: str | Sequence[dict[str, Any]],
    max_new_tokens: int = 128,
    stop_strings: Sequence[str] | None = None,
    temperature: float = 0.0,
) -> str:
    """The continuation of ``prompt``, cut before the first stop string (greedy unless ``temperature`` > 0).

    Stops on EOS and on ``stop_strings``; without them, on the ``stop_strings`` recorded in the training
    data's metadata (the renderer's), when the checkpoint has them.
    """
    model, tokenizer = load_for_inference(model_dir)
    if stop_strings is None:
        stop_strings = run_info(model_dir).get("dataset_metadata", {}).get("stop_strings") or []
    stops = [s for s in stop_strings if s]
    ids = torch.tensor([prompt_ids(tokenizer, prompt)], device=next(model.parameters()).device)
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    eos += [tokenizer.convert_tokens_to_ids(s) for s in stops if s in tokenizer.get_vocab()]
    kwargs: dict[str, Any] = {"do_sample": temperature > 0, "max_new_tokens": max_new_tokens}
    if temperature > 0:
        kwargs["temperature"] = temperature
    if stops:
        kwargs["stopping_criteria"] = StoppingCriteriaList([StopOnText(tokenizer, stops, ids.shape[1])])
    with torch.no_grad():
        output = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            eos_token_id=sorted(set(eos)) or None,
            pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos[0] if eos else 0),
            **kwargs,
        )
    text = tokenizer.decode(output[0, ids.shape[1] :].tolist(), skip_special_tokens=False)
    if tokenizer.eos_token:
        text = text.split(tokenizer.eos_token)[0]
    for stop in stops:
        text = text.split(stop)[0]
    return text
