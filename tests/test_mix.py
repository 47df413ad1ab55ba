"""lossmask mix: weights → proportions, exact composition, determinism, shuffle, repeats, errors, memory."""
from __future__ import annotations

import gzip
import io
import itertools
import json
import tracemalloc
from collections import Counter
from pathlib import Path

import pytest
from rich.console import Console

from lossmask.errors import InputError, LossmaskError
from lossmask.mix import MixInput, mix, parse_input, print_mix_report, replay_schedule


def source(path: Path, name: str, n: int, pad: int = 0) -> str:
    path.write_text("".join(json.dumps({"text": f"{name}{i}", "pad": "x" * pad}) + "\n" for i in range(n)))
    return str(path)


def taken(out: Path) -> list[str]:
    return [json.loads(line)["text"] for line in out.read_text().splitlines()]


def by_source(texts: list[str]) -> Counter:
    return Counter(t.rstrip("0123456789") for t in texts)


def test_19_to_1_is_a_95_5_blend_sized_by_the_scarcest_source(tmp_path):
    a = source(tmp_path / "a.jsonl", "a", 5000)
    b = source(tmp_path / "b.jsonl", "b", 100)
    out = tmp_path / "mixed.jsonl"
    report = mix([f"{a}:19.0", f"{b}:1.0"], out, seed=1)
    texts = taken(out)
    # b (100 lines at 5%) sets the size: 100 / 0.05 = 2000 lines, 1900 of them from a
    assert report.total == len(texts) == 2000
    assert by_source(texts) == {"a": 1900, "b": 100}
    assert sorted(t for t in texts if t.startswith("b")) == sorted(f"b{i}" for i in range(100))  # b in full, once
    assert len(set(texts)) == 2000  # no repeats
    assert [(s.proportion, s.available, s.taken, s.repeats) for s in report.sources] == [
        (0.95, 5000, 1900, 0), (0.05, 100, 100, 0)]
    # without shuffle: sources in input order, each in file order
    a_part = [int(t[1:]) for t in texts[:1900]]
    assert all(t.startswith("a") for t in texts[:1900]) and a_part == sorted(a_part)
    assert report.sources[0].chars == sum(len(line) for line in out.read_text().splitlines()[:1900])


def test_point_15_replay_slice(tmp_path):
    sft = source(tmp_path / "sft.jsonl", "s", 1000)
    replay = source(tmp_path / "replay.jsonl", "r", 10_000)
    out = tmp_path / "mixed.jsonl"
    report = mix([f"{sft}:0.85", f"{replay}:0.15"], out)
    # sft in full sets the size: floor(1000 / 0.85) = 1176; quotas 999.6 and 176.4 → 1000 and 176
    assert by_source(taken(out)) == {"s": 1000, "r": 176}
    assert report.total == 1176 and abs(176 / 1176 - 0.15) < 0.001
    # weights are relative: 1.0 next to 0.15 is 0.15 / 1.15 = 13.04%, as the table says
    report = mix([f"{sft}:1.0", f"{replay}:0.15"], out)
    assert by_source(taken(out)) == {"s": 1000, "r": 150}
    assert report.sources[1].proportion == pytest.approx(0.15 / 1.15)


def test_replay_schedule_expresses_the_cross_phase_recipe(tmp_path):
    schedule = replay_schedule("p3.jsonl", ["p1.jsonl", "p2.jsonl"], "pretrain.jsonl")
    assert [str(i) for i in schedule] == ["p3.jsonl:0.89", "p1.jsonl:0.03", "p2.jsonl:0.03", "pretrain.jsonl:0.05"]
    assert replay_schedule("p1.jsonl", [], None) == [MixInput("p1.jsonl", 1.0)]
    with pytest.raises(LossmaskError, match="leaving nothing"):
        replay_schedule("p.jsonl", [f"e{i}.jsonl" for i in range(20)], "pre.jsonl", earlier_share=0.05)
    p1 = source(tmp_path / "p1.jsonl", "one", 500)
    p2 = source(tmp_path / "p2.jsonl", "two", 900)
    pre = source(tmp_path / "pre.jsonl", "pre", 1000)
    out = tmp_path / "phase2.jsonl"
    report = mix(replay_schedule(p2, [p1], pre, earlier_share=0.05), out, shuffle=True)
    assert by_source(taken(out)) == {"two": 900, "one": 50, "pre": 50}
    assert report.sources[0].taken == 900  # the current phase in full


