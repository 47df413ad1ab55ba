"""compare: two tiny checkpoints side by side, one in memory at a time; the pattern checks; preference accuracy."""
from __future__ import annotations

import gc
import importlib
import json
import weakref
from pathlib import Path

import numpy as np
import pytest
import torch
from rich.console import Console

from lossmask.compare import (
    compare_models,
    judge_format,
    parse_models,
    print_comparison,
    prompt_and_end,
    read_eval_file,
)
from lossmask.episode import Conversation, Message, Source
from lossmask.errors import LossmaskError
from lossmask.render import RenderOptions, make_renderer
from lossmask.tokenizer import TokenizerInfo

MYPT = RenderOptions(format="mypt")
END = "</myPT_assistant><myPT_eot>"
QUESTIONS = ["Capital of France?", "Opposite of hot?", "Say hello.", "Is ice cold?", "Capital of Peru?"]
# the scripted model's continuation per question: what each model "generates"
SCRIPTS = {
    "a": ["Paris" + END, "I'm sorry, but I can't help with that." + END, "hello", "Yes\nUser: and fire?" + END,
          "Lima" + END],
    "b": ["Paris" + END, "cold" + END, "<myPT_user>hello" + END, "Yes" + END, END],
}


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    from lossmask.tiny_tokenizer import build_tiny_tokenizer

    out = tmp_path_factory.mktemp("tok") / "tok"
    build_tiny_tokenizer([" ".join(QUESTIONS) + " Paris Lima cold hello Yes No I'm sorry"] * 4, out)
    return out


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, tok) -> dict[str, Path]:
    """Two tiny random Llamas (different seeds), each saved with the tokenizer."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tok)
    out = {}
    for name, seed in (("a", 1), ("b", 2)):
        torch.manual_seed(seed)
        config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128,
                             pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
        path = tmp_path_factory.mktemp(name)
        LlamaForCausalLM(config).save_pretrained(path)
        tokenizer.save_pretrained(path)
        out[name] = path
    return out


def eval_file(tmp: Path) -> Path:
    lines = [
        {"system": "Be brief.", "messages": [{"role": "user", "content": QUESTIONS[0]},
                                             {"role": "assistant", "content": "Paris"}]},
        {"messages": [{"role": "user", "content": QUESTIONS[1]}]},  # ends with the user: a prompt only
        {"messages": [{"role": "user", "content": QUESTIONS[2]}], "_meta": {"should_refuse": True}},
        {"prompt": [{"role": "user", "content": QUESTIONS[3]}], "chosen": "Yes", "rejected": "No"},
        {"prompt": [{"role": "user", "content": QUESTIONS[3]}], "chosen": "Yes", "rejected": "Ye",
         "_meta": {"omit_stop": True}},  # same prompt: generated from once
        {"prompt": [{"role": "user", "content": QUESTIONS[4]}], "chosen": "Lima", "rejected": "Paris"},
    ]
    path = tmp / "eval.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def scripted(model, tokenizer, name: str):
    """``model`` (real forward passes) whose ``generate`` writes the scripted continuation of each prompt."""

    def generate(input_ids, attention_mask, max_new_tokens, pad_token_id, **_):
        rows = []
        for ids in input_ids.tolist():
            prompt = tokenizer.decode(ids)
            question = next(i for i, q in enumerate(QUESTIONS) if q in prompt)
            new = tokenizer(SCRIPTS[name][question], add_special_tokens=False)["input_ids"][:max_new_tokens]
            rows.append(ids + new)
        width = max(len(r) for r in rows)
        return torch.tensor([r + [pad_token_id] * (width - len(r)) for r in rows])

    model.generate = generate
    return model


def hand_logp(model, ids, weights) -> float:
    ids = torch.as_tensor(np.asarray(ids, dtype=np.int64))
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids[None]).logits[0].float(), -1)
    return float((logp[:-1].gather(1, ids[1:, None])[:, 0] * torch.as_tensor(weights[1:])).sum())


def test_compare_two_checkpoints_one_at_a_time(tmp_path, tok, checkpoints, monkeypatch, capsys):
    from lossmask.pairs import encode_pairs

    gen = importlib.import_module("lossmask.train.generate")  # the package's `generate` is the function

    loaded: list[weakref.ref] = []
    real = gen.load_for_inference

    def load_one(path):
        gc.collect()
        assert all(ref() is None for ref in loaded), "a previous model is still in memory"
        model, tokenizer = real(path)
        loaded.append(weakref.ref(model))
        return scripted(model, tokenizer, Path(path).name.rstrip("0123456789")), tokenizer

    monkeypatch.setattr(gen, "load_for_inference", load_one)
    path = eval_file(tmp_path)
    report = compare_models(list(parse_models(f"a={checkpoints['a']},b={checkpoints['b']}")), path, render=MYPT,
                            max_new_tokens=64, json_out=tmp_path / "report.json")
    assert len(loaded) == 2
    a, b = report.models
    assert (a.name, b.name, a.prompts, b.prompts) == ("a", "b", 5, 5)
    # a: Paris ok, refusal ok(format) but refused, "hello" has no stop, "User:" marker, Lima ok
    assert a.format_failures == {"no_stop": 1, "role_marker": 1} and a.format_compliance == pytest.approx(3 / 5)
    assert (a.answerable, a.refusal_rate) == (4, 0.25)
    # b: a special token in the answer, and an empty answer
    assert b.format_failures == {"bad_tags": 1, "empty": 1} and b.refusal_rate == 0.0
    tokenizer = __import__("transformers").AutoTokenizer.from_pretrained(tok)
    lengths = [len(tokenizer(s, add_special_tokens=False)["input_ids"]) for s in SCRIPTS["b"]]
    assert b.mean_length == pytest.approx(np.mean(lengths))

    # preference accuracy: the sides' Σ w·log p, recomputed by hand for each model
    _, pairs = read_eval_file(path)
    encoded = encode_pairs(pairs, tokenizer, MYPT)
    from transformers import AutoModelForCausalLM

    for scores in (a, b):
        model = AutoModelForCausalLM.from_pretrained(checkpoints[scores.name]).eval()
        logps = [(hand_logp(model, c.input_ids, c.weights), hand_logp(model, r.input_ids, r.weights),
                  c.weights.sum(), r.weights.sum()) for c, r in encoded]
        assert scores.pairs == 3
        assert scores.preference_accuracy == pytest.approx(np.mean([pc > pr for pc, pr, _, _ in logps]))
        assert scores.preference_accuracy_per_token == pytest.approx(
            np.mean([pc / nc > pr / nr for pc, pr, nc, nr in logps]))
    saved = json.loads((tmp_path / "report.json").read_text())
    assert [m["name"] for m in saved["models"]] == ["a", "b"] and saved["models"][0]["samples"][0]["verdict"] == "ok"

    print_comparison(report, Console(width=200))
    table = capsys.readouterr().out
    assert "format compliance (pattern check" in table and "refusal rate (pattern check" in table
    assert "60.0%" in table and "25.0%" in table


def test_real_generation_runs_greedy_and_stops(tmp_path, checkpoints):
    """Without a script: real greedy generation of two random models gives a full, consistent report."""
    report = compare_models([("a", str(checkpoints["a"])), ("b", str(checkpoints["b"]))], eval_file(tmp_path),
                            render=MYPT, max_new_tokens=6, batch_size=2)
    for m in report.models:
        assert m.prompts == 5 and 0 <= m.format_compliance <= 1 and 1 <= m.mean_length <= 6
        assert sum(m.format_failures.values()) == round((1 - m.format_compliance) * 5)
    assert report.models[0].samples[0]["generation"] != report.models[1].samples[0]["generation"] or \
        report.models[0].preference_accuracy != report.models[1].preference_accuracy


def test_prompt_and_end_per_format(tok, qwen3, llama2):
    from transformers import AutoTokenizer

    episode = Conversation((Message("user", "Hi?"), Message("assistant", "x")), Source("e", 1), system="S")
    cases = [
        (AutoTokenizer.from_pretrained(tok), MYPT, "<myPT_user>Hi?</myPT_user><myPT_assistant>", END),
        (llama2, RenderOptions(format="instruction"), "Instruction: Hi?\nResponse:", "\nEND"),
        (qwen3, RenderOptions(), "<|im_start|>user\nHi?<|im_end|>\n<|im_start|>assistant\n", "<|im_end|>"),
    ]
    for tokenizer, options, prompt_end, end in cases:
        renderer = make_renderer(tokenizer, TokenizerInfo.of(tokenizer), options)
        prompt, got = prompt_and_end(renderer.render(episode)[0])
        assert prompt.endswith(prompt_end) and got == end


def test_judge_format_and_parse_models():
    special = {"<myPT_user>", "<myPT_think>", "</myPT_think>", "<myPT_eot>", "</myPT_assistant>"}
    assert judge_format("Paris" + END, END, special) is None
    assert judge_format("<myPT_think>hm</myPT_think>Paris" + END, END, special) is None
    assert judge_format("Paris", END, special) == "no_stop"
    assert judge_format("  " + END, END, special) == "empty"
    assert judge_format("<myPT_think>hm Paris" + END, END, special) == "bad_tags"
    assert judge_format("Paris<myPT_user>" + END, END, special) == "bad_tags"
    assert judge_format("Paris\nInstruction: more?\nEND", "\nEND", set()) == "role_marker"
    assert judge_format("Paris\nEND junk", "\nEND", set()) == "text_after"
    assert parse_models(" base=a, sft=b/c ,") == [("base", "a"), ("sft", "b/c")]
    for bad in ("base", "a=x,a=y", ""):
        with pytest.raises(LossmaskError):
            parse_models(bad)
