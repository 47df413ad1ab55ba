"""Corruption detection: flipped bytes, truncated and deleted files, a replaced tokenizer, a rewritten index.

``open_dataset`` always checks sizes against dataset_metadata.json and the index structure; with ``verify=True``
every sha256 too. ``validate_dataset`` does all of that plus the tokenizer identity and the token checks. A
damaged dataset must be refused with a message naming the file; a dataset that opens must read exactly the
data it was written with.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from lossmask.errors import LossmaskError
from lossmask.mask import MaskOptions
from lossmask.prepare import PrepareOptions, prepare
from lossmask.render import RenderOptions
from lossmask.store import METADATA, load_tokenizer_of, open_dataset
from lossmask.tokenizer import load_tokenizer, tokenizer_identity
from lossmask.validate import validate_dataset
from tests.reliability.common import Tally, build_tokenizer, fuzz_settings, no_hang, write_jsonl

SPLIT_FILES = ["tokens.bin", "mask.bin", "weights.bin", "labels.bin", "episodes.idx", "sources.idx", "flags.bin"]


def episode(i: int) -> dict:
    messages = [{"role": "user", "content": f"Question {i}?"}, {"role": "assistant", "content": f"Answer {i}. " * 3}]
    if i % 3 == 0:
        messages += [{"role": "user", "content": "More?"}, {"role": "assistant", "content": "No.", "weight": 0.5}]
    return {"system": "Be terse.", "messages": messages}


@pytest.fixture(scope="module")
def made(tmp_path_factory) -> Path:
    """An unpacked dataset with weights.bin and a val split, and a packed one, with the tiny tokenizer."""
    root = tmp_path_factory.mktemp("corrupt")
    build_tokenizer(root / "tok")
    data = write_jsonl(root / "in.jsonl", [episode(i) for i in range(60)])
    render = RenderOptions(format="mypt")
    for name, pack in (("plain", None), ("packed", 128)):
        prepare(PrepareOptions([str(data)], str(root / "tok"), str(root / name), render=render, val_split=0.2,
                               pack=pack, mask=MaskOptions()), progress=False)
    build_tokenizer(root / "other-tok-build")  # a second tokenizer: same files, another identity once changed
    config = json.loads((root / "other-tok-build" / "tokenizer.json").read_text())
    config["added_tokens"][-1]["content"] = "<myPT_changed>"
    (root / "other-tok-build" / "tokenizer.json").write_text(json.dumps(config))
    return root


@pytest.fixture
def ds(made, tmp_path, request) -> Path:
    kind = getattr(request, "param", "plain")
    shutil.copytree(made / kind, tmp_path / kind)
    return tmp_path / kind


def items(path: Path, split: str) -> list[tuple]:
    dataset = open_dataset(path, split)
    return [(e["input_ids"].tolist(), e["loss_mask"].tolist(), e["labels"].tolist(), e["source"], e["truncated"])
            for e in (dataset.episode(i) for i in range(dataset.num_episodes))]


def problems(path: Path) -> list[str]:
    report = validate_dataset(path)
    return [f"[{p.check}] {p}" for p in report.problems]


def flip(path: Path, at: float = 0.5) -> None:
    data = bytearray(path.read_bytes())
    i = int(len(data) * at)
    data[i] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("name", SPLIT_FILES)
def test_a_flipped_byte_in_any_split_file_is_refused_by_checksum(ds, name):
    flip(ds / "train" / name)
    with pytest.raises(LossmaskError, match=rf"train/{name}: sha256 does not match"):
        open_dataset(ds, "train", verify=True)
    assert any(f"[checksum] train/{name}" in p for p in problems(ds))


@pytest.mark.parametrize("ds", ["packed"], indirect=True)
@pytest.mark.parametrize("name", ["segments.bin", "blocks.idx", "tokens.bin"])
def test_a_flipped_byte_in_a_packed_split_is_refused(ds, name):
    flip(ds / "train" / name, at=0.3)
    with pytest.raises(LossmaskError, match=rf"train/{name}: sha256"):
        open_dataset(ds, "train", verify=True)
    assert any(f"[checksum] train/{name}" in p for p in problems(ds))


@pytest.mark.parametrize("name", SPLIT_FILES)
@pytest.mark.parametrize("cut", ["one byte", "half", "empty", "one byte more"])
def test_a_truncated_or_grown_file_is_refused_by_size(ds, name, cut):
    path = ds / "train" / name
    data = path.read_bytes()
    path.write_bytes({"one byte": data[:-1], "half": data[: len(data) // 2], "empty": b"",
                      "one byte more": data + b"\0"}[cut])
    with pytest.raises(LossmaskError, match=rf"train/{name}: file is \d+ bytes but should be {len(data)}"):
        open_dataset(ds, "train")
    assert any(f"[size] train/{name}" in p for p in problems(ds))


@pytest.mark.parametrize("name", ["episodes.idx", "tokens.bin", "sources.idx"])
def test_a_deleted_file_is_refused(ds, name):
    (ds / "train" / name).unlink()
    with pytest.raises(LossmaskError, match=rf"train/{name}: file is missing"):
        open_dataset(ds, "train")
    assert any(f"[missing] train/{name}" in p for p in problems(ds))


def test_a_deleted_or_damaged_metadata_file_is_refused(ds):
    meta = (ds / METADATA).read_text()
    (ds / METADATA).write_text(meta[: len(meta) // 2])
    with pytest.raises(LossmaskError, match="is not valid JSON"):
        open_dataset(ds)
    (ds / METADATA).unlink()
    with pytest.raises(LossmaskError, match="is missing.*not a complete lossmask dataset"):
        open_dataset(ds)
    assert problems(ds) and "[metadata]" in problems(ds)[0]


def test_a_count_changed_in_the_metadata_is_refused(ds):
    meta = json.loads((ds / METADATA).read_text())
    meta["splits"]["train"]["episodes"] += 1
    (ds / METADATA).write_text(json.dumps(meta))
    with pytest.raises(LossmaskError, match="train/episodes.idx: listed as"):
        open_dataset(ds, "train")


def test_a_consistently_rewritten_index_is_refused(ds):
    """Episodes swapped in the index and the checksums updated to match: the structure check still refuses it."""
    import hashlib

    path = ds / "train" / "episodes.idx"
    index = np.fromfile(path, dtype="<u8").reshape(-1, 2)
    index[[0, 1]] = index[[1, 0]]
    index.tofile(path)
    meta = json.loads((ds / METADATA).read_text())
    meta["files"]["train/episodes.idx"]["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
    (ds / METADATA).write_text(json.dumps(meta))
    with pytest.raises(LossmaskError, match="episode .*(overlap|back to back)"):
        open_dataset(ds, "train", verify=True)
    assert any("[index] train/episodes.idx" in p for p in problems(ds))


def test_a_file_added_to_a_split_is_reported(ds):
    (ds / "train" / "extra.bin").write_bytes(b"x")
    assert any("[unexpected] train/extra.bin" in p for p in problems(ds))


def swap_tokenizer(ds: Path, made: Path) -> None:
    shutil.copyfile(made / "other-tok-build" / "tokenizer.json", ds / "tokenizer" / "tokenizer.json")


def test_a_replaced_tokenizer_is_reported_by_validate(ds, made):
    swap_tokenizer(ds, made)
    found = [p for p in problems(ds) if p.startswith("[tokenizer]")]
    assert found and "tokenizer_sha256" in found[0] and "replaced or changed" in found[0]


def test_a_tokenizer_that_lost_its_special_tokens_is_reported_by_validate(ds):
    (ds / "tokenizer" / "tokenizer_config.json").unlink()  # same vocabulary, but no eos and pad any more
    assert any(p.startswith("[tokenizer]") and "eos_token is None" in p for p in problems(ds)), problems(ds)


def test_a_deleted_tokenizer_is_reported_by_validate(ds):
    shutil.rmtree(ds / "tokenizer")
    assert any(p.startswith("[tokenizer]") and "missing" in p for p in problems(ds))


def test_open_dataset_verify_refuses_a_replaced_tokenizer(ds, made):
    swap_tokenizer(ds, made)
    with pytest.raises(LossmaskError, match="tokenizer"):
        open_dataset(ds, "train", verify=True)


def test_loading_the_stored_tokenizer_refuses_a_replaced_one(ds, made):
    swap_tokenizer(ds, made)
    with pytest.raises(LossmaskError, match="tokenizer"):
        load_tokenizer_of(ds)


# -- fuzzing the reader --------------------------------------------------------------------------------------------
MUTATIONS = ("flip bytes", "truncate", "append", "overwrite with random bytes", "delete")


@st.composite
def corruption(draw, files: list[str]):
    name = draw(st.sampled_from(files))
    kind = draw(st.sampled_from(MUTATIONS))
    return name, kind, draw(st.randoms(use_true_random=False))


def corrupt(path: Path, kind: str, rng) -> bool:
    """Apply one mutation; False when it left the bytes as they were."""
    data = path.read_bytes()
    if kind == "delete":
        path.unlink()
        return True
    if kind == "flip bytes" and data:
        new = bytearray(data)
        for _ in range(rng.randint(1, 8)):
            new[rng.randrange(len(new))] ^= 1 << rng.randrange(8)
    elif kind == "truncate":
        new = data[: rng.randrange(len(data) + 1)]
    elif kind == "append":
        new = data + bytes(rng.randrange(256) for _ in range(rng.randint(1, 64)))
    else:
        new = bytes(rng.randrange(256) for _ in range(len(data)))
    path.write_bytes(bytes(new))
    return bytes(new) != data


@pytest.mark.parametrize("kind", ["plain", "packed"])
def test_fuzz_corrupted_datasets_are_refused_or_read_exactly(made, tmp_path_factory, kind):
    source = made / kind
    files = sorted(str(p.relative_to(source)) for p in source.rglob("*") if p.is_file())
    splits = sorted(json.loads((source / METADATA).read_text())["splits"])
    original = {split: items(source, split) for split in splits}
    tally = Tally("fuzz: dataset reader on corrupted files", f"open_dataset + validate ({kind})")
    identity = tokenizer_identity(load_tokenizer(str(source / "tokenizer")))

    def same_tokenizer(ds: Path) -> bool:
        reloaded = tokenizer_identity(load_tokenizer(str(ds / "tokenizer")))
        return all(reloaded[k] == identity[k] for k in identity if k != "name_or_path")

    @fuzz_settings(scale=1.5)
    @given(corruption(files))
    def check(case):
        name, how, rng = case
        ds = tmp_path_factory.mktemp("fuzzed") / kind
        shutil.copytree(source, ds)
        changed = corrupt(ds / name, how, rng)
        tally(f"mutation: {how}")
        with no_hang():
            refused = False
            for split in splits:
                try:
                    dataset = open_dataset(ds, split, verify=True)
                    read = [(e["input_ids"].tolist(), e["loss_mask"].tolist(), e["labels"].tolist(), e["truncated"])
                            for e in (dataset.episode(i) for i in range(dataset.num_episodes))]
                except LossmaskError as exc:
                    assert str(ds) in str(exc) or METADATA in str(exc) or "tokenizer" in str(exc), str(exc)
                    refused = True
                    continue
                expected = [(ids, mask, labels, truncated) for ids, mask, labels, _, truncated in original[split]]
                assert read == expected, f"{name} ({how}): open_dataset(verify=True) read other data than was written"
                try:  # the cheap open (sizes, index) must never crash either: refuse, or read something
                    plain = open_dataset(ds, split)
                    assert all(len(plain[i]["input_ids"]) for i in range(len(plain)))
                except LossmaskError:
                    pass
            report = validate_dataset(ds)
        if changed and name.startswith("tokenizer/") and report.ok:  # e.g. whitespace appended to tokenizer.json
            assert same_tokenizer(ds), f"validate accepted a changed tokenizer ({name} after '{how}')"
        elif changed and name != METADATA:
            assert not report.ok, f"validate accepted {name} after '{how}'"
        if refused or not report.ok:
            tally("refused with a message naming the file")
        elif not changed:
            tally("no change")
        else:
            tally("accepted: a change that leaves every item and the tokenizer identical")

    check()
    tally.write(inputs=sum(v for k, v in tally.counts.items() if k.startswith("mutation")))
