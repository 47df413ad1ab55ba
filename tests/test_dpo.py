"""DPO: the loss against a hand computation, window normalisation, the LoRA reference, config, the demo."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lossmask.errors import LossmaskError
from lossmask.train import DPOArgs, TrainArgs, config_from_dict, dpo_config_from_dict, load_dpo_config, run_dpo, run_training
from lossmask.train.checkpoint import RUN_INFO, write_json
from lossmask.train.data import WindowSampler
from lossmask.train.dpo import DPORun, collate_pairs, dpo_losses, pair_logps
from lossmask.train.lora import load_adapter_model, merge_adapter
from lossmask.train.metrics import read_metrics

REPO = Path(__file__).resolve().parents[1]
WORDS = ["<pad>", "<s>", "</s>", "<|im_end|>"] + [f"w{i}" for i in range(36)]
BLOCK = 32


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    path = tmp_path_factory.mktemp("tok")
    tok.save_pretrained(path)
    return path


def tiny_model(seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64,
                         pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def sft_dir(tmp_path_factory, tok_dir) -> Path:
    from transformers import AutoTokenizer

    path = tmp_path_factory.mktemp("sft")
    tiny_model(0).save_pretrained(path)
    AutoTokenizer.from_pretrained(tok_dir).save_pretrained(path)
    return path


def pairs(n: int, seed: int = 0, weights=(1.0,)) -> list[dict]:
    """Pairs sharing a prompt (weight 0) with responses of different lengths (weights drawn from ``weights``)."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        prompt = rng.integers(4, 40, int(rng.integers(3, 8)))
        item = {"source": ("mem", i + 1)}
        for side in ("chosen", "rejected"):
            response = np.append(rng.integers(4, 40, int(rng.integers(1, 6))), 3)
            item[side] = {
                "input_ids": np.concatenate([prompt, response]).astype(np.uint32),
                "loss_mask": np.concatenate([np.zeros(len(prompt)), rng.choice(weights, len(response))]).astype(
                    np.float32),
            }
        out.append(item)
    return out


def hand_logp(model, ids, weights) -> torch.Tensor:
    """Σ_t w_t · log p(x_t | x_<t), written out: log_softmax, gather, weighted sum."""
    ids = torch.as_tensor(np.asarray(ids, dtype=np.int64))
    logp = torch.log_softmax(model(input_ids=ids[None]).logits[0].float(), dim=-1)
    token = logp[:-1].gather(1, ids[1:, None])[:, 0]
    return (token * torch.as_tensor(weights[1:])).sum()


def hand_loss(policy, reference, items, beta) -> torch.Tensor:
    losses = []
    for item in items:
        c, r = item["chosen"], item["rejected"]
        if not (c["loss_mask"].any() and r["loss_mask"].any()):
            continue
        pc, pr = hand_logp(policy, c["input_ids"], c["loss_mask"]), hand_logp(policy, r["input_ids"], r["loss_mask"])
        with torch.no_grad():
            rc = hand_logp(reference, c["input_ids"], c["loss_mask"])
            rr = hand_logp(reference, r["input_ids"], r["loss_mask"])
        losses.append(-F.logsigmoid(beta * ((pc - rc) - (pr - rr))))
    return torch.stack(losses).mean()


def cfg(**over):
    base = {"block_size": BLOCK, "batch_size": 2, "grad_accum": 2, "lr": 1e-2, "warmup_iters": 0, "decay": "constant",
            "log_interval": 1, "eval_interval": 0, "eval_iters": 2, "grad_clip": 0.0}
    return dpo_config_from_dict({**base, **over})


def dpo_args(tmp: Path, sft_dir: Path, data, name: str = "run", **over) -> DPOArgs:
    config = over.pop("config", None) or cfg(max_iters=1)
    return DPOArgs(model=str(sft_dir), data=data, out=tmp / name, config=config, tokenizer=sft_dir, progress=False,
                   **over)


def test_loss_matches_the_hand_computation():
    policy, reference = tiny_model(1), tiny_model(2)
    items = pairs(5, seed=1, weights=(0.5, 1.0, 2.0))
    batch = collate_pairs(items, range(5), BLOCK)
    (pc, pr), (rc, rr) = pair_logps(policy, batch), pair_logps(reference, batch)
    for i, item in enumerate(items):  # (pc, pr), (rc, rr) carry gradients: compare detached values
        assert float(pc[i].detach()) == pytest.approx(float(hand_logp(policy, **_side(item["chosen"]))), abs=1e-4)
        assert float(rr[i].detach()) == pytest.approx(float(hand_logp(reference, **_side(item["rejected"]))), abs=1e-4)
    losses, reward_c, reward_r = dpo_losses(pc, pr, rc, rr, beta=0.3)
    assert float(losses.mean().detach()) == pytest.approx(float(hand_loss(policy, reference, items, 0.3)), abs=1e-5)
    assert torch.allclose(reward_c, 0.3 * (pc - rc)) and torch.allclose(reward_r, 0.3 * (pr - rr))


