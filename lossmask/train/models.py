"""Which model to train: a preset built from scratch, a local HF directory or a hub id.

Presets are Llama-architecture (SwiGLU, RMSNorm, RoPE θ=10000, tied embeddings):

- ``tiny``: 128 hidden, 4 layers, 4 heads, SwiGLU 384: trains on a CPU in minutes.
- ``mypt-750m``: 1280 hidden, 20 heads (head dim 64), 32 layers, SwiGLU 3456 (= 4·1280·2/3 rounded up to
  a multiple of 64), ≈0.70 B parameters with a 50304 vocabulary.

A preset's vocabulary is ``len(tokenizer)`` rounded up to a multiple of 64 (50304 for the GPT-2 style
tokenizer of mypt), unless the config sets ``vocab_size``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lossmask.errors import LossmaskError
from lossmask.train.config import TrainConfig

ARCH_FIELDS = (
    "hidden_size",
    "num_layers",
    "num_heads",
    "num_kv_heads",
    "intermediate_size",
    "vocab_size",
    "rope_theta",
    "tie_embeddings",
    "dropout",
)


@dataclass(frozen=True)
class Preset:
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    num_kv_heads: int | None = None
    rope_theta: float = 10000.0
    tie_embeddings: bool = True
    dropout: float = 0.0


PRESETS: dict[str, Preset] = {
    "tiny": Preset(hidden_size=128, num_layers=4, num_heads=4, intermediate_size=384),
    "mypt-750m": Preset(hidden_size=1280, num_layers=32, num_heads=20, intermediate_size=3456),
}


def round_up(n: int, multiple: int = 64) -> int:
    return -(-n // multiple) * multiple


def torch_dtype(name: str) -> torch.dtype:
    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[name]


def preset_config(name: str, config: TrainConfig, tokenizer: Any | None, **extra: Any):
    """A LlamaConfig for a preset with the config's architecture overrides and RoPE scaling applied."""
    from transformers import LlamaConfig

    preset = PRESETS[name]

    def pick(field: str):
        value = getattr(config, field)
        return getattr(preset, field) if value is None else value

    vocab = config.vocab_size
    if vocab is None:
        if tokenizer is None:
            raise LossmaskError(
                f"preset {name!r} needs a tokenizer for its vocabulary size, or vocab_size in the config"
            )
        vocab = round_up(len(tokenizer))
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": float(pick("rope_theta"))}
    if config.rope_scale is not None:
        rope = {"rope_type": "linear", "factor": float(config.rope_scale), "rope_theta": rope["rope_theta"]}
    dropout = float(pick("dropout"))
    return LlamaConfig(
        vocab_size=vocab,
        hidden_size=pick("hidden_size"),
        intermediate_size=pick("intermediate_size"),
        num_hidden_layers=pick("num_layers"),
        num_attention_heads=pick("num_heads"),
        num_key_value_heads=pick("num_kv_heads"),
        max_position_embeddings=config.block_size,
        rms_norm_eps=1e-5,
        tie_word_embeddings=bool(pick("tie_embeddings")),
        attention_dropout=dropout,
        rope_parameters=rope,
        bos_token_id=getattr(tokenizer, "bos_token_id", None),
        eos_token_id=getattr(tokenizer, "eos_token_id", None),
        pad_token_id=getattr(tokenizer, "pad_token_id", None),
        **extra,
    )


def apply_rope_scale(model_config: Any, factor: float, block_size: int) -> None:
    """Linear RoPE scaling (position interpolation) on a Llama-style config, in place.

    ``factor`` is absolute: a checkpoint already trained with factor 2 and now set to 4 gets 4. Only plain
    (``default``) or ``linear`` RoPE can be rescaled this way; other types have their own parameters.
    """
    params = getattr(model_config, "rope_parameters", None)
    if not isinstance(params, dict) or "rope_theta" not in params:
        raise LossmaskError(
            f"rope_scale needs a model with rotary position embeddings (rope_parameters); "
            f"{type(model_config).__name__} has none"
        )
    kind = params.get("rope_type", "default")
    if kind not in ("default", "linear"):
        raise LossmaskError(f"rope_scale rescales default or linear RoPE; this model uses rope_type {kind!r}")
    model_config.rope_parameters = {"rope_type": "linear", "factor": float(factor), "rope_theta": params["rope_theta"]}
    model_config.max_position_embeddings = max(
        int(getattr(model_config, "max_position_embeddings", 0) or 0), block_size
    )


def is_preset(name: str) -> bool:
    return name in PRESETS


def build_model(
    source: str,
    config: TrainConfig,
    tokenizer: Any | None = None,
    *,
    quantization_config: Any | None = None,
    check_arch_fields: bool = True,
):
    """The model to train, in ``config.param_dtype``.

    ``source`` is a preset name, a local model directory or a hub id. Architecture fields in the config
    only apply to presets; set on a pretrained model they are an error (they would be silently ignored).
    """
    dtype = torch_dtype(config.param_dtype)
    attn = {"attn_implementation": config.attn_implementation} if config.attn_implementation else {}
    if is_preset(source):
        from transformers import LlamaForCausalLM

        model_config = preset_config(source, config, tokenizer, **attn)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            model = LlamaForCausalLM(model_config)
        return model.to(dtype)
    set_arch = [f for f in ARCH_FIELDS if getattr(config, f) is not None]
    if check_arch_fields and set_arch:
        raise LossmaskError(
            f"config sets {', '.join(set_arch)}, which only apply to presets ({', '.join(PRESETS)}); "
            f"{source!r} is a pretrained model: remove them"
        )
    from transformers import AutoConfig, AutoModelForCausalLM

    where = "directory" if Path(source).exists() else "hub id"
    try:
        model_config = AutoConfig.from_pretrained(source)
    except Exception as exc:  # transformers raises many kinds; the user needs the one message
        raise LossmaskError(
            f"could not load model {source!r} ({where}): {exc}. MODEL is a preset ({', '.join(PRESETS)}), "
            "a local model directory with config.json, or a hub id where a hub is reachable"
        ) from exc
    if config.rope_scale is not None:
        apply_rope_scale(model_config, config.rope_scale, config.block_size)
    kwargs: dict[str, Any] = {"config": model_config, "dtype": dtype, **attn}
    if quantization_config is not None:
        kwargs["quantization_config"] = quantization_config
    try:
        model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    except Exception as exc:
        raise LossmaskError(f"could not load model weights from {source!r} ({where}): {exc}") from exc
    return model


def fit_vocabulary(model: torch.nn.Module, tokenizer: Any | None, resizable: bool = True) -> int | None:
    """Grow the embeddings when the tokenizer has more tokens than the model (added special tokens).

    Returns the new size, or None when nothing changed. Growing needs trainable embeddings (not LoRA).
    """
    if tokenizer is None:
        return None
    rows = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) <= rows:
        return None
    if not resizable:
        raise LossmaskError(
            f"the tokenizer has {len(tokenizer)} tokens but the model's embedding has {rows} rows; "
            "LoRA cannot grow the embeddings: train fully, or use a model whose vocabulary covers the tokenizer"
        )
    new = round_up(len(tokenizer))
    model.resize_token_embeddings(new)
    return new