def test_same_seed_same_bytes_other_seed_other_order(tmp_path):
    a = source(tmp_path / "a.jsonl", "a", 300)
    b = source(tmp_path / "b.jsonl", "b", 300)
    outs = {}
    for name, seed in (("x", 7), ("y", 7), ("z", 8)):
        outs[name] = tmp_path / f"{name}.jsonl"
        mix([f"{a}:1", f"{b}:1"], outs[name], shuffle=True, seed=seed)
    assert outs["x"].read_bytes() == outs["y"].read_bytes()
    assert outs["x"].read_bytes() != outs["z"].read_bytes()
    # every line used once (both sources in full), so the two seeds differ only in order
    assert sorted(taken(outs["x"])) == sorted(taken(outs["z"])) == sorted([f"a{i}" for i in range(300)]
                                                                           + [f"b{i}" for i in range(300)])
    first = taken(outs["x"])[:100]
    assert 20 < by_source(first)["a"] < 80  # shuffled across sources, not concatenated


def test_selection_differs_by_seed_and_is_a_subset(tmp_path):
    a = source(tmp_path / "a.jsonl", "a", 1000)
    b = source(tmp_path / "b.jsonl", "b", 10)
    picked = []
    for seed in (0, 1):
        mix([f"{a}:9", f"{b}:1"], tmp_path / "o.jsonl", seed=seed)
        picked.append({t for t in taken(tmp_path / "o.jsonl") if t.startswith("a")})
    assert len(picked[0]) == len(picked[1]) == 90 and picked[0] != picked[1]
    assert picked[0] <= {f"a{i}" for i in range(1000)}