def _side(side: dict) -> dict:
    return {"ids": side["input_ids"], "weights": side["loss_mask"]}


def test_window_metrics_match_the_hand_computation(tmp_path, sft_dir):
    """The second window's logged loss and log-probs, recomputed from the saved step-1 model and the SFT model."""
    from transformers import AutoModelForCausalLM

    items = pairs(8, seed=2)
    result = run_dpo(dpo_args(tmp_path, sft_dir, items, config=cfg(max_iters=2, save_interval=1, beta=0.5)))
    second = next(r for r in read_metrics(result.metrics_path) if r["iter"] == 2)
    sampler = WindowSampler(8, 4, "epoch", 1337)
    sampler.next_window()
    window = [items[i] for i in sampler.next_window()]
    policy = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "checkpoints" / "iter_0000001").eval()
    reference = AutoModelForCausalLM.from_pretrained(sft_dir).eval()
    with torch.no_grad():
        assert second["loss"] == pytest.approx(float(hand_loss(policy, reference, window, 0.5)), abs=1e-5)
        logp = np.mean([float(hand_logp(policy, **_side(it["chosen"]))) for it in window])
        ref = np.mean([float(hand_logp(reference, **_side(it["rejected"]))) for it in window])
    assert second["logp_chosen"] == pytest.approx(logp, abs=1e-4)
    assert second["ref_logp_rejected"] == pytest.approx(ref, abs=1e-4)
    assert second["reward_margin"] == pytest.approx(
        0.5 * ((second["logp_chosen"] - second["ref_logp_chosen"]) - (second["logp_rejected"]
                                                                        - second["ref_logp_rejected"])), abs=1e-5)
    first = next(r for r in read_metrics(result.metrics_path) if r["iter"] == 1)
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-6) and first["accuracy"] == 0.0  # policy = reference
    assert result.reference == "precomputed" and result.reference_dir is None
    info = json.loads((result.final_dir / RUN_INFO).read_text())
    assert info["dpo"] == {"beta": 0.5, "reference": "precomputed", "sft_checkpoint": str(sft_dir)}


@pytest.mark.parametrize("batch_size, grad_accum", [(4, 1), (1, 4), (2, 2)])
def test_gradient_is_the_mean_over_the_window_pairs(tmp_path, sft_dir, batch_size, grad_accum):
    """A pair without a trained token on a side is left out; the rest are averaged over the whole window."""
    from transformers import AutoModelForCausalLM

    items = pairs(4, seed=3)
    items[1]["rejected"]["loss_mask"][:] = 0.0  # invalid pair: not counted (a mean of means would differ)
    run = DPORun(dpo_args(tmp_path, sft_dir, items, config=cfg(max_iters=1, batch_size=batch_size,
                                                                grad_accum=grad_accum, beta=0.2)))
    captured = {}
    run.optimizer.step = lambda *a, **k: captured.update(
        {n: p.grad.detach().clone() for n, p in run.model.named_parameters() if p.grad is not None})
    record = run.window(0)
    model = AutoModelForCausalLM.from_pretrained(sft_dir).eval()
    loss = hand_loss(model, AutoModelForCausalLM.from_pretrained(sft_dir).eval(), items, 0.2)
    loss.backward()
    assert record["loss"] == pytest.approx(math.log(2), abs=1e-6)  # step 0: the policy is the reference
    perturbed = {n: p.grad for n, p in model.named_parameters()}
    assert captured.keys() == perturbed.keys()
    for name, grad in captured.items():
        assert torch.allclose(grad, perturbed[name], atol=1e-7, rtol=1e-4), name
    assert any(g.abs().max() > 0 for g in captured.values())


