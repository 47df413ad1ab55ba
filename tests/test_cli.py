"""The CLI as a user drives it: pack, train, generate, merge errors, add-tokens, help."""
from __future__ import annotations

import json

import pytest

from lossmask.cli import main
from lossmask.store import open_dataset
from tests.tokenizers_cache import tokenizer_dir


@pytest.fixture(scope="module")
def mypt_dataset(tmp_path_factory):
    """A small myPT dataset built with a tokenizer extended by `lossmask add-tokens`."""
    root = tmp_path_factory.mktemp("cli")
    tok = root / "tok"
    assert main(["add-tokens", str(tokenizer_dir("llama2")), "--out", str(tok)]) == 0
    records = [{"messages": [{"role": "user", "content": f"Say {w}."}, {"role": "assistant", "content": w}]}
               for w in ["red", "blue", "green", "gelb", "rot", "blau"] * 5]
    data = root / "in.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    out = root / "ds"
    assert main(["prepare", str(data), "--tokenizer", str(tok), "--format", "mypt", "--weighted-mask",
                 "--out", str(out), "--val-split", "0.2", "--quiet"]) == 0
    return root, out


def test_add_tokens_refuses_to_overwrite(mypt_dataset, capsys):
    root, _ = mypt_dataset
    assert main(["add-tokens", str(tokenizer_dir("llama2")), "--out", str(root / "tok")]) == 1
    assert "overwrite" in capsys.readouterr().err


def test_pack_then_train_then_generate(mypt_dataset, capsys):
    root, ds = mypt_dataset
    packed = root / "packed"
    assert main(["pack", str(ds), "--block", "64", "--out", str(packed)]) == 0
    assert "efficiency" in capsys.readouterr().out
    block = open_dataset(packed)[0]
    assert set(block) >= {"input_ids", "loss_mask", "segment_ids", "position_ids"}
    assert len(block["input_ids"]) == 64 and block["segment_ids"].max() > 1
    run = root / "run"
    args = ["train", "--data", str(packed), "--model", "tiny", "--out", str(run), "--quiet",
            "--set", "max_iters=3", "--set", "batch_size=2", "--set", "block_size=64",
            "--set", "hidden_size=32", "--set", "num_layers=1", "--set", "num_heads=2",
            "--set", "intermediate_size=64", "--set", "eval_iters=1"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "finished after 3/3 windows" in out and (run / "final" / "config.json").exists()
    assert (run / "metrics.jsonl").exists()
    assert main(args) == 1  # a second fresh run into the same OUT is refused
    assert "overwrite" in capsys.readouterr().err.lower()
    assert main(["generate", "--model", str(run / "final"), "--prompt", "<myPT_user>Say red.</myPT_user>"
                 "<myPT_assistant>", "--max-new-tokens", "5"]) == 0


def test_train_config_unknown_key_is_an_error(mypt_dataset, tmp_path, capsys):
    _, ds = mypt_dataset
    cfg = tmp_path / "c.yaml"
    cfg.write_text("learning_rate: 0.1\n")
    assert main(["train", "--data", str(ds), "--model", "tiny", "--config", str(cfg), "--out",
                 str(tmp_path / "r"), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "learning_rate" in err and "lr" in err


def test_help_of_every_command(capsys):
    for command in ["prepare", "inspect", "validate", "add-tokens", "pack", "train", "generate", "merge", "demo"]:
        with pytest.raises(SystemExit) as done:
            main([command, "--help"])
        assert done.value.code == 0
        assert "usage: lossmask " + command in capsys.readouterr().out


def test_readme_mix_with_replay_through_prepare_with_packing(tmp_path, capsys):
    """The README's recipe: two sources blended 95/5, a replay slice, prepared with packing."""
    chat = tmp_path / "chat.jsonl"
    chat.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"Question {i}?"},
                                                     {"role": "assistant", "content": f"Answer {i}."}]}) + "\n"
                            for i in range(190)))
    tools = tmp_path / "tools.jsonl"
    tools.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"Echo {i}"},
                                                      {"role": "assistant", "content": f"{i}"}]}) + "\n"
                             for i in range(40)))
    text = tmp_path / "wiki.txt"
    text.write_text("Berlin is the capital of Germany. " * 200)
    replay = tmp_path / "replay.jsonl"
    tok = str(tokenizer_dir("qwen3"))
    assert main(["replay", str(text), "--tokenizer", tok, "--max-tokens", "64", "--output", str(replay)]) == 0
    mixed = tmp_path / "mixed.jsonl"
    assert main(["mix", "--inputs", f"{chat}:19.0", f"{tools}:1.0", f"{replay}:1.0", "--output", str(mixed),
                 "--shuffle", "--seed", "7"]) == 0
    lines = [json.loads(line) for line in mixed.read_text().splitlines()]
    assert sum("_replay" in r for r in lines) == sum("Echo" in json.dumps(r) for r in lines) == len(lines) // 21
    out = tmp_path / "ds"
    assert main(["prepare", str(mixed), "--tokenizer", tok, "--out", str(out), "--pack", "512", "--quiet",
                 "--val-split", "0"]) == 0
    assert "packed train (block 512)" in capsys.readouterr().out
    ds = open_dataset(out)
    replay_tokens = sum(int((b["loss_mask"] > 0).sum()) for b in (ds[i] for i in range(len(ds))))
    assert replay_tokens > 0 and ds.metadata["packing"]["splits"]["train"]["efficiency"] > 0.9
    assert main(["validate", str(out)]) == 0