def test_large_source_is_sampled_block_by_block_uniformly(tmp_path):
    a = source(tmp_path / "a.jsonl", "a", 150_000)  # three sampling blocks of 65,536 lines
    b = source(tmp_path / "b.jsonl", "b", 300)
    report = mix([f"{a}:1", f"{b}:1"], tmp_path / "o.jsonl", seed=3)
    picked = [int(t[1:]) for t in taken(tmp_path / "o.jsonl") if t.startswith("a")]
    assert report.total == 600 and len(set(picked)) == 300 and picked == sorted(picked)
    per_block = Counter(i // 65_536 for i in picked)
    assert all(abs(per_block[block] - 300 * size / 150_000) < 25
               for block, size in ((0, 65_536), (1, 65_536), (2, 150_000 - 131_072)))


def test_external_shuffle_is_a_uniform_permutation(tmp_path):
    """Four lines dealt to buckets again and again (a tiny memory budget): all 24 orders, evenly."""
    a = source(tmp_path / "a.jsonl", "a", 4)
    out = tmp_path / "o.jsonl"
    orders = Counter()
    for seed in range(240):
        mix([a], out, shuffle=True, seed=seed, shuffle_memory=20)
        orders[tuple(taken(out))] += 1
    assert set(orders) == set(itertools.permutations([f"a{i}" for i in range(4)]))
    assert max(orders.values()) < 21 and min(orders.values()) > 2  # expected 10 each


def test_allow_repeat_uses_whole_passes_then_a_random_remainder(tmp_path):
    a = source(tmp_path / "a.jsonl", "a", 100)
    b = source(tmp_path / "b.jsonl", "b", 10)
    out = tmp_path / "o.jsonl"
    with pytest.raises(LossmaskError) as err:
        mix([f"{a}:1", f"{b}:1"], out, total=46)
    message = str(err.value)
    assert f"{b}:1.0" in message and "23 of 46 lines" in message and "only 10" in message
    assert "at most 20" in message and "--allow-repeat" in message
    assert not out.exists()
    report = mix([f"{a}:1", f"{b}:1"], out, total=46, allow_repeat=True)
    counts = Counter(t for t in taken(out) if t.startswith("b"))
    assert sum(counts.values()) == 23 and set(counts) == {f"b{i}" for i in range(10)}
    assert sorted(Counter(counts.values()).items()) == [(2, 7), (3, 3)]  # 2 passes + 3 more
    assert report.sources[1].repeats == 13 and report.sources[0].repeats == 0


def test_bad_lines_name_file_and_line_or_are_skipped(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok0"}\n\n{"text": "ok1"}\n{"text": oops}\n[1, 2]\n{"text": "ok2"}\n')
    out = tmp_path / "o.jsonl"
    with pytest.raises(InputError) as err:
        mix([str(bad)], out)
    assert err.value.problem.line == 4 and err.value.problem.reason == "bad_json"
    assert str(err.value).startswith(f"{bad}:4: not valid JSON")
    assert not out.exists()
    report = mix([str(bad)], out, on_error="skip")
    assert taken(out) == ["ok0", "ok1", "ok2"]
    assert [(p.line, p.reason) for p in report.problems] == [(4, "bad_json"), (5, "not_object")]
    assert report.skipped == 2 and report.sources[0].available == 3


def test_lines_copied_byte_for_byte_or_tagged(tmp_path):
    raw = ['{"z": 1,   "text": "ü"}', '\ufeff{"text": "b", "_meta": {"k": 1}}', '{"text": "c"}']
    path = tmp_path / "a.jsonl.gz"
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.write("\n".join(raw))  # no final newline
    out = tmp_path / "o.jsonl"
    mix([f"{path}:1"], out)
    expected = '{"z": 1,   "text": "ü"}\n{"text": "b", "_meta": {"k": 1}}\n{"text": "c"}\n'
    assert out.read_text(encoding="utf-8") == expected
    mix([f"{path}:1"], out, tag_source=True)
    metas = [json.loads(line).get("_meta") for line in out.read_text(encoding="utf-8").splitlines()]
    assert metas == [{"mix_source": str(path)}, {"k": 1, "mix_source": str(path)}, {"mix_source": str(path)}]


def test_failed_mix_keeps_the_old_output_and_leaves_no_temporaries(tmp_path):
    a = source(tmp_path / "a.jsonl", "a", 5)
    (tmp_path / "b.jsonl").write_text('{"text": 1, "_meta": 3}\n')
    out = tmp_path / "o.jsonl"
    out.write_text("old\n")
    with pytest.raises(InputError, match="_meta is not an object"):
        mix([a, str(tmp_path / "b.jsonl")], out, tag_source=True, shuffle=True)
    assert out.read_text() == "old\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.jsonl", "b.jsonl", "o.jsonl"]


def test_parse_input():
    assert parse_input("a.jsonl:19.0") == MixInput("a.jsonl", 19.0)
    assert parse_input("a.jsonl") == MixInput("a.jsonl", 1.0)
    assert parse_input("c:/data/a.jsonl:0.15") == MixInput("c:/data/a.jsonl", 0.15)
    for spec, match in (("a.jsonl:x", "not a number"), ("a.jsonl:0", "> 0"), ("a.jsonl:-1", "> 0"),
                        ("a.jsonl:nan", "> 0"), (":1", "no path")):
        with pytest.raises(LossmaskError, match=match):
            parse_input(spec)


def test_empty_source_is_an_error(tmp_path):
    a = source(tmp_path / "a.jsonl", "a", 5)
    (tmp_path / "e.jsonl").write_text("\n\n")
    with pytest.raises(LossmaskError, match="has no lines"):
        mix([a, str(tmp_path / "e.jsonl")], tmp_path / "o.jsonl")


@pytest.mark.parametrize("shuffle", [False, True])
def test_memory_stays_bounded_on_a_20k_line_input(tmp_path, shuffle):
    a = source(tmp_path / "a.jsonl", "a", 20_000, pad=400)  # about 8.6 MB
    b = source(tmp_path / "b.jsonl", "b", 20_000, pad=400)
    out = tmp_path / "o.jsonl"
    tracemalloc.start()
    try:
        report = mix([f"{a}:1", f"{b}:1"], out, shuffle=shuffle, shuffle_memory=512 << 10)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert report.total == 40_000 and out.stat().st_size > 17_000_000
    assert peak < 2_000_000, f"peak {peak:,} bytes"


def test_print_mix_report_shows_the_composition(tmp_path):
    a = source(tmp_path / "a.jsonl", "a", 190)
    b = source(tmp_path / "b.jsonl", "b", 10)
    report = mix([f"{a}:19", f"{b}:1"], tmp_path / "o.jsonl", shuffle=True, seed=5)
    buf = io.StringIO()
    print_mix_report(report, Console(file=buf, width=200))
    text = buf.getvalue()
    assert "200 lines, shuffled (seed 5)" in text
    assert "95.00%" in text and "5.00%" in text and "190" in text


def test_a_corrupt_gzip_source_is_named_not_a_traceback(tmp_path):
    path = tmp_path / "a.jsonl.gz"
    data = bytearray(gzip.compress(b"".join(b'{"text": "line %d"}\n' % i for i in range(2000)), mtime=0))
    data[20:52] = b"\xff" * 32  # the header is fine: inflating the data raises zlib.error
    path.write_bytes(bytes(data))
    out = tmp_path / "o.jsonl"
    with pytest.raises(LossmaskError, match=f"cannot read {path}"):
        mix([f"{path}:1"], out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.jsonl.gz"]
