"""The binary store: exact round trips, deterministic bytes, atomic writes, and refusing damaged data."""
from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest

from lossmask.episode import Source
from lossmask.errors import LossmaskError
from lossmask.example import Example
from lossmask.render.base import Label
from lossmask.store import METADATA, DatasetWriter, load_tokenizer_of, open_dataset, read_metadata
from lossmask.tokenizer import tokenizer_identity
from tests.conftest import make_example

INPUTS = ["chats.jsonl", "more.jsonl"]


def chat(tok, user: str, answer: str, line: int, weight: float = 1.0, file: str = "chats.jsonl") -> Example:
    return make_example(
        tok,
        [("[INST]", Label.TEMPLATE, 0.0), (user, Label.USER, 0.0), ("[/INST]", Label.TEMPLATE, 0.0),
         (answer, Label.ASSISTANT, weight), ("</s>", Label.STOP, weight)],
        file=file, line=line,
    )


def sample(tok, weight: float = 1.0) -> dict[str, list[Example]]:
    return {
        "train": [
            chat(tok, "What is 2+2?", "It is 4.", 1),
            chat(tok, "Name a colour.", "Blue.", 2, weight=weight),
            chat(tok, "Say hi", "Hi!", 7, file="more.jsonl"),
        ],
        "val": [chat(tok, "Capital of France?", "Paris.", 3)],
    }


def write(out: Path, tok, data: dict[str, list[Example]], force: bool = False, meta: dict | None = None) -> Path:
    with DatasetWriter(out, tok, force=force, inputs=INPUTS) as writer:
        for split, examples in data.items():
            for ex in examples:
                writer.add(split, ex)
        return writer.close(meta if meta is not None else {"stop_token_ids": [2]})


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def test_round_trip_gives_the_exact_arrays(tmp_path, llama2):
    data = sample(llama2)
    out = write(tmp_path / "ds", llama2, data)
    assert out == tmp_path / "ds"
    for split, examples in data.items():
        ds = open_dataset(out, split, verify=True)
        assert len(ds) == len(examples)
        for i, ex in enumerate(examples):
            item = ds[i]
            assert item["input_ids"].dtype == np.uint32 and item["loss_mask"].dtype == np.float32
            np.testing.assert_array_equal(item["input_ids"], ex.input_ids)
            np.testing.assert_array_equal(item["loss_mask"], ex.weights)
            np.testing.assert_array_equal(item["labels"], ex.labels)
            assert item["source"] == (ex.source.file, ex.source.line)
            assert item["truncated"] is False
    train = open_dataset(out)
    assert llama2.decode(train[-1]["input_ids"].tolist()) == "[INST] Say hi [/INST] Hi!</s>"
    assert [item["source"] for item in train[1:]] == [("chats.jsonl", 2), ("more.jsonl", 7)]
    with pytest.raises(IndexError):
        train[3]
    with pytest.raises(IndexError):
        train[-4]
    meta = read_metadata(out)
    entry = meta["splits"]["train"]
    assert entry["episodes"] == 3
    assert entry["tokens"] == sum(len(e) for e in data["train"])
    assert entry["trained_tokens"] == sum(e.trained_tokens for e in data["train"])
    assert entry["weighted"] is False
    assert meta["inputs"] == INPUTS and meta["stop_token_ids"] == [2]
    assert meta["tokenizer"] == tokenizer_identity(llama2)
    assert meta["files"]["train/tokens.bin"]["bytes"] == 4 * entry["tokens"]


def test_stored_tokenizer_reloads_to_the_same_tokenizer(tmp_path, llama2):
    out = write(tmp_path / "ds", llama2, sample(llama2))
    stored = load_tokenizer_of(out)
    assert tokenizer_identity(stored)["tokenizer_sha256"] == tokenizer_identity(llama2)["tokenizer_sha256"]
    # transformers' own save/reload changes how text after a special token is split for this tokenizer
    for text in ("a</s>b", "<s>hi", "hello world"):
        expected = llama2(text, add_special_tokens=False)["input_ids"]
        assert stored(text, add_special_tokens=False)["input_ids"] == expected


