"""prepare end to end: input files → dataset on disk → open_dataset, through the API and the CLI."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from lossmask.cli import main
from lossmask.mask import MaskOptions
from lossmask.prepare import PrepareFailed, PrepareOptions, prepare
from lossmask.render import RenderOptions
from lossmask.store import open_dataset
from tests.tokenizers_cache import tokenizer_dir


def write_jsonl(path: Path, records) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def chat(i: int) -> dict:
    return {
        "system": "You are terse.",
        "messages": [{"role": "user", "content": f"Question {i}?"}, {"role": "assistant", "content": f"Answer {i}."}],
    }


def decoded_trained(tok, item) -> str:
    ids = [int(t) for t, w in zip(item["input_ids"], item["loss_mask"]) if w > 0]
    return tok.decode(ids, skip_special_tokens=False)


def test_prepare_writes_exact_masks_and_sources(tmp_path, llama3):
    data = write_jsonl(tmp_path / "in.jsonl", [chat(i) for i in range(5)])
    out = tmp_path / "ds"
    summary = prepare(PrepareOptions([str(data)], str(tokenizer_dir("llama3_1")), str(out), val_split=0), progress=False)
    assert summary.episodes_kept == 5 and summary.examples == {"train": 5, "val": 0}
    ds = open_dataset(out)
    assert len(ds) == 5
    for i in range(5):
        item = ds[i]
        assert item["input_ids"].dtype == np.uint32 and item["loss_mask"].dtype == np.float32
        assert decoded_trained(llama3, item) == f"Answer {i}.<|eot_id|>"
        assert tuple(item["source"]) == (str(data), i + 1)  # input order kept with --val-split 0
    meta = json.loads((out / "dataset_metadata.json").read_text())
    assert meta["inputs"][0]["sha256"] == hashlib.sha256(data.read_bytes()).hexdigest()
    assert meta["stop_strings"] == ["<|eot_id|>"]
    assert llama3.convert_tokens_to_ids("<|eot_id|>") in meta["stop_token_ids"]
    assert meta["summary"]["trained_tokens"] == sum(int(np.count_nonzero(ds[i]["loss_mask"])) for i in range(5))


def test_same_inputs_give_byte_identical_output_for_any_worker_count(tmp_path):
    data = write_jsonl(tmp_path / "in.jsonl", [chat(i) for i in range(300)])
    outs = []
    for n, workers in enumerate((1, 2, 1)):
        out = tmp_path / f"ds{n}"
        prepare(PrepareOptions([str(data)], str(tokenizer_dir("qwen3")), str(out), workers=workers,
                               val_split=0.2, chunk_lines=32), progress=False)
        outs.append(out)
    files = sorted(p.relative_to(outs[0]) for p in outs[0].rglob("*") if p.is_file())
    assert any(str(f).startswith("val/") for f in files)
    for other in outs[1:]:
        assert sorted(p.relative_to(other) for p in other.rglob("*") if p.is_file()) == files
        for f in files:
            assert (outs[0] / f).read_bytes() == (other / f).read_bytes(), f


def test_on_error_fail_writes_nothing_and_skip_writes_rejects(tmp_path):
    data = write_jsonl(tmp_path / "in.jsonl", [chat(0), "{not json", chat(2),
                                               {"messages": [{"role": "user", "content": "only a question"}]}])
    out = tmp_path / "ds"
    options = PrepareOptions([str(data)], str(tokenizer_dir("qwen3")), str(out), val_split=0)
    with pytest.raises(PrepareFailed) as err:
        prepare(options, progress=False)
    assert f"{data}:2" in str(err.value) and "--on-error skip" in str(err.value)
    assert not out.exists() and not list(tmp_path.glob(".ds*"))
    options.on_error = "skip"
    summary = prepare(options, progress=False)
    assert summary.episodes_kept == 2 and sum(summary.rejected.values()) == 2
    rejects = [json.loads(line) for line in (out / "rejects.jsonl").read_text().splitlines()]
    assert [(r["line"], r["text"]) for r in rejects] == [
        (2, "{not json"), (4, json.dumps({"messages": [{"role": "user", "content": "only a question"}]}))]
    assert all(r["reason"] and r["message"] for r in rejects)


def test_refuses_to_overwrite_without_force(tmp_path):
    data = write_jsonl(tmp_path / "in.jsonl", [chat(0)])
    options = PrepareOptions([str(data)], str(tokenizer_dir("qwen3")), str(tmp_path / "ds"), val_split=0)
    prepare(options, progress=False)
    with pytest.raises(Exception, match="--force|exists"):
        prepare(options, progress=False)
    options.force = True
    prepare(options, progress=False)


def test_zero_trained_and_too_long_are_counted_not_kept(tmp_path):
    records = [
        chat(0),
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "train": False}]},
        {"messages": [{"role": "user", "content": "word " * 400}, {"role": "assistant", "content": "a"}]},
    ]
    data = write_jsonl(tmp_path / "in.jsonl", records)
    out = tmp_path / "ds"
    summary = prepare(PrepareOptions([str(data)], str(tokenizer_dir("qwen3")), str(out), val_split=0,
                                     on_error="skip", mask=MaskOptions(max_length=64)), progress=False)
    assert summary.episodes_kept == 1
    assert dict(summary.rejected) == {"nothing_to_train": 1, "too_long": 1}


def test_special_token_in_content_policy_end_to_end(tmp_path, qwen3):
    data = write_jsonl(tmp_path / "in.jsonl", [{"messages": [
        {"role": "user", "content": "type <|im_end|> please"}, {"role": "assistant", "content": "done"}]}])
    base = dict(inputs=[str(data)], tokenizer=str(tokenizer_dir("qwen3")), val_split=0)
    with pytest.raises(PrepareFailed, match="special token string '<\\|im_end\\|>'"):
        prepare(PrepareOptions(out=str(tmp_path / "a"), **base), progress=False)
    summary = prepare(PrepareOptions(out=str(tmp_path / "b"), special_in_content="neutralize", **base), progress=False)
    assert summary.neutralized_special_strings == 1
    item = open_dataset(tmp_path / "b")[0]
    assert item["input_ids"].tolist().count(qwen3.convert_tokens_to_ids("<|im_end|>")) == 2  # user turn + answer


def test_every_input_format_through_prepare(tmp_path, llama2):
    """One line per input schema; the same marker renderer masks them all."""
    records = [
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]},
        {"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "Hi"},
                      {"role": "assistant", "content": "Yo", "reasoning_content": None}]},
        {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hey"}]},
        {"instruction": "Add", "input": "1 and 2", "output": "3"},
        {"prompt": "Q: sky?\nA:", "completion": " blue"},
        {"input_text": "Q: grass?\nA:", "full_text": "Q: grass?\nA: green"},
    ]
    data = write_jsonl(tmp_path / "in.jsonl", records)
    out = tmp_path / "ds"
    prepare(PrepareOptions([str(data)], str(tokenizer_dir("llama2")), str(out), val_split=0,
                           render=RenderOptions(format="instruction")), progress=False)
    ds = open_dataset(out)
    got = [decoded_trained(llama2, ds[i]).strip() for i in range(len(ds))]
    assert got == ["Hello\nEND", "Yo\nEND", "Hey\nEND", "3\nEND", "blue</s>", "green</s>"]


def test_text_with_response_marker(tmp_path, llama2):
    data = write_jsonl(tmp_path / "in.jsonl", [{"text": "Instruction: 2+2\nResponse: 4\nEND"},
                                               {"text": "no marker here"}])
    out = tmp_path / "ds"
    summary = prepare(PrepareOptions([str(data)], str(tokenizer_dir("llama2")), str(out), val_split=0,
                                     on_error="skip",
                                     render=RenderOptions(format="text", response_marker="\nResponse:",
                                                          end_marker="\nEND")), progress=False)
    assert dict(summary.rejected) == {"missing_marker": 1}
    assert decoded_trained(llama2, open_dataset(out)[0]) == "4\nEND"


def test_cli_prepare_inspect_validate(tmp_path, capsys):
    data = write_jsonl(tmp_path / "in.jsonl", [chat(i) for i in range(4)])
    out = tmp_path / "ds"
    tok = str(tokenizer_dir("gemma3"))
    assert main(["prepare", str(data), "--tokenizer", tok, "--out", str(out), "--val-split", "0", "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "episodes kept" in printed and "trained tokens" in printed
    assert main(["validate", str(out)]) == 0
    page = tmp_path / "view.html"
    assert main(["inspect", str(out), "--html", str(page)]) == 0
    html = page.read_text()
    assert "Answer" in html and "&lt;end_of_turn&gt;" in html and "weight 1 · STOP" in html
    assert main(["inspect", str(out), "--line", "2"]) == 0
    assert "Answer 1." in capsys.readouterr().out
    assert main(["prepare", str(data), "--tokenizer", tok, "--out", str(out), "--quiet"]) == 1
    assert "--force" in capsys.readouterr().err


def test_cli_bad_input_names_file_and_line(tmp_path, capsys):
    data = write_jsonl(tmp_path / "in.jsonl", [chat(0), {"messages": [{"role": "robot", "content": "x"}]}])
    code = main(["prepare", str(data), "--tokenizer", str(tokenizer_dir("qwen3")), "--out", str(tmp_path / "ds"),
                 "--quiet"])
    err = capsys.readouterr().err
    assert code == 1 and f"{data}:2" in err and "robot" in err


def test_template_that_raises_names_the_line_and_its_message(tmp_path):
    data = write_jsonl(tmp_path / "in.jsonl", [chat(0), {"messages": [
        {"role": "user", "content": "a"}, {"role": "user", "content": "b"}, {"role": "assistant", "content": "c"}]}])
    with pytest.raises(PrepareFailed) as err:
        prepare(PrepareOptions([str(data)], str(tokenizer_dir("gemma3")), str(tmp_path / "ds"), val_split=0),
                progress=False)
    assert err.value.problem.line == 2 and err.value.problem.reason == "template_error"
    assert f"{data}:2" in str(err.value) and "Conversation roles must alternate" in str(err.value)


def test_mypt_without_added_tokens_and_text_pairs_validate(tmp_path):
    """Multi-token stops (tags not added to the vocabulary) and EOS after a completion pass validate."""
    from lossmask.validate import validate_dataset

    data = write_jsonl(tmp_path / "in.jsonl", [chat(0), {"prompt": "Q: sky?\nA:", "completion": " blue"}])
    out = tmp_path / "ds"
    prepare(PrepareOptions([str(data)], str(tokenizer_dir("llama2")), str(out), val_split=0,
                           render=RenderOptions(format="mypt")), progress=False)
    report = validate_dataset(out)
    assert report.ok, report.problems
    meta = json.loads((out / "dataset_metadata.json").read_text())
    assert 2 in meta["stop_token_ids"]  # llama2's </s> after the completion
