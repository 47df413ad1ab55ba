"""Training config: strict keys, types, nested schedule, the example file, the LR schedule."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lossmask.errors import LossmaskError
from lossmask.train.config import TrainConfig, config_from_dict, load_config, parse_overrides
from lossmask.train.lora import LoraSpec, parse_lora
from lossmask.train.models import PRESETS, preset_config, round_up
from lossmask.train.schedule import lr_at

REPO = Path(__file__).resolve().parents[1]


def test_unknown_key_names_it_and_suggests_the_closest(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("batch_size: 4\nmax_iter: 10\n")
    with pytest.raises(LossmaskError) as err:
        load_config(path)
    message = str(err.value)
    assert str(path) in message
    assert "'max_iter'" in message
    assert "did you mean 'max_iters'" in message


def test_unknown_key_without_close_match_lists_valid_keys():
    with pytest.raises(LossmaskError, match="unknown config key 'zzzz'.*valid keys: batch_size"):
        config_from_dict({"zzzz": 1})


def test_wrong_type_is_an_error_naming_the_key():
    with pytest.raises(LossmaskError, match="'batch_size' must be int, got 'eight'"):
        config_from_dict({"batch_size": "eight"})
    with pytest.raises(LossmaskError, match="'use_loss_mask' must be bool"):
        config_from_dict({"use_loss_mask": "yes"})


def test_yaml_exponent_without_dot_is_read_as_float(tmp_path):
    # YAML 1.1 reads 1e-4 as a string; it is still the obvious number
    path = tmp_path / "c.yaml"
    path.write_text("lr: 1e-4\nmin_lr: 0\n")
    cfg = load_config(path)
    assert cfg.lr == 1e-4 and isinstance(cfg.min_lr, float)


def test_json_config_and_overrides(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"batch_size": 2, "lr": 0.01}))
    cfg = load_config(path, overrides=parse_overrides(["lr=0.5", "use_loss_mask=false", "rope_scale=2"]))
    assert (cfg.batch_size, cfg.lr, cfg.use_loss_mask, cfg.rope_scale) == (2, 0.5, False, 2.0)


def test_bad_json_reports_line(tmp_path):
    path = tmp_path / "c.json"
    path.write_text('{\n "lr": 1,\n oops\n}')
    with pytest.raises(LossmaskError, match=r"c\.json:3: invalid JSON"):
        load_config(path)


def test_nested_schedule_section():
    cfg = config_from_dict({"schedule": {"warmup_iters": 5, "decay": "linear", "min_lr": 0.001}})
    assert (cfg.warmup_iters, cfg.decay, cfg.min_lr) == (5, "linear", 0.001)
    with pytest.raises(LossmaskError, match="unknown key schedule.warmup"):
        config_from_dict({"schedule": {"warmup": 5}})
    with pytest.raises(LossmaskError, match="both at top level and in schedule"):
        config_from_dict({"decay": "cosine", "schedule": {"decay": "linear"}})


@pytest.mark.parametrize(
    "data, message",
    [
        ({"decay": "exp"}, "decay must be one of cosine, constant, linear"),
        ({"batch_sampling_mode": "shuffle"}, "batch_sampling_mode must be one of epoch, random"),
        ({"max_iters": 10, "epochs": 2}, "both max_iters and epochs"),
        ({"grad_accum": 0}, "grad_accum must be at least 1"),
        ({"log_interval": 0}, "log_interval must be at least 1"),
        ({"save_interval": -1}, "save_interval must be 0 or more"),
        ({"batch_sampling_mode": "random", "epochs": 1}, "epochs needs batch_sampling_mode: epoch"),
    ],
)
def test_invalid_values(data, message):
    with pytest.raises(LossmaskError, match=message):
        config_from_dict(data)


def test_example_config_loads():
    cfg = load_config(REPO / "configs" / "train" / "tiny.yaml")
    assert cfg.warmup_iters == 20 and cfg.decay == "cosine" and cfg.epochs == 3
    assert cfg.hidden_size == 128


def test_lr_schedule_warmup_then_cosine_to_min():
    cfg = TrainConfig(lr=1.0, min_lr=0.1, warmup_iters=4, decay="cosine")
    assert [lr_at(i, cfg, 14) for i in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_at(4, cfg, 14) == 1.0
    assert lr_at(9, cfg, 14) == pytest.approx(0.55)
    assert lr_at(14, cfg, 14) == pytest.approx(0.1)
    linear = TrainConfig(lr=1.0, min_lr=0.0, decay="linear")
    assert lr_at(5, linear, 10) == pytest.approx(0.5)
    assert lr_at(7, TrainConfig(lr=0.3, decay="constant"), 10) == 0.3


def test_presets_shapes_and_vocab_rounding():
    class Tok:
        bos_token_id = eos_token_id = pad_token_id = None

        def __len__(self):
            return 50257

    big = preset_config("mypt-750m", TrainConfig(), Tok())
    assert (big.hidden_size, big.num_attention_heads, big.num_hidden_layers) == (1280, 20, 32)
    assert big.intermediate_size == 3456 == round_up(4 * 1280 * 2 // 3)
    assert big.vocab_size == 50304 and big.tie_word_embeddings
    assert big.rope_parameters == {"rope_type": "default", "rope_theta": 10000.0}
    small = preset_config("tiny", TrainConfig(hidden_size=64, vocab_size=100, rope_scale=2.0), None)
    assert small.hidden_size == 64 and small.vocab_size == 100
    assert small.rope_parameters["rope_type"] == "linear" and small.rope_parameters["factor"] == 2.0
    assert set(PRESETS) == {"tiny", "mypt-750m"}
    with pytest.raises(LossmaskError, match="needs a tokenizer"):
        preset_config("tiny", TrainConfig(), None)


def test_parse_lora_spec():
    assert parse_lora("r=16,alpha=32,targets=q_proj,v_proj") == LoraSpec(16, 32.0, 0.0, ("q_proj", "v_proj"))
    spec = parse_lora("r=4, dropout=0.1, targets=q_proj,k_proj,o_proj, alpha=8")
    assert spec == LoraSpec(4, 8.0, 0.1, ("q_proj", "k_proj", "o_proj"))
    assert parse_lora(str(spec)) == spec
    with pytest.raises(LossmaskError, match="unknown key 'rank'"):
        parse_lora("rank=4")
    with pytest.raises(LossmaskError, match="'q_proj' is not key=value"):
        parse_lora("r=4,q_proj")
    with pytest.raises(LossmaskError, match="r is an integer"):
        parse_lora("r=four")
