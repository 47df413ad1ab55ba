"""Sharded preparation (job-array style and on Ray) equals the single-process result, episode for episode."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from lossmask.errors import LossmaskError
from lossmask.prepare import PrepareOptions, prepare
from lossmask.shards import merge_shards, shard_name
from lossmask.store import open_dataset
from tests.tokenizers_cache import tokenizer_dir


def episodes(n: int) -> list[dict]:
    return [{"messages": [{"role": "user", "content": f"Question {i}?"},
                          {"role": "assistant", "content": f"Answer {i}." * (1 + i % 3)}]} for i in range(n)]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> tuple[Path, list[str]]:
    root = tmp_path_factory.mktemp("shards")
    files = []
    for name, n in (("a.jsonl", 70), ("b.jsonl", 45)):
        path = root / name
        lines = [json.dumps(r) for r in episodes(n)]
        lines[5] = "{broken"  # a rejected line is rejected by exactly one shard
        path.write_text("\n".join(lines) + "\n")
        files.append(str(path))
    return root, files


def options(files: list[str], out: Path, **kw) -> PrepareOptions:
    return PrepareOptions(files, str(tokenizer_dir("qwen3")), str(out), val_split=0.2, seed=5, on_error="skip", **kw)


def items(ds) -> list[tuple]:
    return [(tuple(it["source"]), it["input_ids"].tolist(), it["loss_mask"].tolist(), it["labels"].tolist())
            for it in (ds[i] for i in range(len(ds)))]


def assert_same(a: Path, b: Path) -> None:
    for split in ("train", "val"):
        assert items(open_dataset(a, split)) == items(open_dataset(b, split))


def test_shards_merge_to_the_unsharded_result(inputs):
    root, files = inputs
    whole = prepare(options(files, root / "whole"), progress=False)
    kept = 0
    for i in range(3):
        summary = prepare(options(files, root / "sharded", num_shards=3, shard_index=i), progress=False)
        assert (root / "sharded" / shard_name(i, 3) / "dataset_metadata.json").is_file()
        kept += summary.episodes_kept
        assert 0 < summary.episodes_kept < whole.episodes_kept  # disjoint pieces
    assert kept == whole.episodes_kept
    merge_shards(root / "sharded", root / "merged")
    assert_same(root / "whole", root / "merged")
    sharded = open_dataset(root / "sharded", "train")  # a shard root reads as one dataset
    assert sorted(items(sharded)) == sorted(items(open_dataset(root / "whole", "train")))
    meta = json.loads((root / "merged" / "dataset_metadata.json").read_text())
    assert meta["summary"]["episodes_kept"] == whole.episodes_kept
    assert meta["summary"]["rejected"] == {"bad_json": 2}


def test_an_incomplete_shard_root_is_refused(inputs, tmp_path):
    _, files = inputs
    prepare(options(files, tmp_path / "part", num_shards=2, shard_index=1), progress=False)
    with pytest.raises(LossmaskError, match="incomplete"):
        open_dataset(tmp_path / "part")
    with pytest.raises(LossmaskError, match="--num-shards and --shard-index"):
        prepare(options(files, tmp_path / "bad", num_shards=2, shard_index=2), progress=False)


def test_ray_backend_equals_single_process(inputs, tmp_path):
    from lossmask.ray_backend import prepare_on_ray

    root, files = inputs
    if not (root / "whole").exists():
        prepare(options(files, root / "whole"), progress=False)
    summaries = prepare_on_ray(options(files, tmp_path / "ray", num_shards=2))
    assert [s["episodes_kept"] > 0 for s in summaries] == [True, True]
    merge_shards(tmp_path / "ray", tmp_path / "merged")
    assert_same(root / "whole", tmp_path / "merged")
    train = open_dataset(tmp_path / "merged", "train")
    assert np.all(np.diff([src[1] for src, *_ in items(train)][:10]) != 0)
