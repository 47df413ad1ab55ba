"""Loss, batching, packed attention and NEFTune, checked on a tiny model against hand computations."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lossmask.train.attention import EXPLICIT_MASK, POSITION_IDS, block_causal_mask, packed_attention_mode
from lossmask.train.config import TrainConfig
from lossmask.train.data import (
    WindowSampler,
    collate,
    eval_micro_batches,
    position_ids_from_segments,
    rank_micro_batches,
)
from lossmask.train.loss import forward_logits, loss_sums, token_loss_sums, window_backward
from lossmask.train.models import build_model
from lossmask.train.neftune import NEFTune

VOCAB = 64


def tiny_model(attn: str = "sdpa", seed: int = 0):
    cfg = TrainConfig(
        hidden_size=32,
        num_layers=2,
        num_heads=4,
        intermediate_size=64,
        vocab_size=VOCAB,
        seed=seed,
        attn_implementation=attn,
    )
    return build_model("tiny", cfg).eval()


def item(ids, mask, segments=None):
    out = {
        "input_ids": np.asarray(ids, np.uint32),
        "loss_mask": np.asarray(mask, np.float32),
        "labels": np.zeros(len(ids), np.uint8),
        "source": "test",
    }
    if segments is not None:
        out["segment_ids"] = np.asarray(segments, np.int32)
    return out


def random_items(n: int, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    items = []
    for _ in range(n):
        length = int(rng.integers(4, 14))
        mask = (rng.random(length) < 0.6).astype(np.float32) * rng.choice([0.5, 1.0, 2.0], length).astype(np.float32)
        items.append(item(rng.integers(0, VOCAB, length), mask))
    return items


def test_collate_shifts_targets_and_weights():
    batch = collate([item([5, 6, 7, 8], [0, 1, 0.5, 1]), item([9, 10], [0, 2])], block_size=16)
    assert batch.input_ids.tolist() == [[5, 6, 7, 8], [9, 10, 0, 0]]
    assert batch.targets.tolist() == [[6, 7, 8, 0], [10, 0, 0, 0]]
    assert batch.weights.tolist() == [[1, 0.5, 1, 0], [2, 0, 0, 0]]
    assert batch.position_ids.tolist() == [[0, 1, 2, 3], [0, 1, 2, 3]]
    assert batch.tokens == 6 and batch.truncated == 0


def test_collate_packed_block_never_targets_an_episode_start():
    # episodes [1,2,3] [4,5] [6] then two padding tokens; every token weighted 1
    block = item([1, 2, 3, 4, 5, 6, 0, 0], [1, 1, 1, 1, 1, 1, 0, 0], [1, 1, 1, 2, 2, 3, 0, 0])
    batch = collate([block], block_size=8)
    assert batch.position_ids.tolist() == [[0, 1, 2, 0, 1, 0, 1, 2]]  # padding continues the last episode
    assert batch.weights.tolist() == [[1, 1, 0, 1, 0, 0, 0, 0]]  # 3->4 and 5->6 cross episodes
    assert batch.episode_lengths.tolist() == [[3, 3, 3, 2, 2, 1, 0, 0]]
    unmasked = collate([block], block_size=8, use_loss_mask=False)
    assert unmasked.weights.tolist() == [[1, 1, 0, 1, 0, 0, 0, 0]]


def test_collate_without_loss_mask_trains_every_real_token():
    batch = collate([item([5, 6, 7], [0, 0, 0]), item([1, 2], [0, 0])], block_size=8, use_loss_mask=False)
    assert batch.weights.tolist() == [[1, 1, 0], [1, 0, 0]]


def test_collate_cuts_to_block_size_and_counts():
    batch = collate([item(range(10), np.ones(10)), item([1, 2], [1, 1])], block_size=4)
    assert batch.input_ids.shape == (2, 4) and batch.truncated == 1


def test_position_ids_restart_per_segment():
    seg = np.array([[1, 1, 2, 2, 2, 3, 0], [1, 1, 1, 1, 1, 1, 1]])
    assert position_ids_from_segments(seg).tolist() == [[0, 1, 0, 1, 2, 0, 1], [0, 1, 2, 3, 4, 5, 6]]


def test_packed_labels_agree_with_store_policy():
    pack = pytest.importorskip("lossmask.pack")
    ids = np.array([1, 2, 3, 4, 5, 6, 0, 0], np.uint32)
    mask = np.array([0, 1, 0.5, 1, 1, 1, 0, 0], np.float32)
    seg = np.array([1, 1, 1, 2, 2, 3, 0, 0], np.int32)
    labels = pack.packed_labels(ids, mask, seg)
    weights = collate([item(ids, mask, seg)], block_size=8).weights[0].numpy()
    assert labels[0] == -100
    assert ((labels[1:] != -100) == (weights[:-1] > 0)).all()


def test_weighted_loss_matches_hand_computation():
    torch.manual_seed(0)
    batch = collate([item([3, 1, 4, 1, 5], [0, 1, 0.5, 0, 2]), item([9, 2, 6], [0, 0, 3])], block_size=8)
    logits = torch.randn(2, 5, VOCAB)
    total, weight = token_loss_sums(logits, batch.targets, batch.weights)
    logp = torch.log_softmax(logits, dim=-1)
    # row 0: predict 1 (w 1), 4 (w .5), 1 (w 0), 5 (w 2); row 1: predict 2 (w 0), 6 (w 3)
    expected = -(1 * logp[0, 0, 1] + 0.5 * logp[0, 1, 4] + 2 * logp[0, 3, 5] + 3 * logp[1, 1, 6])
    assert weight.item() == 6.5
    assert total.item() == pytest.approx(expected.item(), rel=1e-6)


def _grads(model) -> dict[str, torch.Tensor]:
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return grads


def test_accumulation_normalises_over_the_whole_window():
    model = tiny_model()
    items = random_items(6, seed=1)
    items[0]["loss_mask"][:] = 0
    items[0]["loss_mask"][-1] = 1  # micro-batch 1 has a single trained token, the others many
    whole = collate(items, block_size=16)
    micros = [collate(items[:1], 16), collate(items[1:4], 16), collate(items[4:], 16)]
    counts = [m.trained_tokens for m in micros]
    assert len(set(counts)) == 3  # unequal trained-token counts
    total = sum(m.weight_sum for m in micros)
    assert total == pytest.approx(whole.weight_sum)

    one = window_backward(model, [whole], whole.weight_sum)
    ref = _grads(model)
    acc = window_backward(model, micros, total)
    got = _grads(model)
    assert acc == pytest.approx(one, rel=1e-6)
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], atol=1e-6, rtol=1e-5)

    # a mean of per-micro-batch means is a different (wrong) gradient: the test can tell them apart
    for m in micros:
        window_backward(model, [m], m.weight_sum * len(micros))
    naive = _grads(model)
    assert any(not torch.allclose(naive[n], ref[n], atol=1e-5) for n in ref)


def test_window_loss_equals_manual_weighted_mean():
    model = tiny_model()
    items = random_items(4, seed=2)
    batch = collate(items, 16)
    with torch.no_grad():
        logits = forward_logits(model, batch)
    logp = torch.log_softmax(logits.float(), -1)
    manual = 0.0
    for b in range(len(items)):
        for t in range(batch.input_ids.shape[1]):
            manual -= batch.weights[b, t].item() * logp[b, t, batch.targets[b, t]].item()
    manual /= batch.weight_sum
    got = window_backward(model, [batch], batch.weight_sum)
    assert got == pytest.approx(manual, rel=1e-5)


def _episodes():
    rng = np.random.default_rng(3)
    return [item(rng.integers(0, VOCAB, n), rng.choice([0.0, 1.0], n)) for n in (5, 9, 4)]


def _packed(episodes, pad: int = 3) -> dict:
    ids = np.concatenate([e["input_ids"] for e in episodes] + [np.zeros(pad, np.uint32)])
    mask = np.concatenate([e["loss_mask"] for e in episodes] + [np.zeros(pad, np.float32)])
    seg = np.concatenate([np.full(len(e["input_ids"]), i + 1) for i, e in enumerate(episodes)] + [np.zeros(pad)])
    return item(ids, mask, seg)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_transformers_isolates_episodes_from_restarting_position_ids(attn):
    """No explicit mask: transformers' find_packed_sequence_indices builds the block-diagonal mask."""
    model = tiny_model(attn)
    episodes = _episodes()
    packed = collate([_packed(episodes)], 32)
    with torch.no_grad():
        logits = forward_logits(model, packed)
        start = 0
        for ep in episodes:
            alone = forward_logits(model, collate([ep], 32))[0]
            n = len(ep["input_ids"])
            torch.testing.assert_close(logits[0, start : start + n], alone, atol=1e-5, rtol=1e-4)
            start += n
        # the same block with plain positions leaks: the second episode's logits change
        leaky = model(input_ids=packed.input_ids, use_cache=False).logits
    assert not torch.allclose(leaky[0, 5:14], logits[0, 5:14], atol=1e-3)
    assert packed_attention_mode(model, VOCAB) == POSITION_IDS


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_and_unpacked_give_the_same_loss(attn):
    model = tiny_model(attn)
    episodes = _episodes()
    unpacked = loss_sums(model, [collate(episodes, 32)])
    packed = loss_sums(model, [collate([_packed(episodes)], 32)])
    explicit = loss_sums(model, [collate([_packed(episodes)], 32)], attention=EXPLICIT_MASK)
    assert unpacked[1] == packed[1] == explicit[1] > 0
    assert packed[0] == pytest.approx(unpacked[0], rel=1e-5)
    assert explicit[0] == pytest.approx(unpacked[0], rel=1e-5)