def test_weights_file_only_when_a_trained_weight_is_not_one(tmp_path, llama2):
    binary = write(tmp_path / "binary", llama2, sample(llama2))
    assert not (binary / "train" / "weights.bin").exists()
    weighted = write(tmp_path / "weighted", llama2, sample(llama2, weight=0.5))
    assert (weighted / "train" / "weights.bin").exists() and not (weighted / "val" / "weights.bin").exists()
    ds = open_dataset(weighted)
    mask = ds[1]["loss_mask"]
    assert set(np.unique(mask).tolist()) == {0.0, 0.5}
    assert read_metadata(weighted)["splits"]["train"]["weighted"] is True
    mask_bytes = np.fromfile(weighted / "train" / "mask.bin", dtype=np.uint8)
    np.testing.assert_array_equal(mask_bytes, np.concatenate([e.weights > 0 for e in sample(llama2, 0.5)["train"]]))


def test_two_identical_runs_give_identical_bytes(tmp_path, llama2):
    a = write(tmp_path / "a" / "ds", llama2, sample(llama2, weight=0.5))
    b = write(tmp_path / "b" / "ds", llama2, sample(llama2, weight=0.5))
    files_a = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    files_b = sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    assert files_a == files_b and Path(METADATA) in files_a and Path("tokenizer/tokenizer.json") in files_a
    for rel in files_a:
        assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel
    assert str(tmp_path) not in (a / METADATA).read_text()


def test_refuses_to_overwrite_without_force(tmp_path, llama2):
    out = write(tmp_path / "ds", llama2, sample(llama2))
    before = (out / METADATA).read_bytes()
    with pytest.raises(LossmaskError, match="already exists; pass --force"):
        write(out, llama2, {"train": sample(llama2)["train"][:1]})
    assert (out / METADATA).read_bytes() == before
    write(out, llama2, {"train": sample(llama2)["train"][:1]}, force=True)
    assert read_metadata(out)["splits"]["train"]["episodes"] == 1
    assert not (out / "val").exists()
    assert leftovers(tmp_path) == []


def test_force_never_replaces_a_directory_that_is_not_a_dataset(tmp_path, llama2):
    target = tmp_path / "mine"
    target.mkdir()
    (target / "notes.txt").write_text("keep me")
    with pytest.raises(LossmaskError, match="not a lossmask dataset"):
        write(target, llama2, sample(llama2), force=True)
    assert (target / "notes.txt").read_text() == "keep me"


def test_exception_inside_with_leaves_no_dataset_and_no_temp(tmp_path, llama2):
    out = tmp_path / "ds"
    with pytest.raises(RuntimeError, match="boom"):
        with DatasetWriter(out, llama2, inputs=INPUTS) as writer:
            writer.add("train", sample(llama2)["train"][0])
            assert any(p.name.startswith(".ds.tmp-") for p in tmp_path.iterdir())
            raise RuntimeError("boom")
    assert not out.exists()
    assert leftovers(tmp_path) == []


def test_failed_replacement_keeps_the_old_dataset(tmp_path, llama2):
    out = write(tmp_path / "ds", llama2, sample(llama2))
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    with pytest.raises(RuntimeError):
        with DatasetWriter(out, llama2, force=True, inputs=INPUTS) as writer:
            writer.add("train", sample(llama2)["train"][0])
            raise RuntimeError("crash before close")
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert leftovers(tmp_path) == []


def test_leaving_with_without_close_writes_nothing(tmp_path, llama2):
    with pytest.raises(LossmaskError, match="without close"):
        with DatasetWriter(tmp_path / "ds", llama2, inputs=INPUTS) as writer:
            writer.add("train", sample(llama2)["train"][0])
    assert list(tmp_path.iterdir()) == []


def test_stale_temp_of_a_crashed_writer_is_cleaned(tmp_path, llama2):
    stale = tmp_path / ".ds.tmp-999999"
    (stale / "train").mkdir(parents=True)
    write(tmp_path / "ds", llama2, sample(llama2))
    assert leftovers(tmp_path) == []


