"""Packing: the plan's properties and efficiency, packed datasets on disk, and proof that packed episodes
are isolated inside a real transformers model (same logits and same weighted loss as run alone)."""
from __future__ import annotations

import shutil
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lossmask.episode import Source
from lossmask.errors import LossmaskError
from lossmask.example import Example
from lossmask.pack import IGNORE_INDEX, pack_dataset, pack_examples, packed_labels, packed_model_inputs, plan_packing
from lossmask.render.base import Label
from lossmask.store import DatasetWriter, make_block, open_dataset, read_metadata


def check_plan(plan: list[list[int]], lengths: list[int], block_size: int) -> None:
    flat = sorted(i for block in plan for i in block)
    assert flat == list(range(len(lengths)))  # every episode exactly once
    assert all(block == sorted(block) and block for block in plan)
    assert all(sum(lengths[i] for i in block) <= block_size for block in plan)


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 64).flatmap(lambda b: st.tuples(st.just(b), st.lists(st.integers(1, b), max_size=80))))
def test_plan_places_every_episode_once_within_capacity(case):
    block_size, lengths = case
    plan = plan_packing(lengths, block_size)
    check_plan(plan, lengths, block_size)
    assert plan == plan_packing(list(lengths), block_size)  # deterministic
    lower_bound = -(-sum(lengths) // block_size)
    assert lower_bound <= len(plan) <= max(lower_bound, 2 * lower_bound - 1) + 1


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 16), st.sampled_from("abc")), max_size=60))
def test_plan_with_groups_never_mixes_keys(pairs):
    lengths = [n for n, _ in pairs]
    keys = [k for _, k in pairs]
    plan = plan_packing(lengths, 16, group_keys=keys)
    check_plan(plan, lengths, 16)
    assert all(len({keys[i] for i in block}) == 1 for block in plan)


def test_plan_small_cases_exactly():
    assert plan_packing([3, 3, 2, 2, 1], 4) == [[0, 4], [2, 3], [1]]
    assert plan_packing([3, 3, 2, 2, 1], 4, group_keys=["a", "b", "a", "b", "a"]) == [[0, 4], [2], [1], [3]]
    # ties go to the lowest index; the closing pair fills the block exactly (5 + 3 instead of 5 + 2)
    assert plan_packing([2, 2, 5, 3], 10) == [[0, 2, 3], [1]]
    assert plan_packing([], 8) == []


def test_plan_refuses_episodes_that_do_not_fit():
    with pytest.raises(LossmaskError, match="episode 1 has 9 tokens; a block of 8 holds 1..8"):
        plan_packing([3, 9], 8)
    with pytest.raises(LossmaskError, match="episode 0 has 0 tokens"):
        plan_packing([0], 8)
    with pytest.raises(LossmaskError, match="2 group keys for 3 episodes"):
        plan_packing([1, 2, 3], 8, group_keys=["a", "b"])


