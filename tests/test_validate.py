"""validate: a clean dataset passes; each kind of damage or mis-masking is caught and located."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from lossmask.example import Example
from lossmask.render.base import Label
from lossmask.store import METADATA, DatasetWriter, open_dataset
from lossmask.validate import format_report, validate_dataset
from tests.conftest import make_example

INPUTS = ["chats.jsonl"]
STOP = 2  # llama2 </s>


def turn(user: str, answer: str, weight: float = 1.0, stop: str = "</s>") -> list:
    pieces = [("[INST]", Label.TEMPLATE, 0.0), (user, Label.USER, 0.0), ("[/INST]", Label.TEMPLATE, 0.0),
              (answer, Label.ASSISTANT, weight)]
    return pieces + ([(stop, Label.STOP, weight)] if stop else [])


def clean_examples(tok) -> dict[str, list[Example]]:
    system = [("<<SYS>>", Label.TEMPLATE, 0.0), ("Be brief.", Label.SYSTEM, 0.0), ("<</SYS>>", Label.TEMPLATE, 0.0)]
    return {
        "train": [
            make_example(tok, turn("What is 2+2?", "4."), 1),
            make_example(tok, system + turn("Hi", "Hello!") + turn("Bye", "Goodbye.", weight=0.5), 2),
            make_example(tok, turn("Count to ten", "One, two, three", stop=""), 3, truncated=True),
        ],
        "val": [make_example(tok, turn("Capital of France?", "Paris."), 4)],
    }


def write(out: Path, tok, data: dict[str, list[Example]]) -> Path:
    with DatasetWriter(out, tok, inputs=INPUTS) as writer:
        for split, examples in data.items():
            for ex in examples:
                writer.add(split, ex)
        return writer.close({"stop_token_ids": [STOP]})


@pytest.fixture
def dataset(tmp_path, llama2) -> Path:
    return write(tmp_path / "ds", llama2, clean_examples(llama2))


def offset_of(ds_path: Path, episode: int, position: int) -> int:
    index = np.fromfile(ds_path / "train" / "episodes.idx", dtype="<u8").reshape(-1, 2)
    return int(index[episode, 0]) + position


def first_position(example: Example, label: Label) -> int:
    return int(np.flatnonzero(example.labels == label)[0])


def only(report, check: str):
    found = [p for p in report.problems if p.check == check]
    assert len(found) == 1, format_report(report)
    return found[0]


def test_clean_dataset_passes_with_counts(dataset, llama2):
    report = validate_dataset(dataset)
    assert report.ok, format_report(report)
    data = clean_examples(llama2)
    train = report.counts["train"]
    assert train["episodes"] == 3
    assert train["tokens"] == sum(len(e) for e in data["train"])
    assert train["trained_tokens"] == sum(e.trained_tokens for e in data["train"])
    assert train["assistant_turns"] == 4  # 1 + 2 + the open one cut by truncation
    assert train["open_turns_in_truncated_episodes"] == 1
    assert report.counts["val"]["assistant_turns"] == 1
    assert format_report(report).splitlines()[0] == f"{dataset}: OK"


def test_trained_user_token_is_caught_where_it_is(dataset, llama2):
    example = clean_examples(llama2)["train"][1]
    position = first_position(example, Label.USER)
    mask = dataset / "train" / "mask.bin"
    data = bytearray(mask.read_bytes())
    data[offset_of(dataset, 1, position)] = 1
    mask.write_bytes(bytes(data))
    report = validate_dataset(dataset)
    problem = only(report, "mask_direction")
    assert (problem.file, problem.episode, problem.position) == ("train/mask.bin", 1, position)
    assert "labelled USER, which is never trained" in problem.message
    assert only(report, "checksum").file == "train/mask.bin"
    # episode 1 is weighted (0.5), so the split has weights.bin and the mask now disagrees with it
    assert only(report, "mask_weights").position == position
    text = format_report(report)
    assert f"train/mask.bin episode 1 position {position} (offset {offset_of(dataset, 1, position)})" in text


def test_flipped_bytes_in_tokens_are_caught(dataset):
    tokens = dataset / "train" / "tokens.bin"
    data = bytearray(tokens.read_bytes())
    at = offset_of(dataset, 0, 2)
    data[4 * at + 3] ^= 0x7F  # high byte of a uint32 id: far outside the vocabulary
    tokens.write_bytes(bytes(data))
    report = validate_dataset(dataset)
    assert only(report, "checksum").file == "train/tokens.bin"
    problem = only(report, "vocabulary")
    assert (problem.episode, problem.position) == (0, 2)
    assert "outside the tokenizer's vocabulary of 32000" in problem.message


def test_truncated_labels_file_is_caught(dataset):
    labels = dataset / "train" / "labels.bin"
    labels.write_bytes(labels.read_bytes()[:-3])
    report = validate_dataset(dataset)
    problem = only(report, "size")
    assert problem.file == "train/labels.bin" and "truncated or modified" in problem.message
    assert any("token checks skipped" in note for note in report.notes)
    assert "val" in report.counts and "train" not in report.counts


def test_deleted_index_is_caught(dataset):
    (dataset / "train" / "episodes.idx").unlink()
    report = validate_dataset(dataset)
    assert only(report, "missing").file == "train/episodes.idx"
    assert not report.ok


def test_replaced_tokenizer_is_caught(dataset, qwen3):
    shutil.rmtree(dataset / "tokenizer")
    qwen3.save_pretrained(str(dataset / "tokenizer"))
    report = validate_dataset(dataset)
    messages = [p.message for p in report.problems if p.check == "tokenizer"]
    assert len(messages) == 3, messages  # vocabulary, chat template and size all differ
    assert messages[0].startswith("tokenizer_sha256 is")
    assert "the stored tokenizer was replaced or changed" in messages[0]
    assert messages[2].startswith(f"vocab_size is {len(qwen3)} but the token ids were made by a tokenizer with 32000")


def test_edited_tokenizer_vocabulary_is_caught(dataset):
    path = dataset / "tokenizer" / "tokenizer.json"
    config = json.loads(path.read_text())
    config["model"]["vocab"]["<new_piece>"] = len(config["model"]["vocab"])
    path.write_text(json.dumps(config))
    messages = [p.message for p in validate_dataset(dataset).problems if p.check == "tokenizer"]
    assert [m.split(" ")[0] for m in messages] == ["tokenizer_sha256", "vocab_size"]


def test_missing_tokenizer_is_caught(dataset):
    shutil.rmtree(dataset / "tokenizer")
    assert only(validate_dataset(dataset), "tokenizer").message == "the stored tokenizer is missing"


def test_assistant_turn_without_stop_is_caught(tmp_path, llama2):
    good = make_example(llama2, turn("Hi", "Hello!"), 1)
    no_stop = make_example(llama2, turn("Hi", "Hello!", stop="") + turn("More", "Sure."), 2)
    out = write(tmp_path / "ds", llama2, {"train": [good, no_stop]})
    report = validate_dataset(out)
    problem = only(report, "turn_end")
    first_answer = first_position(no_stop, Label.ASSISTANT)
    second_header = first_answer + int(np.flatnonzero(no_stop.labels[first_answer:] == Label.TEMPLATE)[0])
    last_answer = second_header - 1
    assert (problem.file, problem.episode, problem.position) == ("train/labels.bin", 1, last_answer)
    assert f"tokens {first_answer}..{last_answer} of the episode" in problem.message
    assert "labelled ASSISTANT, not a trained stop token" in problem.message
    assert report.counts["train"]["assistant_turns"] == 3


def test_stop_label_on_a_token_that_is_not_a_stop_id_is_caught(tmp_path, llama2):
    wrong = make_example(llama2, turn("Hi", "Hello!", stop="END"), 1)
    out = write(tmp_path / "ds", llama2, {"train": [wrong]})
    problem = only(validate_dataset(out), "turn_end")
    assert problem.position == len(wrong) - 1
    assert f"ends with token {int(wrong.input_ids[-1])} labelled STOP" in problem.message


def test_corrupt_weights_are_caught(dataset):
    path = dataset / "train" / "weights.bin"
    weights = np.fromfile(path, dtype="<f4")
    trained = np.flatnonzero(weights > 0)
    weights[trained[0]] = np.nan
    weights[trained[1]] = 0.0
    weights.tofile(path)
    report = validate_dataset(dataset)
    assert only(report, "weights").offset == trained[0]
    mismatch = [p.offset for p in report.problems if p.check == "mask_weights"]
    assert mismatch == [trained[0], trained[1]]


def test_missing_or_broken_metadata_is_reported_not_raised(dataset):
    (dataset / METADATA).write_text("[1, 2")
    problem = only(validate_dataset(dataset), "metadata")
    assert problem.file == METADATA and "not valid JSON" in problem.message
    (dataset / METADATA).unlink()
    assert "is missing" in only(validate_dataset(dataset), "metadata").message


def test_unexpected_and_missing_extra_files(dataset):
    (dataset / "train" / "notes.txt").write_text("hi")
    meta = json.loads((dataset / METADATA).read_text())
    meta["files"]["rejects.jsonl"] = {"bytes": 3, "sha256": "0" * 64}
    (dataset / METADATA).write_text(json.dumps(meta))
    report = validate_dataset(dataset)
    assert only(report, "unexpected").file == "train/notes.txt"
    assert only(report, "missing").file == "rejects.jsonl"


def test_many_problems_are_capped_and_counted(dataset):
    mask = dataset / "train" / "mask.bin"
    labels = np.fromfile(dataset / "train" / "labels.bin", dtype=np.uint8)
    data = np.fromfile(mask, dtype=np.uint8)
    never = np.isin(labels, [Label.USER, Label.SYSTEM])
    data[never] = 1
    data.tofile(mask)
    report = validate_dataset(dataset, max_per_check=3)
    listed = [p for p in report.problems if p.check == "mask_direction"]
    assert len(listed) == 3
    assert report.suppressed["train/mask_direction"] == int(never.sum()) - 3
    assert f"... and {int(never.sum()) - 3} more train/mask_direction problems" in format_report(report)


def test_packed_dataset_validates_and_segment_damage_is_caught(dataset, tmp_path):
    from lossmask.pack import pack_dataset

    packed = tmp_path / "packed"
    pack_dataset(dataset, packed, block_size=64)
    report = validate_dataset(packed)
    assert report.ok, format_report(report)
    assert report.counts["train"]["blocks"] == len(open_dataset(packed))
    assert report.counts["train"]["assistant_turns"] == 4
    segments = np.fromfile(packed / "train" / "segments.bin", dtype="<u4")
    padding = int(np.flatnonzero(segments == 0)[0])
    segments[padding] = 1
    segments.tofile(packed / "train" / "segments.bin")
    problem = only(validate_dataset(packed), "segments")
    assert problem.episode is None and problem.block == padding // 64 and problem.position == padding % 64
    assert "segment id 1, expected 0 (padding)" in problem.message