def test_second_concurrent_writer_is_refused(tmp_path, llama2):
    out = tmp_path / "ds"
    with DatasetWriter(out, llama2, inputs=INPUTS) as first:
        with pytest.raises(LossmaskError, match="another process is writing"):
            DatasetWriter(out, llama2, inputs=INPUTS)
        first.add("train", sample(llama2)["train"][0])
        first.close({})
    write(out, llama2, sample(llama2), force=True)  # the lock was released
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize(
    "example, message",
    [
        (Example(np.array([1, 2], np.uint32), np.array([0, np.nan], np.float32), np.array([3, 5], np.uint8),
                 Source("chats.jsonl", 4)), "chats.jsonl:4: loss weights must be finite"),
        (Example(np.array([1, 2], np.uint32), np.array([0.0], np.float32), np.array([3, 5], np.uint8),
                 Source("chats.jsonl", 5)), "2 tokens but 1 weights"),
        (Example(np.array([1], np.uint32), np.array([1.0], np.float32), np.array([5], np.uint8),
                 Source("other.jsonl", 1)), "not in the writer's inputs"),
        (Example(np.array([], np.uint32), np.array([], np.float32), np.array([], np.uint8),
                 Source("chats.jsonl", 6)), "empty example"),
    ],
)
def test_add_refuses_bad_examples(tmp_path, llama2, example, message):
    with pytest.raises(LossmaskError, match=message):
        with DatasetWriter(tmp_path / "ds", llama2, inputs=INPUTS) as writer:
            writer.add("train", example)
    assert list(tmp_path.iterdir()) == []


def test_close_refuses_metadata_keys_it_owns_and_empty_datasets(tmp_path, llama2):
    with pytest.raises(LossmaskError, match=r"\['splits'\] are written by the DatasetWriter"):
        write(tmp_path / "ds", llama2, sample(llama2), meta={"splits": {}})
    with pytest.raises(LossmaskError, match="no episodes were added"):
        write(tmp_path / "ds", llama2, {})
    assert list(tmp_path.iterdir()) == []


def test_metadata_inputs_may_carry_details_but_must_match(tmp_path, llama2):
    detailed = [{"path": name, "bytes": 10} for name in INPUTS]
    out = write(tmp_path / "ds", llama2, sample(llama2), meta={"inputs": detailed})
    assert read_metadata(out)["inputs"] == detailed
    assert open_dataset(out)[2]["source"] == ("more.jsonl", 7)
    with pytest.raises(LossmaskError, match="does not match the writer's inputs"):
        write(tmp_path / "other", llama2, sample(llama2), meta={"inputs": ["x.jsonl", "more.jsonl"]})


def test_extra_files_are_checksummed(tmp_path, llama2):
    with DatasetWriter(tmp_path / "ds", llama2, inputs=INPUTS) as writer:
        writer.add("train", sample(llama2)["train"][0])
        writer.add_file("rejects.jsonl", '{"line": 9}\n')
        with pytest.raises(LossmaskError, match="reserved or duplicate"):
            writer.add_file("train", "x")
        out = writer.close({})
    assert (out / "rejects.jsonl").read_text() == '{"line": 9}\n'
    assert read_metadata(out)["files"]["rejects.jsonl"]["bytes"] == 12


@pytest.fixture
def dataset(tmp_path, llama2) -> Path:
    return write(tmp_path / "ds", llama2, sample(llama2))


def test_open_refuses_a_truncated_token_file(dataset):
    path = dataset / "train" / "tokens.bin"
    path.write_bytes(path.read_bytes()[:-4])
    with pytest.raises(LossmaskError, match=r"train/tokens\.bin: file is .*truncated or modified"):
        open_dataset(dataset)
    assert len(open_dataset(dataset, "val")) == 1  # the other split is fine


def test_open_refuses_a_missing_index(dataset):
    (dataset / "train" / "episodes.idx").unlink()
    with pytest.raises(LossmaskError, match=r"train/episodes\.idx: file is missing"):
        open_dataset(dataset)


def test_open_refuses_an_index_past_the_tokens(dataset):
    path = dataset / "train" / "episodes.idx"
    index = np.fromfile(path, dtype="<u8").reshape(-1, 2)
    index[2, 1] += 1
    index.tofile(path)
    with pytest.raises(LossmaskError, match=r"train/episodes\.idx episode 2: .*reaches past"):
        open_dataset(dataset)


