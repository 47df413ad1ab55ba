"""The format-lock gate: prompt rendering, batched greedy generation, pass/fail rules, report."""
from __future__ import annotations

import pytest
import torch
from rich.console import Console
from transformers import LlamaConfig, LlamaForCausalLM

from lossmask.episode import Source
from lossmask.errors import LossmaskError
from lossmask.gate import GateResult, Tally, format_lock_gate, passes, print_gate, render_prompt
from lossmask.generate.format_lock import generate_format_lock, record_texts
from lossmask.render.mypt import MyptRenderer
from lossmask.sources import parse_record
from lossmask.tiny_tokenizer import build_tiny_tokenizer
from lossmask.tokenizer import TokenizerInfo

HELD_OUT = generate_format_lock(24, seed=7, held_out=True)
ENDING = "</myPT_assistant><myPT_eot>"


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    texts = record_texts(generate_format_lock(1500, seed=0))
    return build_tiny_tokenizer(texts, tmp_path_factory.mktemp("gate") / "tok", vocab_size=1024)


@pytest.fixture(scope="module")
def random_model(tok):
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=256,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        tie_word_embeddings=False,  # untied, so the random model writes varied text, not one token over and over
    )
    return LlamaForCausalLM(config)


class ScriptedModel(torch.nn.Module):
    """Stands in for a trained model: continues each prompt with ``script(expected, language)``.

    Like ``generate``, it returns prompt + continuation, continuations right-padded to one length.
    It checks the call the gate makes: greedy, stop at ``<myPT_eot>``, left padding.
    """

    def __init__(self, tok, records, script):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.tok = tok
        info = TokenizerInfo.of(tok)
        self.answers = {}
        for i, record in enumerate(records):
            episode = parse_record(record, Source("t", i))
            prompt = MyptRenderer(info).render(episode)[0].text.removesuffix(record["messages"][1]["content"] + ENDING)
            self.answers[prompt] = (record["messages"][1]["content"], record["language"])
        self.script = script
        self.calls = 0

    def generate(self, input_ids, attention_mask, max_new_tokens, eos_token_id, pad_token_id, do_sample):
        assert do_sample is False and eos_token_id == self.tok.eos_token_id and pad_token_id == self.tok.pad_token_id
        assert not self.training
        self.calls += 1
        rows = []
        for ids, mask in zip(input_ids.tolist(), attention_mask.tolist()):
            start = mask.index(1)
            assert all(mask[start:]) and all(t == pad_token_id for t in ids[:start])  # left padding
            text = self.tok.decode(ids[start:])
            rows.append(self.tok.encode(self.script(*self.answers[text]), add_special_tokens=False))
        width = max(len(r) for r in rows)
        padded = [r + [pad_token_id] * (width - len(r)) for r in rows]
        return torch.cat([input_ids, torch.tensor(padded, dtype=torch.long)], dim=1)


def gate_with(tok, script, **kwargs) -> GateResult:
    return format_lock_gate(ScriptedModel(tok, HELD_OUT, script), tok, HELD_OUT, **kwargs)


def test_prompt_is_the_rendered_conversation_up_to_the_opening_assistant_tag(tok):
    record = {"system": "You are MyPT.", "messages": [{"role": "user", "content": "What is 3 + 4?"},
                                                      {"role": "assistant", "content": "7"}]}
    episode = parse_record(record, Source("t", 1))
    info = TokenizerInfo.of(tok)
    full = MyptRenderer(info).render(episode)[0].text
    prompt = render_prompt(episode.__class__(episode.messages[:1], episode.source, episode.system), info)
    assert prompt == "<myPT_system>You are MyPT.</myPT_system><myPT_user>What is 3 + 4?</myPT_user><myPT_assistant>"
    assert full == prompt + "7" + ENDING


def test_a_model_that_answers_and_stops_passes_with_exact_answers(tok):
    model = ScriptedModel(tok, HELD_OUT, lambda answer, lang: answer + ENDING)
    result = format_lock_gate(model, tok, HELD_OUT, batch_size=10)
    assert model.calls == 3
    assert (result.pass_rate, result.passed, result.total, result.exact_match_rate) == (1.0, 24, 24, 1.0)
    assert {lang: (t.passed, t.total) for lang, t in result.per_language.items()} == {"de": (12, 12), "en": (12, 12)}
    assert result.failures == {} and passes(result)
    first = result.samples[0]
    assert first.prompt == HELD_OUT[0]["messages"][0]["content"] and first.generation == first.expected + ENDING
    assert len(result.samples) == 8 and all(s.passed and s.exact and s.reason is None for s in result.samples)


def test_right_format_with_wrong_answers_passes_without_exact_matches(tok):
    result = gate_with(tok, lambda answer, lang: "banana" + ENDING)
    assert result.pass_rate == 1.0 and result.exact_match_rate == 0.0