def test_short_episodes_pack_at_99_percent():
    lengths = np.random.default_rng(0).integers(20, 41, 3000)
    plan = plan_packing(lengths, 1024)
    check_plan(plan, lengths.tolist(), 1024)
    efficiency = lengths.sum() / (len(plan) * 1024)
    assert efficiency >= 0.99
    assert len(plan) == -(-int(lengths.sum()) // 1024)  # as few blocks as the tokens allow


def test_plan_is_fast_on_many_episodes():
    lengths = np.random.default_rng(1).integers(1, 2049, 200_000)
    start = time.perf_counter()
    plan = plan_packing(lengths, 2048)
    assert time.perf_counter() - start < 20
    assert lengths.sum() / (len(plan) * 2048) > 0.995


def test_packed_labels_mask_untrained_padding_and_every_episode_start():
    ids = np.array([5, 6, 7, 8, 9, 10, 0, 0])
    weights = np.array([1, 1, 0, 2, 1, 1, 0, 0], dtype=np.float32)
    segments = np.array([1, 1, 1, 2, 2, 3, 0, 0])
    assert packed_labels(ids, weights, segments).tolist() == [-100, 6, -100, -100, 9, -100, -100, -100]
    batch = packed_labels(np.stack([ids, ids]), np.stack([weights, weights]), np.stack([segments, segments]))
    assert batch.dtype == np.int64 and batch.shape == (2, 8) and (batch[0] == batch[1]).all()


def example(ids, weights, labels, line: int, file: str = "data.jsonl") -> Example:
    return Example(
        np.asarray(ids, dtype=np.uint32), np.asarray(weights, dtype=np.float32), np.asarray(labels, dtype=np.uint8),
        Source(file, line),
    )


def random_episode(rng, length: int, line: int, weighted: bool, trained_from: int | None = None) -> Example:
    """A prompt (untrained USER) then a trained answer; ``trained_from=0`` trains every token (replay)."""
    cut = rng.integers(1, length - 1) if trained_from is None else trained_from
    weights = np.zeros(length, np.float32)
    weights[cut:] = rng.choice([0.5, 1.0, 2.0], length - cut) if weighted else 1.0
    labels = np.where(np.arange(length) < cut, Label.USER, Label.ASSISTANT)
    return example(rng.integers(3, 128, length), weights, labels, line)


def test_pack_examples_builds_blocks_like_the_store(llama2):
    rng = np.random.default_rng(3)
    episodes = [random_episode(rng, n, i + 1, weighted=False) for i, n in enumerate([5, 7, 3])]
    blocks = pack_examples(episodes, 16, pad_id=1)
    assert len(blocks) == 1
    block = blocks[0]
    assert block["segment_ids"].tolist() == [1] * 5 + [2] * 7 + [3] * 3 + [0]
    assert block["position_ids"].tolist() == [0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 5, 6, 0, 1, 2, 3]
    assert block["input_ids"][-1] == 1 and block["labels"][-1] == Label.PAD and block["loss_mask"][-1] == 0
    np.testing.assert_array_equal(block["input_ids"][5:12], episodes[1].input_ids)
    assert block["sources"] == [("data.jsonl", 1), ("data.jsonl", 2), ("data.jsonl", 3)]
    with pytest.raises(LossmaskError, match="data.jsonl:9: 20 tokens do not fit a block of 16"):
        pack_examples([random_episode(rng, 20, 9, weighted=False)], 16)


# -- packed datasets on disk -------------------------------------------------------------------------------
@pytest.fixture
def unpacked(tmp_path, llama2) -> tuple[Path, list[Example]]:
    rng = np.random.default_rng(7)
    lengths = [30, 12, 25, 70, 9, 33, 18, 40, 6, 21]  # 70 does not fit a block of 64
    episodes = [random_episode(rng, n, i + 1, weighted=i % 3 == 0) for i, n in enumerate(lengths)]
    with DatasetWriter(tmp_path / "src", llama2, inputs=["data.jsonl"]) as writer:
        for ex in episodes[:8]:
            writer.add("train", ex)
        for ex in episodes[8:]:
            writer.add("val", ex)
        writer.close({"stop_token_ids": [2], "note": "carried over"})
    return tmp_path / "src", episodes


def test_pack_dataset_round_trip(unpacked, tmp_path):
    src, episodes = unpacked
    report = pack_dataset(src, tmp_path / "packed", 64)
    by_line = {ex.source.line: ex for ex in episodes}
    train = report.splits["train"]
    assert train.skipped_too_long == [("data.jsonl", 4, 70)] and train.packed_episodes == 7
    assert train.real_tokens == sum(len(e) for e in episodes[:8]) - 70
    assert train.efficiency == train.real_tokens / (train.blocks * 64)
    assert "skipped 1 episodes longer than the block: data.jsonl:4 (70 tokens)" in report.summary()

    ds = open_dataset(tmp_path / "packed", verify=True)
    assert ds.packed and ds.block_size == 64 and len(ds) == train.blocks
    seen = []
    for block in ds:
        expected = make_block([by_line[line] for _, line in block["sources"]], 64, pad_id=2)  # llama2: eos pads
        for key in ("input_ids", "loss_mask", "labels", "segment_ids", "position_ids"):
            np.testing.assert_array_equal(block[key], expected[key], err_msg=key)
        assert block["segment_ids"].dtype == np.int32 and block["position_ids"].dtype == np.int64
        seen += [line for _, line in block["sources"]]
    assert sorted(seen) == [1, 2, 3, 5, 6, 7, 8]
    episode = ds.episode(0)  # packed data can still be read per episode
    np.testing.assert_array_equal(episode["input_ids"], by_line[episode["source"][1]].input_ids)

    meta = read_metadata(tmp_path / "packed")
    assert meta["note"] == "carried over" and meta["stop_token_ids"] == [2]
    assert meta["splits"]["train"]["packed"]["block_size"] == 64
    assert meta["packing"]["splits"]["train"]["skipped_sources"] == [["data.jsonl", 4, 70]]
    assert meta["packing"]["pad_id"] == 2
    assert len(open_dataset(tmp_path / "packed", "val")) == 1


def test_packing_is_byte_identical_whatever_the_source_path(unpacked, tmp_path):
    src, _ = unpacked
    copy = tmp_path / "elsewhere" / "staging-123"
    copy.parent.mkdir()
    shutil.copytree(src, copy)
    a = pack_dataset(src, tmp_path / "a" / "packed", 64).out_dir
    b = pack_dataset(copy, tmp_path / "b" / "packed", 64).out_dir
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    for rel in files:
        assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel
    assert read_metadata(a)["tokenizer"] == read_metadata(src)["tokenizer"]


def test_pack_dataset_groups_and_refusals(unpacked, tmp_path):
    src, _ = unpacked
    keys = ["a", "b", "a", "a", "b", "b", "a", "b"]
    pack_dataset(src, tmp_path / "grouped", 64, group_keys={"train": keys})
    for block in open_dataset(tmp_path / "grouped"):
        assert len({keys[line - 1] for _, line in block["sources"]}) == 1
    with pytest.raises(LossmaskError, match="already packed"):
        pack_dataset(tmp_path / "grouped", tmp_path / "again", 64)
    with pytest.raises(LossmaskError, match=r"group_keys\['train'\] has 2 keys for 8 episodes"):
        pack_dataset(src, tmp_path / "bad", 64, group_keys={"train": ["a", "b"]})
    with pytest.raises(LossmaskError, match=r"group_keys names splits \['test'\]"):
        pack_dataset(src, tmp_path / "bad", 64, group_keys={"test": ["a"]})
    pack_dataset(src, tmp_path / "no_val_keys", 64, group_keys={"train": keys, "test": []})
    with pytest.raises(LossmaskError, match="already exists"):
        pack_dataset(src, tmp_path / "grouped", 64)


# -- isolation inside a real model ------------------------------------------------------------------------
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


@pytest.fixture
def one_thread():
    """Tiny matrices: thread hand-offs cost far more than the math on a busy 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_llama(attn: str):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, attn_implementation=attn,
    )
    return transformers.LlamaForCausalLM(config).eval()


def weighted_sums(logits, labels, weights) -> tuple[float, float]:
    """Σ w·CE and Σ w over next-token predictions: logits[t] predicts labels[t+1] with weight weights[t+1]."""
    targets = labels[1:]
    w = weights[1:] * (targets != IGNORE_INDEX)
    ce = torch.nn.functional.cross_entropy(logits[:-1].double(), targets.clamp(min=0), reduction="none")
    return float((w * ce).sum()), float(w.sum())


def alone(model, ex: Example):
    ids = torch.from_numpy(ex.input_ids.astype(np.int64))[None]
    return model(input_ids=ids, use_cache=False).logits[0]


def episodes_for_block(weighted: bool) -> list[Example]:
    rng = np.random.default_rng(11)
    return [
        random_episode(rng, 9, 1, weighted),
        random_episode(rng, 17, 2, weighted),
        random_episode(rng, 6, 3, weighted, trained_from=0),  # fully trained: its first token is a boundary
        random_episode(rng, 12, 4, weighted),
    ]


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("explicit_mask", [False, True])
@pytest.mark.parametrize("weighted", [False, True])
def test_packed_episodes_match_episodes_run_alone(attn, explicit_mask, weighted, one_thread):
    model = tiny_llama(attn)
    episodes = episodes_for_block(weighted)
    (block,) = pack_examples(episodes, 48, pad_id=0)
    mask_dtype = (torch.bool if attn == "sdpa" else torch.float32) if explicit_mask else None
    inputs = packed_model_inputs(block, mask_dtype=mask_dtype)
    assert ("attention_mask" in inputs) == explicit_mask
    with torch.no_grad():
        packed = model(**{k: v for k, v in inputs.items() if k != "labels"}, use_cache=False).logits[0]
        at = 0
        total, weight = 0.0, 0.0
        for ex in episodes:
            single = alone(model, ex)
            torch.testing.assert_close(packed[at : at + len(ex)], single, atol=1e-5, rtol=0)
            labels = torch.from_numpy(np.where(ex.weights > 0, ex.input_ids.astype(np.int64), IGNORE_INDEX))
            s, w = weighted_sums(single, labels, torch.from_numpy(ex.weights).double())
            total, weight = total + s, weight + w
            at += len(ex)
        s, w = weighted_sums(packed, inputs["labels"][0], torch.from_numpy(block["loss_mask"]).double())
    assert w == pytest.approx(weight, abs=1e-9)  # the same predictions are trained, none across episodes
    assert s / w == pytest.approx(total / weight, abs=1e-5)
    if not weighted:  # transformers' own (unweighted mean) loss agrees when every weight is 1
        with torch.no_grad():
            hf_loss = model(**inputs, use_cache=False).loss
        assert float(hf_loss) == pytest.approx(total / weight, abs=1e-5)


def test_naive_concatenation_is_not_isolated(one_thread):
    """The same comparison fails without restarting positions, boundary labels, or with a KV cache."""
    model = tiny_llama("sdpa")
    episodes = episodes_for_block(weighted=False)
    (block,) = pack_examples(episodes, 48, pad_id=0)
    inputs = packed_model_inputs(block)
    ids = inputs["input_ids"]
    with torch.no_grad():
        naive = model(input_ids=ids, use_cache=False).logits[0]  # positions 0..47, full causal attention
        cached = model(input_ids=ids, position_ids=inputs["position_ids"]).logits[0]  # use_cache defaults on
        second = alone(model, episodes[1])
    start = len(episodes[0])
    assert (naive[start : start + len(second)] - second).abs().max() > 1e-3
    assert (cached[start : start + len(second)] - second).abs().max() > 1e-3
    # labels without the boundary rule let episode 2 predict episode 3's first (trained) token
    naive_labels = np.where(block["loss_mask"] > 0, block["input_ids"].astype(np.int64), IGNORE_INDEX)
    third = len(episodes[0]) + len(episodes[1])
    assert naive_labels[third] != IGNORE_INDEX and inputs["labels"][0, third] == IGNORE_INDEX
