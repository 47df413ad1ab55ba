"""Preference pairs: schema parsing, shared-prompt masking on real tokenizers, prepare --pairs, store, inspect."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from lossmask.episode import Conversation, Source, TextPair
from lossmask.errors import InputError, LossmaskError
from lossmask.pairs import encode_pairs, parse_pair, prepare_pairs, read_pairs
from lossmask.prepare import PrepareFailed, PrepareOptions, prepare
from lossmask.render import Label, RenderOptions
from lossmask.store import PairDataset, open_dataset
from lossmask.validate import format_report, validate_dataset

SRC = Source("pairs.jsonl", 7)
PROMPT = [{"role": "user", "content": "Capital of France?"}]


def pair(**over) -> dict:
    record = {"system": "Be brief.", "prompt": PROMPT, "chosen": {"role": "assistant", "content": "Paris."},
              "rejected": {"role": "assistant", "content": "I can't help with that."}}
    return {**record, **over}


def problem(record) -> InputError:
    with pytest.raises(InputError) as info:
        parse_pair(record, SRC)
    return info.value


def write(path: Path, records: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


# -- schema -----------------------------------------------------------------------------------------------
def test_native_form_prompt_untrained_response_trained():
    p = parse_pair(pair(_meta={"negative_kind": "refusal"}, id=3), SRC)
    for episode, text in ((p.chosen, "Paris."), (p.rejected, "I can't help with that.")):
        assert isinstance(episode, Conversation) and episode.system == "Be brief."
        assert [(m.role, m.content, m.loss_weight) for m in episode.messages] == [
            ("user", "Capital of France?", 0.0), ("assistant", text, 1.0)]
    assert p.meta == {"_meta": {"negative_kind": "refusal"}, "id": 3} and not p.omit_stop and p.source == SRC


def test_trl_forms_and_history_untrained():
    history = [{"role": "system", "content": "S"}, {"role": "user", "content": "a"},
               {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}]
    explicit = parse_pair({"prompt": history, "chosen": [{"role": "assistant", "content": "good"}],
                           "rejected": [{"role": "assistant", "content": "bad"}]}, SRC)
    implicit = parse_pair({"chosen": [*history, {"role": "assistant", "content": "good"}],
                           "rejected": [*history, {"role": "assistant", "content": "bad"}]}, SRC)
    for p in (explicit, implicit):
        assert p.chosen.system == "S"
        assert [(m.role, m.content, m.loss_weight) for m in p.chosen.messages] == [
            ("user", "a", 0.0), ("assistant", "b", 0.0), ("user", "c", 0.0), ("assistant", "good", 1.0)]
        assert p.rejected.messages[:-1] == p.chosen.messages[:-1] and p.rejected.messages[-1].content == "bad"


def test_string_forms():
    raw = parse_pair({"prompt": "Q: 2+2?\nA:", "chosen": " 4", "rejected": " 5"}, SRC)
    assert raw.chosen == TextPair("Q: 2+2?\nA:", " 4", SRC) and raw.rejected.completion == " 5"
    mixed = parse_pair({"prompt": "Hi?", "chosen": "Hello.", "rejected": {"role": "assistant", "content": "No."},
                        "_meta": {"omit_stop": True}}, SRC)
    assert [(m.role, m.content) for m in mixed.chosen.messages] == [("user", "Hi?"), ("assistant", "Hello.")]
    assert mixed.rejected.messages[-1].content == "No." and mixed.omit_stop


def test_pair_errors_name_the_pair_fields():
    assert problem(pair(rejected=None)).problem.field == "rejected"
    empty = problem(pair(chosen=[{"role": "assistant", "content": " "}])).problem
    assert (empty.reason, empty.field) == ("empty_assistant", "chosen[0].content")
    typo = problem(pair(prompt=[{"role": "user", "content": "x", "contxt": "y"}])).problem
    assert (typo.reason, typo.field) == ("unknown_field", "prompt[0].contxt")
    assert problem(pair(prompt=[{"role": "user", "content": "a"}, {"role": "assistant", "content": "b", "weight": 1},
                                {"role": "user", "content": "c"}])).problem.reason == "trained_prompt"
    assert problem(pair(rejected=[{"role": "user", "content": "x"}])).problem.reason in ("bad_response", "no_assistant")
    mismatch = problem({"chosen": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "x"}],
                        "rejected": [{"role": "user", "content": "b"}, {"role": "assistant", "content": "y"}]})
    assert (mismatch.problem.reason, mismatch.problem.field) == ("implicit_prompt_mismatch", "rejected[0]")
    assert problem(pair(_meta={"omit_stop": "yes"})).problem.field == "_meta.omit_stop"
    assert problem({"prompt": "a", "chosen": "b", "rejected": "c", "system": "s"}).problem.reason == "unsupported_field"
    assert "pairs.jsonl:7" in str(problem([1, 2]))


def test_read_pairs_reports_bad_lines(tmp_path):
    path = write(tmp_path / "p.jsonl", [pair(), "{not json", "", pair(chosen=7)])
    items = list(read_pairs(path))
    assert [type(i).__name__ for i in items] == ["Pair", "InputProblem", "InputProblem"]
    assert (items[1].line, items[1].reason) == (2, "bad_json") and (items[2].line, items[2].field) == (4, "chosen")


# -- masking on real tokenizers ------------------------------------------------------------------------
@pytest.mark.parametrize("name, expected", [
    ("qwen3", "<think>\n\n</think>\n\n{}<|im_end|>"),
    ("llama3", "{}<|eot_id|>"),
    ("gemma3", "{}<end_of_turn>"),
])
def test_chat_template_pairs_share_exact_prompt_tokens(request, name, expected):
    tok = request.getfixturevalue(name)
    history = [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Red."},
               {"role": "user", "content": "Another one?"}]
    record = {"system": "Be brief.", "prompt": history, "chosen": {"role": "assistant", "content": "Blue."},
              "rejected": {"role": "assistant", "content": "I won't."}}
    (chosen, rejected), = encode_pairs([parse_pair(record, SRC)], tok)
    messages = [{"role": "system", "content": "Be brief."}, *history]
    prompt_text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    prompt_ids = tok(prompt_text, add_special_tokens=False)["input_ids"]
    k = len(prompt_ids)
    for ex, answer in ((chosen, "Blue."), (rejected, "I won't.")):
        assert ex.input_ids[:k].tolist() == prompt_ids  # exactly the inference prompt, identical on both sides
        assert not ex.weights[:k].any() and ex.weights[k] == 1.0  # untrained prompt, trained from its first token
        trained = ex.input_ids[ex.weights > 0].tolist()
        assert trained == ex.input_ids[k:len(trained) + k].tolist()  # one contiguous run after the prompt
        assert tok.decode(trained) == expected.format(answer)
        assert ex.labels[ex.weights > 0][-1] == Label.STOP
        assert Label.ASSISTANT not in ex.labels[:k].tolist()  # the history's assistant turn is prompt


def test_raw_text_pairs_on_sentencepiece(llama2):
    record = {"prompt": "Q: capital of France?\nA:", "chosen": " Paris", "rejected": " Rome, I think"}
    (chosen, rejected), = encode_pairs([parse_pair(record, SRC)], llama2, RenderOptions(format="text"))
    prompt_ids = [llama2.bos_token_id, *llama2("Q: capital of France?\nA:", add_special_tokens=False)["input_ids"]]
    for ex, text in ((chosen, "Paris"), (rejected, "Rome, I think")):
        k = len(prompt_ids)
        assert ex.input_ids[:k].tolist() == prompt_ids and not ex.weights[:k].any()
        assert llama2.decode(ex.input_ids[k:].tolist()) == f"{text}</s>" and (ex.weights[k:] == 1).all()
        assert ex.input_ids[-1] == llama2.eos_token_id and ex.labels[-1] == Label.STOP


def test_prompt_mismatch_across_the_seam_is_rejected(llama3):
    # "hello w" + "orld" tokenizes as [hello][ world]; "hello w" + " there" as [hello][ w][ there]
    record = {"prompt": "hello w", "chosen": "orld", "rejected": " there"}
    (result,) = encode_pairs([parse_pair(record, SRC)], llama3, RenderOptions(format="text"))
    assert result.reason == "prompt_mismatch" and "first trained token is at 2 in chosen and 3" in result.message


@pytest.mark.parametrize("fmt, end", [("instruction", "\nEND"), ("chat-template", "<|eot_id|>")])
def test_omit_stop_drops_the_stop_and_what_follows(llama3, fmt, end):
    record = pair(chosen="Paris is the capital.", rejected="Paris is", _meta={"omit_stop": True})
    (chosen, rejected), = encode_pairs([parse_pair(record, SRC)], llama3, RenderOptions(format=fmt))
    assert llama3.decode(chosen.input_ids[chosen.weights > 0].tolist()).endswith(f"capital.{end}")
    assert llama3.decode(rejected.input_ids[rejected.weights > 0].tolist()).endswith("Paris is")
    assert llama3.decode(rejected.input_ids[-2:].tolist()).endswith("Paris is")  # nothing after the answer
    assert Label.STOP not in rejected.labels.tolist() and not chosen.truncated and rejected.truncated


# -- prepare --pairs, store, validate, inspect --------------------------------------------------------------
def mypt_records() -> list:
    return [
        pair(),
        pair(prompt=[{"role": "user", "content": "2+2?"}], chosen="4", rejected="45", _meta={"omit_stop": True}),
        {"chosen": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hello!"}],
         "rejected": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Go away."}]},
        pair(chosen={"role": "assistant", "content": "<myPT_eot>"}),  # special token in content: rejected
    ] + [pair(prompt=[{"role": "user", "content": f"question {i}?"}], chosen=f"answer {i}", rejected="no")
         for i in range(8)]


@pytest.fixture(scope="module")
def mypt_tok(tmp_path_factory) -> Path:
    from lossmask.tiny_tokenizer import build_tiny_tokenizer

    out = tmp_path_factory.mktemp("tok") / "mypt"
    build_tiny_tokenizer(["Capital of France? Paris. question answer Hello hi no"] * 3, out)
    return out


def test_prepare_pairs_store_validate_inspect(tmp_path, mypt_tok, capsys):
    from lossmask.inspect import inspect_dataset

    src = write(tmp_path / "pairs.jsonl", mypt_records())
    options = PrepareOptions(inputs=[str(src)], tokenizer=str(mypt_tok), out=str(tmp_path / "ds"),
                             render=RenderOptions(format="mypt"), val_split=0.25, seed=3, on_error="skip")
    summary = prepare_pairs(options, progress=False)
    assert summary.lines == 12 and summary.episodes_kept == 11 and dict(summary.rejected) == {
        "special_token_in_content": 1}
    assert summary.notes["rejected_without_stop"] == 1
    meta = json.loads((tmp_path / "ds" / "dataset_metadata.json").read_text())
    assert meta["kind"] == "pairs" and sorted(meta["splits"]) == ["train.chosen", "train.rejected", "val.chosen",
                                                                  "val.rejected"]
    train, val = open_dataset(tmp_path / "ds"), open_dataset(tmp_path / "ds", "val")
    assert isinstance(train, PairDataset) and len(train) + len(val) == 11 == sum(summary.examples.values())
    assert len(val) == summary.examples["val"] > 0
    from lossmask.tokenizer import load_tokenizer

    tok = load_tokenizer(str(mypt_tok))
    lines = []
    for ds in (train, val):
        for item in ds:
            chosen, rejected = item["chosen"], item["rejected"]
            assert item["source"] == chosen["source"] == rejected["source"]
            k = int(np.flatnonzero(chosen["loss_mask"])[0])
            assert int(np.flatnonzero(rejected["loss_mask"])[0]) == k
            assert np.array_equal(chosen["input_ids"][:k], rejected["input_ids"][:k])
            assert tok.decode(chosen["input_ids"][:k].tolist()).endswith("</myPT_user><myPT_assistant>")
            assert tok.decode(chosen["input_ids"][chosen["loss_mask"] > 0].tolist()).endswith(
                "</myPT_assistant><myPT_eot>")
            lines.append(item["source"][1])
            if item["source"][1] == 2:
                assert rejected["truncated"] and tok.decode(rejected["input_ids"].tolist()).endswith(
                    "<myPT_assistant>45")
    assert sorted(lines) == [1, 2, 3, *range(5, 13)]
    report = validate_dataset(tmp_path / "ds")
    assert report.ok, format_report(report)
    assert sum(c["open_turns_in_truncated_episodes"] for c in report.counts.values()) == 1
    assert json.loads((tmp_path / "ds" / "rejects.jsonl").read_text())["line"] == 4
    # each side also opens alone, as an SFT split
    assert open_dataset(tmp_path / "ds", "train.rejected").num_episodes == len(train)

    capsys.readouterr()
    inspect_dataset(str(tmp_path / "ds"), samples=1)
    shown = capsys.readouterr().out
    assert "train[0] chosen" in shown and "train[0] rejected" in shown


def test_prepare_pairs_is_deterministic_across_workers_and_fails_cleanly(tmp_path, mypt_tok):
    src = write(tmp_path / "pairs.jsonl", mypt_records()[:3] + mypt_records()[4:] * 30)
    hashes = []
    for workers in (1, 2):
        out = tmp_path / f"ds{workers}"
        prepare_pairs(PrepareOptions(inputs=[str(src)], tokenizer=str(mypt_tok), out=str(out), chunk_lines=16,
                                     render=RenderOptions(format="mypt"), workers=workers), progress=False)
        hashes.append({p.relative_to(out).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
                       for p in sorted(out.rglob("*.bin"))})
    assert hashes[0] == hashes[1] and "val.rejected/tokens.bin" in hashes[0]
    bad = write(tmp_path / "bad.jsonl", mypt_records())
    with pytest.raises(PrepareFailed, match="bad.jsonl:4"):
        prepare_pairs(PrepareOptions(inputs=[str(bad)], tokenizer=str(mypt_tok), out=str(tmp_path / "none"),
                                     render=RenderOptions(format="mypt")), progress=False)
    assert not (tmp_path / "none").exists()
    with pytest.raises(LossmaskError, match="--pack"):
        prepare_pairs(PrepareOptions(inputs=[str(src)], tokenizer=str(mypt_tok), out=str(tmp_path / "p"), pack=64))
    with pytest.raises(LossmaskError, match="--num-shards and --shard-index do not apply"):
        prepare_pairs(PrepareOptions(inputs=[str(src)], tokenizer=str(mypt_tok), out=str(tmp_path / "s"),
                                     render=RenderOptions(format="mypt"), num_shards=2, shard_index=0))
    assert not (tmp_path / "s").exists()
    from lossmask.cli import main

    assert main(["prepare", str(src), "--tokenizer", str(mypt_tok), "--out", str(tmp_path / "r"), "--pairs",
                 "--format", "mypt", "--num-shards", "2", "--backend", "ray"]) == 1
    assert not (tmp_path / "r").exists()


def test_sft_dataset_still_opens_as_episodes(tmp_path, mypt_tok):
    src = write(tmp_path / "sft.jsonl", [{"messages": [{"role": "user", "content": "hi"},
                                                       {"role": "assistant", "content": "hello"}]}])
    prepare(PrepareOptions(inputs=[str(src)], tokenizer=str(mypt_tok), out=str(tmp_path / "ds"), val_split=0,
                           render=RenderOptions(format="mypt")), progress=False)
    ds = open_dataset(tmp_path / "ds")
    assert "input_ids" in ds[0] and json.loads((tmp_path / "ds" / "dataset_metadata.json").read_text())["kind"] == "sft"
    with pytest.raises(LossmaskError, match="no split 'val'"):
        open_dataset(tmp_path / "ds", "val")