def test_probe_falls_back_to_an_explicit_mask_when_positions_are_ignored(monkeypatch):
    import transformers.masking_utils as mu

    monkeypatch.setattr(mu, "find_packed_sequence_indices", lambda position_ids: None)
    model = tiny_model("sdpa")
    assert packed_attention_mode(model, VOCAB) == EXPLICIT_MASK
    episodes = _episodes()
    unpacked = loss_sums(model, [collate(episodes, 32)])
    leaky = loss_sums(model, [collate([_packed(episodes)], 32)])
    masked = loss_sums(model, [collate([_packed(episodes)], 32)], attention=EXPLICIT_MASK)
    assert leaky[0] != pytest.approx(unpacked[0], rel=1e-4)
    assert masked[0] == pytest.approx(unpacked[0], rel=1e-5)


def test_block_causal_mask_values():
    seg = torch.tensor([[1, 1, 2, 0]])
    allowed = block_causal_mask(seg, torch.bool)[0, 0]
    assert allowed.tolist() == [
        [True, False, False, False],
        [True, True, False, False],
        [False, False, True, False],
        [False, False, False, True],
    ]
    additive = block_causal_mask(seg, torch.float32)[0, 0]
    assert additive[2, 2] == 0 and additive[2, 0] == torch.finfo(torch.float32).min


