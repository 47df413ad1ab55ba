"""Every benchmark script runs end to end at tiny sizes and its numbers mean what the README says they mean."""
from __future__ import annotations

import json

import pytest

pytest.importorskip("trl")
pytest.importorskip("datasets")
pytest.importorskip("psutil")

from benchmarks import (
    common,
    mask_agreement,
    memory,
    packing,
    prep_throughput,
    train_throughput,
    turns_scaling,
)

SCRIPTS = (prep_throughput, mask_agreement, packing, train_throughput, memory, turns_scaling)


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda s: s.NAME)
def test_help_exits_cleanly(script, capsys):
    with pytest.raises(SystemExit) as exc:
        script.main(["--help"])
    assert exc.value.code == 0
    assert "--out" in capsys.readouterr().out


def read(path):
    doc = json.loads(path.read_text())
    assert doc["machine"]["nproc"] >= 1 and doc["machine"]["versions"]["lossmask"]
    return doc["results"]


def test_conversations_are_deterministic_and_varied():
    convs = common.conversations(40, seed=3)
    assert convs == common.conversations(40, seed=3)
    assert convs[:5] == common.conversations(5, seed=3)  # conversation i does not depend on n
    assert convs != common.conversations(40, seed=4)
    turns = {len(c["messages"]) // 2 for c in convs}
    assert turns == {1, 2, 3, 4}
    text = "".join(m["content"] for c in convs for m in c["messages"])
    assert "```" in text and "ü" in text and "- **Step 1:**" in text
    sized = [common.fixed_size_conversation(0, 0, t, 400) for t in (1, 10)]
    assert [len(c["messages"]) for c in sized] == [2, 20]
    words = [sum(len(m["content"].split()) for m in c["messages"]) for c in sized]
    assert words == [400, 400]


def test_prep_throughput(tmp_path):
    out = tmp_path / "prep.json"
    prep_throughput.main(["--conversations", "6", "--repeats", "1", "--tokenizers", "llama3_1", "--workers", "2",
                          "--out", str(out)])
    (r,) = read(out)
    rows = r["rows"]
    # Llama 3.1's template renders history as at inference: lossmask writes exactly the floor's tokens, as TRL
    assert rows["lossmask render+mask (in memory)"]["tokens"] == r["input_tokens"]
    assert rows["lossmask prepare, 1 worker"]["tokens"] == rows["lossmask prepare, 2 workers"]["tokens"]
    assert rows["TRL _prepare_dataset (in-process)"]["tokens"] == r["input_tokens"]
    assert r["history_split"] == 0 and r["lossmask_examples"] == 6
    assert r["ratios"]["core_vs_floor"] > 0 and "own template" in r["trl_template"]


def test_mask_agreement(tmp_path):
    out = tmp_path / "agree.json"
    mask_agreement.main(["--conversations", "6", "--tokenizers", "qwen3", "--out", str(out)])
    (qwen,) = read(out)
    # TRL refuses the cached Qwen3 template; single-turn conversations still render to the same ids
    assert "refuses" in qwen["trl_template"]
    single_turn = sum(len(c["messages"]) == 2 for c in common.conversations(6))
    assert qwen["identical_token_sequences"] == single_turn > 0
    # where the ids agree, the only difference is the newline TRL trains after <|im_end|>, once per turn
    newline = qwen["token_disagreements"]["TRL only: '\\n' after the stop token <|im_end|>"]["count"]
    assert list(qwen["token_disagreements"]) == ["TRL only: '\\n' after the stop token <|im_end|>"]
    assert qwen["tokens_compared"] - qwen["tokens_agreeing"] == newline == single_turn
    assert qwen["turns_equal"] == 0
    assert qwen["turn_differences"]["TRL also trains '\\n' after the turn"]["count"] == qwen["turns_compared"] > 0


def test_turn_difference_names_the_extra_text():
    assert mask_agreement.turn_difference("Hi.<e>", "Hi.<e>\n") == "TRL also trains '\\n' after the turn"
    assert mask_agreement.turn_difference("Hi.<e>", "Hi.") == "TRL leaves '<e>' at the end of the turn untrained"
    assert mask_agreement.trained_runs([7, 8, 9, 10], [False, True, True, False]) == [(1, 3)]


def test_packing(tmp_path):
    out = tmp_path / "pack.json"
    packing.main(["--episodes", "2000", "--chats", "12", "--repeats", "1", "--out", str(out)])
    results = read(out)
    assert [r["distribution"] for r in results] == list(packing.DISTRIBUTIONS)
    for r in results:
        assert r["episodes"] > 0 and all(c["blocks"] >= r["min_blocks"] for c in r["contenders"].values())
        assert all(c["fill"] * c["blocks"] * 1024 == pytest.approx(r["tokens"]) for c in r["contenders"].values())
    fills = {name: c["fill"] for name, c in results[0]["contenders"].items()}  # 30-50 token episodes
    assert fills["lossmask plan_packing"] >= 0.99
    assert fills["lossmask plan_packing"] >= max(fill for name, fill in fills.items() if name.startswith("TRL"))


def test_train_throughput_cpu(tmp_path):
    out = tmp_path / "train.json"
    train_throughput.main(["--conversations", "12", "--steps", "2", "--warmup", "1", "--block-size", "256",
                           "--padded-batch", "2", "--packed-batch", "1",
                           "--repeats", "1", "--out", str(out)])
    rows = read(out)["rows"]
    assert set(rows) == {"padded", "packed"}
    for row in rows.values():
        assert row["steps"] == 2 and row["tokens_per_s"] > 0 and 0 < row["trained_tokens"] <= row["tokens"]
        assert 0 <= row["padding"] < 1


def test_train_throughput_gpu_mode_says_when_there_is_no_gpu(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the --gpu run is a real benchmark, not a smoke test")
    out = tmp_path / "gpu.json"
    train_throughput.main(["--gpu", "--out", str(out)])
    assert read(out)["status"] == "not measured: no GPU was available"


def test_memory(tmp_path):
    out = tmp_path / "mem.json"
    memory.main(["--conversations", "8", "--factor", "2", "--out", str(out)])
    r = read(out)
    small, large = r["runs"]
    assert (small["conversations"], large["conversations"]) == (8, 16)
    assert small["ru_maxrss_mib"] > 50 and r["ru_maxrss_ratio"] == large["ru_maxrss_mib"] / small["ru_maxrss_mib"]


def test_turns_scaling(tmp_path):
    out = tmp_path / "turns.json"
    turns_scaling.main(["--turns", "1", "4", "--words", "120", "--conversations", "2", "--naive-conversations", "1",
                        "--tokenizers", "llama3_1", "--repeats", "1", "--out", str(out)])
    results = read(out)
    assert [r["turns"] for r in results] == [1, 4]
    assert results[0]["lossmask_vs_first"] == 1.0
    assert all(r["lossmask_examples"] == 2 for r in results)  # Llama 3.1: one example per conversation


def test_naive_mask_agrees_with_lossmask_on_llama():
    from benchmarks.baselines import LossmaskCore

    conv = common.fixed_size_conversation(0, 1, 3, 90)
    tokenizer = common.load("llama3_1")
    ids, mask = turns_scaling.naive_mask(tokenizer, common.chat_messages(conv))
    (example,) = LossmaskCore(tokenizer).run(common.episodes([conv]))[0]
    assert ids == example.input_ids.tolist()
    assert mask == (example.weights > 0).astype(int).tolist()
