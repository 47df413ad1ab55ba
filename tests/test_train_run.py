"""End-to-end training runs on a tiny model: checkpoints, resume, skipped windows, packing, RoPE, LoRA, generate."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from lossmask.errors import LossmaskError
from lossmask.train import TrainArgs, config_from_dict, generate, merge_adapter, run_training
from lossmask.train.data import collate, eval_micro_batches
from lossmask.train.lora import load_adapter_model
from lossmask.train.loss import loss_sums
from lossmask.train.metrics import read_metrics
from lossmask.train.models import build_model

WORDS = ["<pad>", "<s>", "</s>", "<|im_end|>"] + [f"w{i}" for i in range(30)] + ["q", ":", "a", "b", "c", "d"]
ARCH = {"hidden_size": 32, "num_layers": 2, "num_heads": 4, "intermediate_size": 64}


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory) -> Path:
    """A 40-token word-level tokenizer (so presets get a 64-row vocabulary)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.decoder = decoders.WordPiece(prefix="##")
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        additional_special_tokens=["<|im_end|>"],
    )
    path = tmp_path_factory.mktemp("tok")
    tok.save_pretrained(path)
    return path


def items(n: int, seed: int = 0, lo: int = 5, hi: int = 14) -> list[dict]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        length = int(rng.integers(lo, hi))
        mask = np.zeros(length, np.float32)
        mask[length // 2 :] = 1.0
        out.append(
            {
                "input_ids": rng.integers(4, len(WORDS), length).astype(np.uint32),
                "loss_mask": mask,
                "labels": np.zeros(length, np.uint8),
                "source": ("mem", 1),
            }
        )
    return out


def config(**over):
    base = {
        **ARCH,
        "block_size": 32,
        "batch_size": 2,
        "grad_accum": 2,
        "lr": 1e-2,
        "log_interval": 1,
        "eval_interval": 0,
    }
    return config_from_dict({**base, **over})


def train(tmp: Path, data, tok_dir, name: str = "run", **kwargs):
    cfg = kwargs.pop("cfg", None) or config()
    args = TrainArgs(
        model=kwargs.pop("model", "tiny"),
        data=data,
        out=tmp / name,
        config=cfg,
        tokenizer=tok_dir,
        progress=False,
        **kwargs,
    )
    return run_training(args)


def weights(directory: Path, name: str = "model.safetensors") -> dict[str, torch.Tensor]:
    return load_file(str(Path(directory) / name))


def test_checkpoint_loads_with_plain_transformers(tmp_path, tok_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    val = items(5, seed=9)
    cfg = config(max_iters=4, save_interval=2, keep_checkpoints=1, eval_interval=2, eval_iters=2)
    result = train(tmp_path, items(12), tok_dir, cfg=cfg, val_data=val)
    final = tmp_path / "run" / "final"
    assert result.finished and result.final_dir == final and result.iterations == 4 and result.optimizer_steps == 4
    assert final.resolve().name == "iter_0000004"
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == [
        "iter_0000004"
    ]  # pruned, no temp dirs

    model = AutoModelForCausalLM.from_pretrained(final).eval()
    assert model.get_input_embeddings().weight.shape[0] == 64  # 40 tokens rounded up to 64
    initial = build_model("tiny", cfg, AutoTokenizer.from_pretrained(tok_dir))
    assert not torch.equal(
        model.model.layers[0].self_attn.q_proj.weight, initial.model.layers[0].self_attn.q_proj.weight
    )
    tok = AutoTokenizer.from_pretrained(final)
    assert tok("q : a b <|im_end|>", add_special_tokens=False)["input_ids"] == [34, 35, 36, 37, 3]

    # the saved weights are the trained ones: they reproduce the run's final validation loss
    total = weight = 0.0
    for idx in eval_micro_batches(len(val), cfg.batch_size, cfg.eval_iters, 1, 0):
        s, w = loss_sums(model, [collate([val[i] for i in idx], cfg.block_size)])
        total, weight = total + s, weight + w
    assert result.val_loss == pytest.approx(total / weight, rel=1e-5)

    records = read_metrics(result.metrics_path)
    train_lines = [r for r in records if "loss" in r]
    assert [r["iter"] for r in train_lines] == [1, 2, 3, 4]
    assert all(np.isfinite(r["loss"]) and r["tokens_per_s"] > 0 for r in train_lines)
    assert [r["iter"] for r in records if "val_loss" in r] == [0, 2, 4]  # iteration 0: the untrained baseline
    assert records[0]["val_loss"] == result.initial_val_loss and result.initial_val_loss > result.val_loss
    assert result.loss_plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    info = json.loads((final / "lossmask_train.json").read_text())
    assert info["config"]["max_iters"] == 4 and info["model"] == "tiny"


def test_resume_ends_with_the_same_weights(tmp_path, tok_dir):
    # NEFTune noise and dropout draw from the RNG: resuming must restore it, and the data position
    cfg = config(max_iters=6, neftune_alpha=5.0, dropout=0.1, warmup_iters=2)
    data = items(10, seed=3)  # windows of 4 over 10 items: the run crosses two epoch boundaries
    whole = train(tmp_path, data, tok_dir, "whole", cfg=cfg)
    first = train(tmp_path, data, tok_dir, "split", cfg=cfg, stop_after=3)
    assert not first.finished and first.iterations == 3
    assert first.final_dir == tmp_path / "split" / "checkpoints" / "iter_0000003"
    assert not (tmp_path / "split" / "final").exists()
    second = train(tmp_path, data, tok_dir, "split", cfg=cfg, resume=True)
    assert second.finished and second.iterations == 6 and second.optimizer_steps == 6
    a, b = weights(whole.final_dir), weights(second.final_dir)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    losses = lambda r: [(m["iter"], m["loss"]) for m in read_metrics(r.metrics_path) if "loss" in m]  # noqa: E731
    assert losses(second) == losses(whole)  # metrics file continued without duplicates
    assert second.trained_tokens == whole.trained_tokens


def test_resume_refuses_a_different_batch_layout(tmp_path, tok_dir):
    data = items(10)
    train(tmp_path, data, tok_dir, cfg=config(max_iters=4), stop_after=1)
    with pytest.raises(LossmaskError, match="window_size"):
        train(tmp_path, data, tok_dir, cfg=config(max_iters=4, batch_size=3), resume=True)


def test_zero_weight_windows_are_skipped_and_reported(tmp_path, tok_dir):
    data = items(6, seed=4)
    for i in (0, 2, 4):
        data[i]["loss_mask"][:] = 0
    data[2]["loss_mask"][0] = 1.0  # a weight on the first token is no target (nothing predicts it)
    result = train(tmp_path, data, tok_dir, cfg=config(batch_size=1, grad_accum=1, epochs=1))
    assert result.iterations == 6
    assert result.skipped_windows == 3 and result.optimizer_steps == 3
    records = [r for r in read_metrics(result.metrics_path) if "lr" in r]
    skipped = [r for r in records if r.get("skipped")]
    assert len(skipped) == 3 and all(r["loss"] is None for r in skipped)
    assert all(np.isfinite(r["loss"]) and r["loss"] > 0 for r in records if not r.get("skipped"))


def test_all_zero_weights_leave_the_model_untouched(tmp_path, tok_dir):
    from transformers import AutoTokenizer

    data = items(4)
    for d in data:
        d["loss_mask"][:] = 0
    cfg = config(max_iters=2)
    result = train(tmp_path, data, tok_dir, cfg=cfg)
    assert result.skipped_windows == 2 and result.optimizer_steps == 0 and result.train_loss is None
    initial = build_model("tiny", cfg, AutoTokenizer.from_pretrained(tok_dir)).state_dict()
    saved = weights(result.final_dir)
    assert all(torch.equal(saved[k], initial[k]) for k in saved)


def test_use_loss_mask_false_trains_every_token(tmp_path, tok_dir):
    data = items(4, seed=5)
    masked = train(tmp_path, data, tok_dir, "masked", cfg=config(epochs=1, grad_accum=1))
    assert masked.trained_tokens == sum(int(np.count_nonzero(d["loss_mask"][1:])) for d in data)
    full = train(tmp_path, data, tok_dir, "full", cfg=config(epochs=1, grad_accum=1, use_loss_mask=False))
    assert full.trained_tokens == sum(len(d["input_ids"]) - 1 for d in data)
    assert full.tokens == masked.tokens == sum(len(d["input_ids"]) for d in data)


def test_packed_training_matches_unpacked(tmp_path, tok_dir):
    episodes = items(3, seed=6)
    pad = 4
    block = {
        "input_ids": np.concatenate([e["input_ids"] for e in episodes] + [np.zeros(pad, np.uint32)]),
        "loss_mask": np.concatenate([e["loss_mask"] for e in episodes] + [np.zeros(pad, np.float32)]),
        "labels": np.zeros(sum(len(e["input_ids"]) for e in episodes) + pad, np.uint8),
        "segment_ids": np.concatenate(
            [np.full(len(e["input_ids"]), i + 1, np.int32) for i, e in enumerate(episodes)] + [np.zeros(pad, np.int32)]
        ),
    }
    unpacked = train(
        tmp_path, episodes, tok_dir, "unpacked", cfg=config(max_iters=1, batch_size=3, grad_accum=1, block_size=64)
    )
    packed = train(
        tmp_path, [block], tok_dir, "packed", cfg=config(max_iters=1, batch_size=1, grad_accum=1, block_size=64)
    )
    assert packed.trained_tokens == unpacked.trained_tokens
    assert packed.train_loss == pytest.approx(unpacked.train_loss, rel=1e-5)
    a, b = weights(packed.final_dir), weights(unpacked.final_dir)
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-5, rtol=0)


def test_init_from_with_rope_scale(tmp_path, tok_dir):
    from transformers import AutoModelForCausalLM

    short = train(tmp_path, items(8), tok_dir, "short", cfg=config(max_iters=2, block_size=16))
    long_cfg = config_from_dict({"block_size": 32, "max_iters": 1, "lr": 0.0, "rope_scale": 2.0, "batch_size": 2})
    result = train(tmp_path, items(8, seed=1, lo=20, hi=30), tok_dir, "long", cfg=long_cfg, init_from=short.final_dir)
    model = AutoModelForCausalLM.from_pretrained(result.final_dir)
    params = model.config.rope_parameters
    assert params["rope_type"] == "linear" and params["factor"] == 2.0 and params["rope_theta"] == 10000.0
    head_dim = 32 // 4
    base = 1.0 / (10000.0 ** (torch.arange(0, head_dim, 2).float() / head_dim))
    torch.testing.assert_close(model.model.rotary_emb.inv_freq, base / 2.0)
    before, after = weights(short.final_dir), weights(result.final_dir)  # lr 0: the loaded weights, unchanged
    assert all(torch.equal(before[k], after[k]) for k in before)
    with pytest.raises(LossmaskError, match="only apply to presets"):
        train(tmp_path, items(2), tok_dir, "bad", cfg=config(max_iters=1), init_from=short.final_dir)


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory, tok_dir) -> Path:
    from transformers import AutoTokenizer

    path = tmp_path_factory.mktemp("base")
    build_model("tiny", config(), AutoTokenizer.from_pretrained(tok_dir)).save_pretrained(path)
    AutoTokenizer.from_pretrained(tok_dir).save_pretrained(path)
    return path