@pytest.mark.parametrize(
    "script, reason",
    [
        (lambda a, lang: a + ENDING + "<myPT_user>And now?</myPT_user>", "after_eot"),
        (lambda a, lang: a + ENDING + " more", "after_eot"),
        (lambda a, lang: a + "</myPT_assistant><myPT_user>What next?</myPT_user>", "no_eot"),
        (lambda a, lang: (a + " ") * 20, "no_eot"),
        (lambda a, lang: a + "<myPT_assistant>" + a + ENDING, "runaway"),
        (lambda a, lang: a + "<myPT_user>" + a + ENDING, "runaway"),
        (lambda a, lang: a + "<myPT_eot>", "not_closed"),
        (lambda a, lang: "<myPT_eot>", "not_closed"),
        (lambda a, lang: ENDING, "empty_answer"),
        (lambda a, lang: " \n " + ENDING, "empty_answer"),
    ],
)
def test_runaway_and_unclosed_generations_fail(tok, script, reason):
    result = gate_with(tok, script)
    assert result.pass_rate == 0.0 and result.exact_match_rate == 0.0
    assert result.failures == {reason: 24} and not passes(result, threshold=0.01)
    assert all(s.reason == reason and not s.passed for s in result.samples)


def test_stop_must_come_within_max_new_tokens(tok):
    x = "x" * 18  # "x" is one token, so this answer plus the two stop tags is exactly 20 tokens
    assert len(tok.encode(x + ENDING, add_special_tokens=False)) == 20
    assert gate_with(tok, lambda a, lang: x + ENDING).pass_rate == 1.0
    assert gate_with(tok, lambda a, lang: x + "x" + ENDING).failures == {"no_eot": 24}
    assert gate_with(tok, lambda a, lang: x + ENDING, max_new_tokens=19).failures == {"no_eot": 24}


def test_one_language_failing_fails_the_gate_even_above_the_overall_threshold(tok):
    result = gate_with(tok, lambda a, lang: a + ENDING if lang == "en" else a + "<myPT_eot>")
    assert result.pass_rate == 0.5 and result.failures == {"not_closed": 12}
    assert result.per_language["en"].pass_rate == 1.0 and result.per_language["de"].pass_rate == 0.0
    assert passes(result, threshold=0.5) is False
    assert passes(result, threshold=0.0) is True


def test_passes_thresholds():
    def result(en: tuple[int, int], de: tuple[int, int]) -> GateResult:
        langs = {"de": Tally(de[1], de[0]), "en": Tally(en[1], en[0])}
        passed, total = en[0] + de[0], en[1] + de[1]
        return GateResult(passed / total if total else 0.0, passed, total, langs, 0.0, [])

    assert passes(result((9, 10), (9, 10))) and not passes(result((9, 10), (8, 10)))
    assert passes(result((10, 10), (18, 20)), threshold=0.9) and not passes(result((10, 10), (17, 20)))
    assert not passes(GateResult(0.0, 0, 0, {}, 0.0, []))


def test_a_random_model_fails_and_batching_does_not_change_its_generations(tok, random_model):
    random_model.train()
    batched = format_lock_gate(random_model, tok, HELD_OUT, batch_size=24, n_samples=24)
    assert random_model.training
    assert batched.total == 24 and batched.pass_rate < 0.5 and not passes(batched)
    assert len({s.generation for s in batched.samples}) > 12
    alone = format_lock_gate(random_model, tok, HELD_OUT[:6], batch_size=1, n_samples=6)
    assert [s.generation for s in alone.samples] == [s.generation for s in batched.samples[:6]]


def test_print_gate_shows_languages_rates_and_samples(tok):
    result = gate_with(tok, lambda a, lang: a + ENDING if lang == "en" else ENDING)
    console = Console(record=True, width=160)
    print_gate(result, console)
    text = console.export_text()
    assert "format-lock gate" in text and "samples" in text
    assert "100.0%" in text and "0.0%" in text and "50.0%" in text
    assert "empty_answer 12" in text
    assert HELD_OUT[0]["messages"][0]["content"] in text


def test_bad_prompt_records_are_clear_errors(tok, random_model):
    with pytest.raises(LossmaskError, match="at least one"):
        format_lock_gate(random_model, tok, [])
    no_answer = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
                              {"role": "user", "content": "Bye"}]}
    with pytest.raises(LossmaskError, match="held-out prompt 2: expected a conversation ending with the assistant"):
        format_lock_gate(random_model, tok, [HELD_OUT[0], no_answer])
    with pytest.raises(LossmaskError, match="no_assistant|no assistant"):
        format_lock_gate(random_model, tok, [{"messages": [{"role": "user", "content": "Hi"}]}])