def test_neftune_noise_only_in_train_mode_and_bounded():
    model = tiny_model()
    emb = model.get_input_embeddings()
    batch = collate([_packed(_episodes(), pad=3)], 32)
    clean = emb(batch.input_ids).detach()
    alpha, width = 5.0, clean.shape[-1]
    neft = NEFTune(model, alpha)
    neft.lengths = batch.episode_lengths
    emb.eval()
    assert torch.equal(emb(batch.input_ids), clean)
    emb.train()
    torch.manual_seed(0)
    noise = (emb(batch.input_ids) - clean).detach()
    bound = alpha / torch.sqrt(batch.episode_lengths.clamp(min=1) * width)  # per token: its episode's length
    real = batch.segment_ids[0] != 0
    assert (noise[0][real].abs() <= bound[0][real, None] + 1e-6).all()
    assert (noise[0][~real] == 0).all()  # padding gets none
    for lo, hi in ((0, 5), (5, 14), (14, 18)):  # each episode uses its full bound (uniform noise)
        assert noise[0, lo:hi].abs().max() > 0.8 * bound[0, lo]
    neft.remove()
    assert torch.equal(emb(batch.input_ids), clean)


def test_neftune_active_in_a_training_forward_only():
    model = tiny_model()
    batch = collate(random_items(2), 16)
    neft = NEFTune(model, 10.0)
    with torch.no_grad():
        model.eval()
        a, b = forward_logits(model, batch, neftune=neft), forward_logits(model, batch, neftune=neft)
        assert torch.equal(a, b)
        model.train()
        c = forward_logits(model, batch, neftune=neft)
    assert not torch.allclose(a, c, atol=1e-4)


def test_epoch_sampler_sees_every_item_once_per_epoch_and_resumes():
    sampler = WindowSampler(10, 4, "epoch", seed=7)
    windows = [sampler.next_window() for _ in range(5)]  # 20 items: exactly two epochs
    stream = np.concatenate(windows)
    assert sorted(stream[:10].tolist()) == list(range(10)) and sorted(stream[10:].tolist()) == list(range(10))
    assert stream[:10].tolist() != list(range(10))  # shuffled
    copy = WindowSampler(10, 4, "epoch", seed=7)
    for _ in range(2):
        copy.next_window()
    resumed = WindowSampler(10, 4, "epoch", seed=7)
    resumed.load_state_dict(copy.state_dict(), copy.permutation)
    assert [resumed.next_window().tolist() for _ in range(3)] == [w.tolist() for w in windows[2:]]


def test_random_sampler_is_seeded_per_window():
    a = WindowSampler(50, 8, "random", seed=1)
    b = WindowSampler(50, 8, "random", seed=1)
    wa = [a.next_window().tolist() for _ in range(3)]
    assert wa == [b.next_window().tolist() for _ in range(3)]
    assert wa[0] != wa[1]


def test_rank_micro_batches_cover_the_window_without_duplicates():
    window = np.arange(24)
    shards = [rank_micro_batches(window, grad_accum=3, world_size=2, rank=r) for r in range(2)]
    # micro-batch j of both ranks together = slice j of the window, as one process with 2x batch_size
    single = rank_micro_batches(window, grad_accum=3, world_size=1, rank=0)
    for j in range(3):
        assert sorted(np.concatenate([shards[0][j], shards[1][j]]).tolist()) == single[j].tolist()
    assert sorted(np.concatenate([m for s in shards for m in s]).tolist()) == list(range(24))


def test_eval_batches_same_count_on_every_rank():
    parts = [eval_micro_batches(9, batch_size=2, eval_iters=10, world_size=2, rank=r) for r in range(2)]
    assert len(parts[0]) == len(parts[1]) == 3
    assert sorted(np.concatenate([m for p in parts for m in p]).tolist()) == list(range(9))