def test_lora_trains_an_adapter_that_merges(tmp_path, tok_dir, base_dir):
    from transformers import AutoModelForCausalLM

    cfg = config_from_dict({"max_iters": 3, "lr": 5e-2, "batch_size": 2, "block_size": 32})
    result = train(tmp_path, items(6), tok_dir, model=str(base_dir), cfg=cfg, lora="r=4,alpha=8,targets=q_proj,v_proj")
    final = result.final_dir
    assert (final / "adapter_config.json").is_file() and (final / "adapter_model.safetensors").is_file()
    assert not (final / "model.safetensors").exists()
    adapter = weights(final, "adapter_model.safetensors")
    assert adapter and all("lora_" in k for k in adapter)
    assert any("lora_B" in k and v.abs().max() > 0 for k, v in adapter.items())  # B starts at zero: it trained

    merged_dir = merge_adapter(final, tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(merged_dir).eval()
    peft_model = load_adapter_model(final).eval()
    base = AutoModelForCausalLM.from_pretrained(base_dir).eval()
    ids = torch.tensor([[4, 9, 17, 30, 35, 36]])
    with torch.no_grad():
        want = peft_model(input_ids=ids).logits
        torch.testing.assert_close(merged(input_ids=ids).logits, want, atol=1e-5, rtol=1e-4)
        assert not torch.allclose(base(input_ids=ids).logits, want, atol=1e-4)
    assert (merged_dir / "tokenizer.json").is_file()


def test_lora_and_quantization_errors(tmp_path, tok_dir, base_dir):
    def one_step(model: Path = base_dir, **kwargs):
        """A one-window run from ``model`` (the saved base): each case below differs only in its options."""
        return train(tmp_path, items(2), tok_dir, model=str(model), cfg=config_from_dict({"max_iters": 1}), **kwargs)

    with pytest.raises(LossmaskError, match="unknown key 'rank'"):
        one_step(lora="rank=4")
    with pytest.raises(LossmaskError, match="not modules of this model; its weight layers: .*q_proj.*v_proj"):
        one_step(lora="targets=c_attn")
    with pytest.raises(LossmaskError, match="preset built from scratch"):
        train(tmp_path, items(2), tok_dir, cfg=config(max_iters=1), lora="r=4")
    with pytest.raises(LossmaskError, match="bitsandbytes|CUDA"):
        one_step(lora="r=4", quantize="4bit")
    with pytest.raises(LossmaskError, match="could not load model"):
        one_step(model=tmp_path)


def test_generate_greedy_stops_on_stop_strings(tmp_path, tok_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tok_dir)
    text = "<s> q : a b c d <|im_end|> w1 w2 w3"
    ids = np.array(tok(text, add_special_tokens=False)["input_ids"], np.uint32)
    mask = np.zeros(len(ids), np.float32)
    mask[3:] = 1.0  # train "a b c d <|im_end|> w1 w2 w3"
    data = [{"input_ids": ids, "loss_mask": mask, "labels": np.zeros(len(ids), np.uint8), "source": ("m", 1)}] * 8
    cfg = config(max_iters=40, lr=2e-2, batch_size=4, grad_accum=1, decay="constant")
    result = train(tmp_path, data, tok_dir, cfg=cfg)
    assert result.train_loss < 0.05
    assert generate(result.final_dir, "<s> q :", max_new_tokens=10, stop_strings=["<|im_end|>"]) == "a b c d "
    assert generate(result.final_dir, "<s> q :", max_new_tokens=5, stop_strings=[]) == "a b c d <|im_end|>"
    messages = [{"role": "user", "content": "q"}]
    with pytest.raises(LossmaskError, match="no chat template"):
        generate(result.final_dir, messages, max_new_tokens=2)
    chat = tmp_path / "chat"  # the same model, with a chat template rendering the trained prompt
    shutil.copytree(result.final_dir, chat)
    tok.chat_template = "{% for m in messages %}<s> {{ m['content'] }} :{% endfor %}"
    tok.save_pretrained(chat)
    assert generate(chat, messages, max_new_tokens=10, stop_strings=["<|im_end|>"]) == "a b c d "


def _store(path: Path, tok_dir: Path, packed: bool, val: bool) -> Path:
    from lossmask.episode import Source
    from lossmask.example import Example
    from lossmask.store import DatasetWriter
    from lossmask.tokenizer import load_tokenizer

    examples = [
        Example(d["input_ids"], d["loss_mask"], d["labels"], Source("in.jsonl", i + 1))
        for i, d in enumerate(items(9, seed=8))
    ]
    with DatasetWriter(path, load_tokenizer(str(tok_dir)), inputs=["in.jsonl"]) as writer:
        if packed:
            for i in range(0, 6, 2):
                writer.add_block("train", examples[i : i + 2], block_size=32, pad_id=0)
        else:
            for ex in examples[:6]:
                writer.add("train", ex)
        if val:
            for ex in examples[6:]:
                writer.add("val", ex)
        writer.close({"stop_strings": ["<|im_end|>"]})
    return path


@pytest.mark.parametrize("packed", [False, True])
def test_trains_from_a_stored_dataset(tmp_path, tok_dir, packed):
    from transformers import AutoTokenizer

    from lossmask.tokenizer import tokenizer_identity

    data = _store(tmp_path / "ds", tok_dir, packed=packed, val=True)
    result = run_training(
        TrainArgs(model="tiny", data=str(data), out=tmp_path / "out", config=config(max_iters=2), progress=False)
    )
    assert result.val_loss is not None and np.isfinite(result.val_loss)
    saved = tokenizer_identity(AutoTokenizer.from_pretrained(result.final_dir))
    stored = json.loads((data / "dataset_metadata.json").read_text())["tokenizer"]
    assert saved["tokenizer_sha256"] == stored["tokenizer_sha256"]
    info = json.loads((result.final_dir / "lossmask_train.json").read_text())
    assert info["dataset_metadata"]["stop_strings"] == ["<|im_end|>"]


def test_stored_dataset_without_val_split_skips_validation(tmp_path, tok_dir):
    data = _store(tmp_path / "ds", tok_dir, packed=False, val=False)
    result = run_training(
        TrainArgs(model="tiny", data=str(data), out=tmp_path / "out", config=config(max_iters=1), progress=False)
    )
    assert result.val_loss is None and result.finished


def test_fresh_run_refuses_an_output_holding_a_run(tmp_path, tok_dir):
    first = train(tmp_path, items(4), tok_dir, cfg=config(max_iters=2))
    with pytest.raises(LossmaskError, match="already holds a training run .it has checkpoints: resume"):
        train(tmp_path, items(4), tok_dir, cfg=config(max_iters=1))
    again = train(tmp_path, items(4), tok_dir, cfg=config(max_iters=1), overwrite=True)
    assert again.final_dir.resolve().name == "iter_0000001"
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["iter_0000001"]
    assert [r["iter"] for r in read_metrics(again.metrics_path)] == [1]
    assert first.out_dir == again.out_dir