def test_lora_reference_is_the_merged_sft_model_with_the_adapter_disabled(tmp_path, sft_dir, tok_dir):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # an SFT LoRA adapter that changes the model (B is not zero)
    adapter = tmp_path / "sft_adapter"
    peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(sft_dir),
                                LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    torch.manual_seed(5)
    for name, param in peft_model.named_parameters():
        if "lora_B" in name:
            param.data.normal_(0, 0.3)
    peft_model.save_pretrained(adapter)
    AutoTokenizer.from_pretrained(tok_dir).save_pretrained(adapter)
    write_json(adapter / RUN_INFO, {"base_model": str(sft_dir), "rope_scale": None})

    items = pairs(6, seed=4)
    run = DPORun(dpo_args(tmp_path, adapter, items, lora="r=4,alpha=8,targets=q_proj,v_proj",
                          config=cfg(max_iters=4, lr=5e-2, beta=0.5)))
    assert run.reference == "adapter_disabled" and (tmp_path / "run" / "reference" / "config.json").is_file()
    batch = collate_pairs(items, range(6), BLOCK)
    merged = AutoModelForCausalLM.from_pretrained(merge_adapter(adapter, tmp_path / "merged")).eval()
    base = AutoModelForCausalLM.from_pretrained(sft_dir).eval()
    with torch.no_grad():
        expected, unadapted = pair_logps(merged, batch), pair_logps(base, batch)
    before = run.reference_logps(batch)
    for got, want, other in zip(before, expected, unadapted):
        assert torch.allclose(got, want, atol=1e-4)  # the reference is the merged SFT model...
        assert not torch.allclose(got, other, atol=1e-2)  # ...not the base without the SFT adapter
    assert all(torch.equal(p, r) for p, r in zip(run.policy_logps(batch), before))  # new adapter starts at zero

    result = run.train()
    after = run.reference_logps(batch)
    assert all(torch.equal(a, b) for a, b in zip(before, after))  # training never touches the reference
    policy = run.policy_logps(batch)
    assert not torch.allclose(policy[0], after[0], atol=1e-3)
    assert result.reference_dir == tmp_path / "run" / "reference" and result.optimizer_steps == 4
    assert (result.final_dir / "adapter_config.json").is_file()
    info = json.loads((result.final_dir / RUN_INFO).read_text())
    assert info["base_model"] == str((tmp_path / "run" / "reference").resolve())
    with torch.no_grad():
        reloaded = pair_logps(load_adapter_model(result.final_dir).eval(), batch)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(reloaded, policy))


def test_config_and_argument_errors(tmp_path, sft_dir):
    config = load_dpo_config(REPO / "configs" / "train" / "dpo.yaml")
    assert (config.beta, config.train.lr, config.train.decay, config.train.grad_accum) == (0.1, 5e-6, "linear", 4)
    default = dpo_config_from_dict({})
    assert (default.beta, default.train.lr, default.train.warmup_iters) == (0.1, 5e-6, 10)
    assert dpo_config_from_dict({"schedule": {"warmup_iters": 3}, "beta": "0.25"}).train.warmup_iters == 3
    with pytest.raises(LossmaskError, match="did you mean 'beta'"):
        dpo_config_from_dict({"betta": 0.2})
    for bad, match in (({"beta": -1}, "positive"), ({"use_loss_mask": False}, "use_loss_mask"),
                       ({"neftune_alpha": 5}, "neftune")):
        with pytest.raises(LossmaskError, match=match):
            dpo_config_from_dict(bad)
    sft_items = [{"input_ids": np.arange(4, 9, dtype=np.uint32), "loss_mask": np.ones(5, np.float32)}]
    with pytest.raises(LossmaskError, match="not a preference pair"):
        run_dpo(dpo_args(tmp_path, sft_dir, sft_items, "sft_data"))
    with pytest.raises(LossmaskError, match="SFT checkpoint directory"):
        run_dpo(dpo_args(tmp_path, "tiny", pairs(2), "preset"))


def test_dpo_demo_sft_to_dpo_end_to_end(tmp_path):
    from lossmask.dpo_demo import run_dpo_demo

    report = run_dpo_demo(tmp_path / "demo", sft_episodes=160, held_out=24, sft_iters=20, dpo_iters=8,
                          pairs_per_kind=24)
    assert report["pairs"] == 5 * 24 and report["pair_dataset"]["valid"]
    first, last = report["dpo_first"], report["dpo_last"]
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-5) and last["loss"] < first["loss"]
    assert last["reward_margin"] > 0 and last["ref_logp_chosen"] != last["logp_chosen"]
    compared = report["comparison"]
    assert list(compared) == ["sft", "dpo"] and all(c["pairs"] > 0 for c in compared.values())
    assert all(0 <= c["preference_accuracy"] <= 1 and c["format_compliance"] is not None for c in compared.values())
    saved = json.loads((tmp_path / "demo" / "dpo_demo_report.json").read_text())
    assert saved["paths"]["dpo"].endswith("final") and Path(saved["paths"]["comparison"]).is_file()
    demo = tmp_path / "demo"
    with pytest.raises(LossmaskError, match="not a preference-pair dataset"):  # refused before a model is built
        run_dpo(DPOArgs(model=str(demo / "sft" / "final"), data=str(demo / "sft_data"), out=str(tmp_path / "x"),
                        config=dpo_config_from_dict({}), progress=False))
    with pytest.raises(LossmaskError, match="is a preference-pair dataset"):
        run_training(TrainArgs(model="tiny", data=str(demo / "pair_data"), out=str(tmp_path / "y"),
                               config=config_from_dict({}), progress=False))
    assert not (tmp_path / "x" / "final").exists() and not (tmp_path / "y" / "final").exists()
