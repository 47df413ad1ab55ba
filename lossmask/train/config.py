"""Training configuration: one dataclass with defaults, read from JSON or YAML with strict key checking.

A typo in a config key silently falling back to a default would waste a training run, so unknown keys
are an error that names the key and the closest valid one.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, get_args, get_origin, get_type_hints

from lossmask.errors import LossmaskError

DECAYS = ("cosine", "constant", "linear")
SAMPLING_MODES = ("epoch", "random")
AMP_DTYPES = ("bf16", "fp16")
PARAM_DTYPES = ("float32", "bfloat16")


@dataclass
class TrainConfig:
    """Every knob of an SFT run. ``None`` means "not set": a derived or preset default applies.

    Sampling modes (``batch_sampling_mode``):

    - ``epoch``: the episodes form a stream of epochs, each a fresh permutation drawn from ``seed`` and the
      epoch number; optimizer windows take consecutive slices of that stream, so every episode is seen
      exactly once per epoch (the last window of an epoch may run into the next one).
    - ``random``: each window draws its episodes uniformly with replacement, seeded by ``seed`` and the
      window number (no epochs; useful to oversample small data).
    """

    # batching
    batch_size: int = 8  # sequences per micro-batch per process
    block_size: int = 1024  # longest sequence fed to the model; longer unpacked episodes are cut (and counted)
    grad_accum: int = 1  # micro-batches per optimizer step
    # optimisation
    lr: float = 3e-4
    warmup_iters: int = 0
    decay: str = "cosine"  # cosine | constant | linear, from lr to min_lr between warmup_iters and max_iters
    min_lr: float = 0.0
    max_iters: int | None = None  # optimizer windows; exclusive with epochs (neither: 1 epoch)
    epochs: float | None = None
    weight_decay: float = 0.0  # applied to matrices only (not norms, biases)
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    grad_clip: float = 1.0  # max global grad norm; 0 disables
    # loss
    use_loss_mask: bool = True  # false: every non-pad token is trained with weight 1
    batch_sampling_mode: str = "epoch"
    neftune_alpha: float = 0.0  # 0 disables NEFTune
    # precision and memory
    use_amp: bool | None = None  # None: bf16 autocast on CUDA, off on CPU
    amp_dtype: str = "bf16"
    param_dtype: str = "float32"  # master weights; bfloat16 halves memory at some precision cost
    gradient_checkpointing: bool = False
    attn_implementation: str | None = None  # e.g. sdpa, eager, flash_attention_2; None: transformers' default
    # evaluation, logging, checkpoints
    eval_interval: int = 200  # 0: evaluate only at the end
    eval_iters: int = 20  # validation micro-batches per evaluation (a fixed prefix of the val split)
    log_interval: int = 10
    save_interval: int = 0  # 0: save only at the end
    keep_checkpoints: int = 0  # keep the newest N interval checkpoints; 0 keeps all
    seed: int = 1337
    # context extension
    rope_scale: float | None = None  # linear RoPE scaling factor (absolute, relative to the base positions)
    # architecture, for presets only (None: the preset's value)
    hidden_size: int | None = None
    num_layers: int | None = None
    num_heads: int | None = None
    num_kv_heads: int | None = None
    intermediate_size: int | None = None
    vocab_size: int | None = None  # None: len(tokenizer) rounded up to a multiple of 64
    rope_theta: float | None = None
    tie_embeddings: bool | None = None
    dropout: float | None = None

    def __post_init__(self) -> None:
        _check_choice("decay", self.decay, DECAYS)
        _check_choice("batch_sampling_mode", self.batch_sampling_mode, SAMPLING_MODES)
        _check_choice("amp_dtype", self.amp_dtype, AMP_DTYPES)
        _check_choice("param_dtype", self.param_dtype, PARAM_DTYPES)
        for name in ("batch_size", "block_size", "grad_accum", "log_interval"):
            if getattr(self, name) < 1:
                raise LossmaskError(f"config {name} must be at least 1, got {getattr(self, name)}")
        for name in ("warmup_iters", "eval_interval", "eval_iters", "save_interval", "keep_checkpoints"):
            if getattr(self, name) < 0:
                raise LossmaskError(f"config {name} must be 0 or more, got {getattr(self, name)}")
        if self.block_size < 2:
            raise LossmaskError("config block_size must be at least 2 (a target needs a token before it)")
        if self.max_iters is not None and self.epochs is not None:
            raise LossmaskError("config sets both max_iters and epochs; set one of them")
        if self.max_iters is not None and self.max_iters < 1:
            raise LossmaskError(f"config max_iters must be at least 1, got {self.max_iters}")
        if self.epochs is not None and self.epochs <= 0:
            raise LossmaskError(f"config epochs must be positive, got {self.epochs}")
        if self.epochs is not None and self.batch_sampling_mode == "random":
            raise LossmaskError(
                "config epochs needs batch_sampling_mode: epoch (random sampling has no epochs); set max_iters"
            )
        if self.rope_scale is not None and self.rope_scale <= 0:
            raise LossmaskError(f"config rope_scale must be positive, got {self.rope_scale}")
        if self.neftune_alpha < 0:
            raise LossmaskError(f"config neftune_alpha must be >= 0, got {self.neftune_alpha}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise LossmaskError(f"config {name} must be one of {', '.join(choices)}; got {value!r}")


def config_keys() -> list[str]:
    return [f.name for f in dataclasses.fields(TrainConfig)]


def config_from_dict(data: dict[str, Any], source: str = "config") -> TrainConfig:
    """Build a TrainConfig, rejecting unknown keys and wrongly typed values with the key named.

    A nested ``schedule:`` section (warmup_iters, decay, min_lr) is accepted as written in the docs.
    """
    if not isinstance(data, dict):
        raise LossmaskError(f"{source}: expected a mapping of config keys, got {type(data).__name__}")
    flat = dict(data)
    schedule = flat.pop("schedule", None)
    if schedule is not None:
        if not isinstance(schedule, dict):
            raise LossmaskError(f"{source}: schedule must be a mapping (warmup_iters, decay, min_lr)")
        for key, value in schedule.items():
            if key not in ("warmup_iters", "decay", "min_lr"):
                raise LossmaskError(f"{source}: unknown key schedule.{key}; valid: warmup_iters, decay, min_lr")
            if key in flat:
                raise LossmaskError(f"{source}: {key} is set both at top level and in schedule; keep one")
            flat[key] = value
    keys = config_keys()
    hints = get_type_hints(TrainConfig)
    values: dict[str, Any] = {}
    for key, value in flat.items():
        if key not in keys:
            close = difflib.get_close_matches(str(key), keys, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f"; valid keys: {', '.join(keys)}"
            raise LossmaskError(f"{source}: unknown config key {key!r}{hint}")
        values[key] = coerce(key, value, hints[key], source)
    return TrainConfig(**values)


def coerce(key: str, value: Any, hint: Any, source: str) -> Any:
    """Check a value against the field's type; ints are accepted for floats (YAML writes 1e-4 as a string too)."""
    allowed = get_args(hint) if get_origin(hint) is not None else (hint,)
    if value is None:
        if type(None) in allowed:
            return None
        raise LossmaskError(f"{source}: config key {key!r} cannot be null")
    for kind in allowed:
        if kind is bool and isinstance(value, bool):
            return value
        if kind is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if kind is float and not isinstance(value, bool):
            if isinstance(value, (int, float)):
                return float(value)
            if isinstance(value, str):
                try:
                    return float(value)
                except ValueError:
                    pass
        if kind is str and isinstance(value, str):
            return value
    names = " or ".join("null" if k is type(None) else k.__name__ for k in allowed)
    raise LossmaskError(f"{source}: config key {key!r} must be {names}, got {value!r}")


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """Read a JSON or YAML config file (or none: defaults), then apply ``overrides`` on top."""
    data, source = read_config_file(path)
    merged = {**data, **(overrides or {})}
    return config_from_dict(merged, source)


def read_config_file(path: str | Path | None) -> tuple[dict[str, Any], str]:
    """(the keys of a JSON or YAML config file, the source its errors name); ``({}, "config")`` for no file.

    SFT and DPO configs are read the same way, so a bad file is reported alike for both.
    """
    if path is None:
        return {}, "config"
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise LossmaskError(f"cannot read config {path}: {exc.strerror or exc}") from exc
    return _parse(text, path), str(path)


def _parse(text: str, path: Path) -> dict[str, Any]:
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise LossmaskError(f"{path}:{exc.lineno}: invalid JSON: {exc.msg}") from exc
    else:
        import yaml

        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            line = f":{mark.line + 1}" if mark is not None else ""
            raise LossmaskError(f"{path}{line}: invalid YAML: {getattr(exc, 'problem', exc)}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise LossmaskError(f"{path}: a config file must hold a mapping of keys, got {type(data).__name__}")
    return data


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``["lr=1e-4", "use_loss_mask=false"]`` → a dict, each value parsed as YAML (for ``--set`` flags)."""
    import yaml

    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise LossmaskError(f"override {item!r} must look like key=value (e.g. lr=1e-4)")
        out[key.strip()] = yaml.safe_load(raw) if raw.strip() else None
    return out