def test_open_refuses_overlapping_episodes(dataset):
    path = dataset / "train" / "episodes.idx"
    index = np.fromfile(path, dtype="<u8").reshape(-1, 2)
    index[1, 0] -= 1
    index.tofile(path)
    with pytest.raises(LossmaskError, match=r"train/episodes\.idx episode 1: .*before the previous one ends"):
        open_dataset(dataset)


def test_verify_catches_modified_bytes_that_sizes_do_not(dataset):
    path = dataset / "train" / "labels.bin"
    data = bytearray(path.read_bytes())
    data[3] ^= 0xFF
    path.write_bytes(bytes(data))
    assert len(open_dataset(dataset)) == 3
    with pytest.raises(LossmaskError, match=r"train/labels\.bin: sha256 does not match"):
        open_dataset(dataset, verify=True)


def test_open_explains_missing_metadata_and_unknown_split(dataset):
    with pytest.raises(LossmaskError, match="has no split 'test' \\(it has: train, val\\)"):
        open_dataset(dataset, "test")
    (dataset / METADATA).write_text("{not json")
    with pytest.raises(LossmaskError, match="dataset_metadata.json is not valid JSON"):
        open_dataset(dataset)
    (dataset / METADATA).unlink()
    with pytest.raises(LossmaskError, match="dataset_metadata.json is missing"):
        open_dataset(dataset)


def test_dataset_pickles_without_its_data(dataset):
    ds = open_dataset(dataset)
    first = ds[0]
    blob = pickle.dumps(ds)
    assert len(blob) < 4096 + len(json.dumps(ds.metadata))
    again = pickle.loads(blob)
    np.testing.assert_array_equal(again[0]["input_ids"], first["input_ids"])
    assert again.tokenizer_path == dataset / "tokenizer" and os.path.isdir(again.tokenizer_path)


def test_replacement_without_atomic_exchange_still_ends_complete(tmp_path, llama2, monkeypatch):
    """Where renameat2 is unavailable the old dataset is moved aside, the new one moved in, the old removed."""
    import lossmask.store as store

    out = write(tmp_path / "ds", llama2, sample(llama2))
    monkeypatch.setattr(store, "_exchange", lambda a, b: False)
    write(out, llama2, {"train": sample(llama2)["train"][:2]}, force=True)
    assert len(open_dataset(out, verify=True)) == 2 and not (out / "val").exists()
    assert leftovers(tmp_path) == []


def test_a_dataset_moved_aside_by_a_crashed_replacement_is_restored(tmp_path, llama2):
    out = write(tmp_path / "ds", llama2, sample(llama2))
    out.rename(tmp_path / ".ds.old-4242")  # crash between the two renames of the fallback
    with pytest.raises(LossmaskError, match="already exists"):
        write(out, llama2, sample(llama2))
    assert len(open_dataset(out)) == 3 and leftovers(tmp_path) == []


def test_tokenizer_changed_in_memory_is_stored_with_its_change(tmp_path, qwen3):
    from lossmask.tokenizer import load_tokenizer

    tok = load_tokenizer(qwen3.name_or_path)  # a private copy: the session fixture stays untouched
    tok.add_tokens(["<new_tag>"], special_tokens=True)
    example = Example(np.array([len(tok) - 1], np.uint32), np.array([1.0], np.float32), np.array([5], np.uint8),
                      Source("chats.jsonl", 1))
    write(tmp_path / "ds", tok, {"train": [example]})
    stored = load_tokenizer_of(tmp_path / "ds")
    assert stored.convert_tokens_to_ids("<new_tag>") == len(tok) - 1
    assert tokenizer_identity(stored)["tokenizer_sha256"] == tokenizer_identity(tok)["tokenizer_sha256"]


def test_a_tokenizer_that_cannot_be_stored_faithfully_is_refused_before_writing(tmp_path, llama2):
    from lossmask.tokenizer import load_tokenizer

    tok = load_tokenizer(llama2.name_or_path)
    tok.add_tokens(["<new_tag>"])  # the copy lacks it; save_pretrained changes this legacy tokenizer's splitting
    with pytest.raises(LossmaskError, match="does not reload to itself after saving"):
        DatasetWriter(tmp_path / "ds", tok, inputs=INPUTS)
    assert list(tmp_path.iterdir()) == []
