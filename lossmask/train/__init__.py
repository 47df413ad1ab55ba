"""SFT and DPO training of causal LMs on lossmask datasets (HF models through accelerate).

The CLI calls ``run_training(TrainArgs(...))``; ``load_config`` reads the config file, ``merge_adapter``
folds a LoRA adapter into its base and ``generate`` gives a quick look at a checkpoint. Preference
tuning: ``run_dpo(DPOArgs(...))`` with ``load_dpo_config`` (dpo.py).
"""

from lossmask.train.args import TrainArgs, TrainResult
from lossmask.train.config import TrainConfig, config_from_dict, load_config, parse_overrides
from lossmask.train.dpo import DPOArgs, DPOConfig, DPOResult, dpo_config_from_dict, load_dpo_config, run_dpo
from lossmask.train.generate import generate
from lossmask.train.loop import run_training
from lossmask.train.lora import LoraSpec, merge_adapter, parse_lora
from lossmask.train.models import PRESETS

__all__ = [
    "DPOArgs",
    "DPOConfig",
    "DPOResult",
    "PRESETS",
    "LoraSpec",
    "TrainArgs",
    "TrainConfig",
    "TrainResult",
    "config_from_dict",
    "dpo_config_from_dict",
    "generate",
    "load_config",
    "load_dpo_config",
    "merge_adapter",
    "parse_lora",
    "parse_overrides",
    "run_dpo",
    "run_training",
]
