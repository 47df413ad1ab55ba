"""LoRA adapters (via peft), quantized bases (via bitsandbytes, CUDA only) and folding an adapter back in."""

from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lossmask.errors import LossmaskError
from lossmask.train.checkpoint import RUN_INFO, atomic_directory, write_json
from lossmask.train.config import TrainConfig

_LORA_KEYS = ("r", "alpha", "dropout", "targets")


@dataclass(frozen=True)
class LoraSpec:
    r: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    targets: tuple[str, ...] = ("q_proj", "v_proj")

    def __str__(self) -> str:
        return f"r={self.r},alpha={self.alpha:g},dropout={self.dropout:g},targets={','.join(self.targets)}"


def parse_lora(spec: str) -> LoraSpec:
    """``"r=16,alpha=32,targets=q_proj,v_proj"`` → LoraSpec. Items without ``=`` continue the previous key's
    list (only ``targets`` takes a list); missing keys keep LoraSpec's defaults."""
    values: dict[str, list[str]] = {}
    key = None
    for item in (part.strip() for part in spec.split(",")):
        if not item:
            continue
        if "=" in item:
            key, _, value = item.partition("=")
            key = key.strip()
            if key not in _LORA_KEYS:
                raise LossmaskError(f"LoRA spec {spec!r}: unknown key {key!r}; valid keys: {', '.join(_LORA_KEYS)}")
            if key in values:
                raise LossmaskError(f"LoRA spec {spec!r}: {key} given twice")
            values[key] = [value.strip()]
        elif key == "targets":
            values[key].append(item)
        else:
            raise LossmaskError(f"LoRA spec {spec!r}: {item!r} is not key=value (only targets takes a comma list)")
    try:
        return LoraSpec(
            r=int(values["r"][0]) if "r" in values else LoraSpec.r,
            alpha=float(values["alpha"][0]) if "alpha" in values else LoraSpec.alpha,
            dropout=float(values["dropout"][0]) if "dropout" in values else LoraSpec.dropout,
            targets=tuple(t for t in values["targets"] if t) if "targets" in values else LoraSpec.targets,
        )
    except ValueError as exc:
        raise LossmaskError(f"LoRA spec {spec!r}: {exc} (r is an integer, alpha and dropout numbers)") from exc


def apply_lora(model: torch.nn.Module, spec: LoraSpec):
    """Wrap ``model`` in a peft LoRA model; only the adapter is trainable."""
    from peft import LoraConfig, get_peft_model

    names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    missing = [t for t in spec.targets if t not in names]
    if missing:
        raise LossmaskError(
            f"LoRA targets {', '.join(missing)} are not modules of this model; "
            f"its weight layers: {', '.join(_weight_layers(model))}"
        )
    lora_config = LoraConfig(
        r=spec.r,
        lora_alpha=spec.alpha,
        lora_dropout=spec.dropout,
        target_modules=list(spec.targets),
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, lora_config)


def _weight_layers(model: torch.nn.Module) -> list[str]:
    """Names of leaf modules with a weight matrix (Linear, GPT-2's Conv1D, ...): what LoRA can target."""
    names = set()
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if not list(module.children()) and isinstance(weight, torch.Tensor) and weight.ndim == 2:
            names.add(name.rsplit(".", 1)[-1])
    return sorted(names)


def quantization_config(kind: str | None):
    """A BitsAndBytesConfig for ``4bit``/``8bit``; a clear error where bitsandbytes or CUDA is missing."""
    if kind is None:
        return None
    if kind not in ("4bit", "8bit"):
        raise LossmaskError(f"quantize must be 4bit or 8bit, got {kind!r}")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise LossmaskError(f"{kind} quantization needs the bitsandbytes package (pip install bitsandbytes)")
    if not torch.cuda.is_available():
        raise LossmaskError(f"{kind} quantization needs a CUDA GPU; none is available here")
    from transformers import BitsAndBytesConfig

    if kind == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_compute_dtype=torch.bfloat16,
        bnb_4bit_use_double_quant=True,
    )


def is_adapter_dir(path: str | Path) -> bool:
    return (Path(path) / "adapter_config.json").is_file()


def run_info(directory: str | Path) -> dict[str, Any]:
    file = Path(directory) / RUN_INFO
    return json.loads(file.read_text(encoding="utf-8")) if file.is_file() else {}


def load_adapter_model(adapter_dir: str | Path, trainable: bool = False, config: TrainConfig | None = None):
    """Base model (rebuilt as it was trained: same source and RoPE scaling) with the adapter loaded."""
    from peft import PeftConfig, PeftModel

    from lossmask.train.models import build_model

    info = run_info(adapter_dir)
    base = info.get("base_model") or PeftConfig.from_pretrained(str(adapter_dir)).base_model_name_or_path
    if not base:
        raise LossmaskError(f"{adapter_dir}: the adapter does not name its base model")
    if config is None:
        config = TrainConfig(rope_scale=info.get("rope_scale"), param_dtype="float32")
    model = build_model(base, config, check_arch_fields=False)
    return PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=trainable)


def merge_adapter(adapter_dir: str | Path, out_dir: str | Path) -> Path:
    """Fold a LoRA adapter into its base; writes a plain HF model directory (with the tokenizer) atomically."""
    if not is_adapter_dir(adapter_dir):
        raise LossmaskError(f"{adapter_dir} is not a LoRA adapter directory (no adapter_config.json)")
    merged = load_adapter_model(adapter_dir).merge_and_unload()
    out_dir = Path(out_dir)
    with atomic_directory(out_dir) as tmp:
        merged.save_pretrained(tmp)
        if (Path(adapter_dir) / "tokenizer_config.json").is_file():
            from transformers import AutoTokenizer

            AutoTokenizer.from_pretrained(str(adapter_dir)).save_pretrained(tmp)
        info = run_info(adapter_dir)
        info["merged_from_adapter"] = str(adapter_dir)
        write_json(tmp / RUN_INFO, info)
    return out_dir
