"""The tiny byte-level BPE tokenizer: myPT tokens, determinism, exact round trips, atomic save."""
from __future__ import annotations

import json

import pytest
from transformers import AutoTokenizer

from lossmask.episode import Source
from lossmask.errors import LossmaskError
from lossmask.generate.format_lock import generate_format_lock, record_texts
from lossmask.mask import Masker
from lossmask.mypt_tokens import MYPT_TOKENS
from lossmask.render.base import Label
from lossmask.render.mypt import MyptRenderer
from lossmask.sources import parse_record
from lossmask.tiny_tokenizer import EOS_TOKEN, PAD_TOKEN, build_tiny_tokenizer
from lossmask.tokenizer import TokenizerInfo, load_tokenizer

RECORDS = generate_format_lock(1500, seed=3)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    out = tmp_path_factory.mktemp("tok") / "tiny"
    return build_tiny_tokenizer(record_texts(RECORDS), out), out


def test_special_tokens_eos_pad_no_bos_and_64_aligned_vocab(built):
    tok, _ = built
    assert len(tok) % 64 == 0 and 256 < len(tok) <= 2048
    assert tok.eos_token == EOS_TOKEN == "<myPT_eot>"
    assert tok.pad_token == PAD_TOKEN and tok.pad_token_id == 0
    assert tok.bos_token is None
    ids = [tok.encode(tag, add_special_tokens=False) for tag in MYPT_TOKENS]
    assert all(len(i) == 1 for i in ids) and len({i[0] for i in ids}) == 19
    assert tok.eos_token_id == tok.convert_tokens_to_ids("<myPT_eot>")
    info = TokenizerInfo.of(tok)
    assert info.bos is None and info.eos == "<myPT_eot>"
    assert set(MYPT_TOKENS) | {PAD_TOKEN} <= set(info.special_tokens)


def test_saved_directory_loads_with_autotokenizer_and_encodes_identically(built):
    tok, out = built
    assert (out / "tokenizer.json").is_file() and (out / "tokenizer_config.json").is_file()
    loaded = AutoTokenizer.from_pretrained(str(out))
    assert len(loaded) == len(tok)
    assert (loaded.eos_token, loaded.pad_token, loaded.bos_token) == ("<myPT_eot>", "<myPT_pad>", None)
    text = "<myPT_user>Hauptstadt von Österreich?</myPT_user><myPT_assistant>Wien</myPT_assistant><myPT_eot>"
    assert loaded.encode(text, add_special_tokens=False) == tok.encode(text, add_special_tokens=False)
    spaced = "Hello , world ' s ! Grüße 🎉"
    assert loaded.decode(loaded.encode(spaced, add_special_tokens=False)) == spaced
    assert load_tokenizer(str(out)).get_vocab() == tok.get_vocab()


@pytest.mark.parametrize(
    "text",
    [
        "Grüße aus Köln, heiß und süß: ÄÖÜ ß",
        "emoji 🎉🦜 and CJK 漢字 and Ελληνικά",
        "  leading spaces, tabs\tand\nnewlines\r\n  ",
        "Hello , world ' s -- \"quotes\" ...",
        "<myPT_user>tags in the middle</myPT_user> of text<myPT_eot>",
    ],
)
def test_any_text_round_trips_exactly_with_gapless_offsets(built, text):
    """Offsets cover every character in order; a character split over bytes shares its offsets."""
    tok, _ = built
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    assert tok.decode(enc["input_ids"]) == text
    offsets = enc["offset_mapping"]
    assert offsets[0][0] == 0 and offsets[-1][1] == len(text)
    for (start, end), (next_start, next_end) in zip(offsets, offsets[1:]):
        assert start < end and next_start <= end and (next_start, next_end) >= (start, end)


def test_same_texts_give_byte_identical_files(built, tmp_path):
    _, first = built
    again = tmp_path / "again"
    build_tiny_tokenizer(record_texts(RECORDS), again)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (again / name).read_bytes() == (first / name).read_bytes()
    other = tmp_path / "other"
    build_tiny_tokenizer(record_texts(generate_format_lock(1500, seed=4)), other)
    assert (other / "tokenizer.json").read_bytes() != (first / "tokenizer.json").read_bytes()


def test_rendered_episodes_train_the_same_tokenizer_as_their_plain_texts(built, tmp_path):
    """Tags in training text are cut out, so no merge ever learns a tag fragment."""
    tok, first = built
    info = TokenizerInfo.of(tok)
    renderer = MyptRenderer(info)
    rendered = [renderer.render(parse_record(r, Source("x", i)))[0].text for i, r in enumerate(RECORDS)]
    assert rendered[0].startswith("<myPT_system>") and rendered[0].endswith("<myPT_eot>")
    out = tmp_path / "from_rendered"
    build_tiny_tokenizer(rendered + ["<myPT_pad_3><myPT_pad>"], out)
    assert (out / "tokenizer.json").read_bytes() == (first / "tokenizer.json").read_bytes()
    added = set(tok.backend_tokenizer.get_added_tokens_decoder().values())
    learned = set(tok.get_vocab()) - {t.content for t in added}
    assert not [t for t in learned if "myPT" in t or "PT_" in t]


def test_masks_a_rendered_episode_exactly(built):
    tok, _ = built
    record = RECORDS[1]
    episode = parse_record(record, Source("data.jsonl", 2))
    rendered = MyptRenderer(TokenizerInfo.of(tok)).render(episode)
    [example] = Masker(tok).mask(rendered)
    trained = [int(i) for i, w in zip(example.input_ids, example.weights) if w > 0]
    answer = record["messages"][1]["content"]
    assert tok.decode(trained) == answer + "</myPT_assistant><myPT_eot>"
    assert example.labels[-1] == Label.STOP and example.labels[-2] == Label.STOP
    assert example.input_ids[-1] == tok.eos_token_id


def test_vocab_size_is_the_total_and_is_rounded_up_to_64(tmp_path):
    tok = build_tiny_tokenizer(record_texts(RECORDS), tmp_path / "a", vocab_size=512)
    assert len(tok) == 512
    tok = build_tiny_tokenizer(record_texts(RECORDS), tmp_path / "b", vocab_size=500)
    assert len(tok) == 512 and "<myPT_pad_11>" in tok.get_vocab() and "<myPT_pad_12>" not in tok.get_vocab()


@pytest.mark.parametrize("bad", [100, 319, 2048.0, True])
def test_bad_vocab_size_is_a_clear_error(tmp_path, bad):
    with pytest.raises(LossmaskError, match="vocab_size must be an integer >= 320"):
        build_tiny_tokenizer(["some text"], tmp_path / "t", vocab_size=bad)
    assert not (tmp_path / "t").exists()


def test_non_text_input_is_a_clear_error_and_writes_nothing(tmp_path):
    with pytest.raises(LossmaskError, match="must be str, got dict"):
        build_tiny_tokenizer(["fine", {"text": "not a string"}], tmp_path / "t")
    assert list(tmp_path.iterdir()) == []


def test_existing_directory_is_replaced_whole_and_no_temp_dirs_remain(tmp_path):
    out = tmp_path / "tok"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    (out / "tokenizer.json").write_text("{}")
    build_tiny_tokenizer(record_texts(RECORDS[:200]), out, vocab_size=384)
    assert sorted(p.name for p in out.iterdir()) == ["tokenizer.json", "tokenizer_config.json"]
    assert json.loads((out / "tokenizer.json").read_text())["model"]["type"] == "BPE"
    assert [p.name for p in tmp_path.iterdir()] == ["tok"]
