"""Exact masks for real chat templates (Qwen3, Llama 3.1, Gemma 3) and templates of our own."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lossmask.episode import Conversation, Message, Source
from lossmask.errors import EpisodeError, LossmaskError
from lossmask.mask import Masker, MaskOptions
from lossmask.render.base import Label
from lossmask.render.chat_template import ChatTemplateRenderer
from lossmask.special import SpecialStringGuard
from lossmask.tokenizer import TokenizerInfo

SRC = Source("data.jsonl", 7)


def conv(*messages, system=None, tools=None):
    return Conversation(tuple(messages), SRC, system=system, tools=tools)


def U(text, **kw):
    return Message("user", text, **kw)


def A(text, **kw):
    return Message("assistant", text, **kw)


def masked(tok, episode, options=MaskOptions(), **renderer_kw):
    """Render + mask; returns (rendered list, examples) and fails the test on any rejection."""
    renderer = ChatTemplateRenderer(tok, TokenizerInfo.of(tok), **renderer_kw)
    rendered = renderer.render(episode)
    examples = Masker(tok, options).mask(rendered)
    for ex in examples:
        assert not isinstance(ex, EpisodeError), str(ex)
    return rendered, examples


def trained_runs(tok, ex) -> list[str]:
    """Decoded text of each maximal run of trained tokens."""
    runs, current = [], []
    for tid, w in zip(ex.input_ids.tolist(), ex.weights.tolist()):
        if w > 0:
            current.append(tid)
        elif current:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    return [tok.decode(r, skip_special_tokens=False, clean_up_tokenization_spaces=False) for r in runs]


def untrained_text(tok, ex) -> str:
    ids = [t for t, w in zip(ex.input_ids.tolist(), ex.weights.tolist()) if w == 0]
    return tok.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


# -- Llama 3.1 ---------------------------------------------------------------------------------------
def test_llama3_multi_turn_trains_trimmed_content_and_eot(llama3):
    episode = conv(U("Hi there"), A("  Hello! How can I help?  "), U("What is 2+2?"), A("4"), system="Be brief.")
    rendered, [ex] = masked(llama3, episode)
    assert trained_runs(llama3, ex) == ["Hello! How can I help?<|eot_id|>", "4<|eot_id|>"]
    ids = ex.input_ids.tolist()
    bos = llama3.convert_tokens_to_ids("<|begin_of_text|>")
    assert ids.count(bos) == 1 and ids[0] == bos  # the template writes BOS; it is never doubled
    header = llama3.encode("<|start_header_id|>assistant<|end_header_id|>\n\n", add_special_tokens=False)
    for i in range(len(ids) - len(header)):
        if ids[i:i + len(header)] == header:
            assert not ex.weights[i:i + len(header)].any()  # the role header is never trained
    assert "Be brief." in untrained_text(llama3, ex) and "What is 2+2?" in untrained_text(llama3, ex)
    labels = {Label(l) for l, w in zip(ex.labels, ex.weights) if w > 0}
    assert labels == {Label.ASSISTANT, Label.STOP}
    assert rendered[0].notes == []


def test_masker_encodes_whole_text_even_when_the_tokenizer_pads_or_truncates(llama3):
    from lossmask.tokenizer import load_tokenizer

    assert Masker(llama3).backend is llama3.backend_tokenizer  # exact already: used as it is, not copied
    rendered, [reference] = masked(llama3, conv(U("Hi there"), A("Hello! " * 20)))
    tok = load_tokenizer(llama3.name_or_path)
    tok.backend_tokenizer.enable_truncation(8)
    tok.backend_tokenizer.enable_padding(length=512)
    [ex] = Masker(tok).mask(rendered)
    assert ex.input_ids.tolist() == reference.input_ids.tolist() and len(ex.input_ids) > 8
    assert ex.weights.tolist() == reference.weights.tolist()
    assert tok.backend_tokenizer.truncation["max_length"] == 8 and tok.backend_tokenizer.padding["length"] == 512
    shared = Masker(llama3)
    try:
        llama3("x " * 50, truncation=True, max_length=4)  # transformers leaves the backend truncating after this
        assert llama3.backend_tokenizer.truncation is not None
        assert shared.mask(rendered)[0].input_ids.tolist() == reference.input_ids.tolist()
    finally:
        llama3.backend_tokenizer.no_truncation()  # a session fixture: leave it as found


def test_llama3_template_dropping_tool_calls_is_reported(llama3):
    episode = conv(
        U("Weather in Paris?"), A("Let me check."),
        Message("assistant_toolcall", name="get_weather", arguments={"city": "Paris"}),
        Message("toolresult", "sunny", name="get_weather"), A("Sunny."),
    )
    rendered, [ex] = masked(llama3, episode)
    assert trained_runs(llama3, ex) == ["Let me check.<|eot_id|>", "Sunny.<|eot_id|>"]
    assert "template_drops_tool_calls" in rendered[0].notes
    tool_label = [l for l in ex.labels if l == Label.TOOLRESULT]
    assert tool_label  # the tool result is located and labelled, never trained


# -- Gemma 3 -----------------------------------------------------------------------------------------
def test_gemma3_folds_system_and_never_trains_newline_after_end_of_turn(gemma3):
    episode = conv(U("Hi"), A("Hello!\n"), U("Bye"), A("Goodbye."), system="You are Gemma.")
    rendered, [ex] = masked(gemma3, episode)
    assert trained_runs(gemma3, ex) == ["Hello!<end_of_turn>", "Goodbye.<end_of_turn>"]
    text = rendered[0].text
    assert text.startswith("<bos><start_of_turn>user\nYou are Gemma.\n\nHi<end_of_turn>\n")
    ids = ex.input_ids.tolist()
    eot = gemma3.convert_tokens_to_ids("<end_of_turn>")
    for i, t in enumerate(ids[:-1]):
        if t == eot:
            assert ex.weights[i + 1] == 0  # the "\n" glue after <end_of_turn> is not trained
    assert ids.count(gemma3.bos_token_id) == 1
    sys_tokens = [l for l in ex.labels if l == Label.SYSTEM]
    assert sys_tokens  # folded system prompt located inside the first user turn


def test_gemma3_raising_template_reports_its_own_message(gemma3):
    renderer = ChatTemplateRenderer(gemma3, TokenizerInfo.of(gemma3))
    with pytest.raises(EpisodeError) as err:
        renderer.render(conv(U("a"), U("b"), A("c")))
    assert err.value.reason == "template_error"
    assert "Conversation roles must alternate" in err.value.message


# -- Qwen3 ---------------------------------------------------------------------------------------------
def test_qwen3_single_turn_trains_think_block_content_and_im_end(qwen3):
    rendered, [ex] = masked(qwen3, conv(U("Hi"), A("Hello!"), system="Sys"))
    assert trained_runs(qwen3, ex) == ["<think>\n\n</think>\n\nHello!<|im_end|>"]
    assert rendered[0].text.endswith("<|im_end|>\n")
    assert ex.weights[-1] == 0  # the final "\n" after <|im_end|> is glue
    assert rendered[0].notes == []


def test_qwen3_reasoning_of_history_is_dropped_so_auto_splits(qwen3):
    episode = conv(U("Q1"), A("A1", think="t1"), U("Q2"), A("A2", think="t2"))
    rendered, examples = masked(qwen3, episode)
    assert len(examples) == 2
    assert [trained_runs(qwen3, ex) for ex in examples] == [
        ["<think>\nt1\n</think>\n\nA1<|im_end|>"],
        ["<think>\nt2\n</think>\n\nA2<|im_end|>"],
    ]
    # the second example's history shows turn 1 as the template renders history, untrained
    assert "<|im_start|>assistant\nA1<|im_end|>" in rendered[1].text
    assert all("history_split" in r.notes for r in rendered)


def test_qwen3_history_last_and_as_rendered(qwen3):
    episode = conv(U("Q1"), A("A1", think="t1"), U("Q2"), A("A2", think="t2"))
    _, [ex] = masked(qwen3, episode, history="last")
    assert trained_runs(qwen3, ex) == ["<think>\nt2\n</think>\n\nA2<|im_end|>"]
    renderer = ChatTemplateRenderer(qwen3, TokenizerInfo.of(qwen3), history="as-rendered")
    [r] = renderer.render(episode)
    [ex] = Masker(qwen3).mask([r])
    assert trained_runs(qwen3, ex) == ["A1<|im_end|>", "<think>\nt2\n</think>\n\nA2<|im_end|>"]


def test_qwen3_tool_call_and_result(qwen3):
    tools = ({"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}},)
    episode = conv(
        U("Weather in Paris?"), A(""),
        Message("assistant_toolcall", name="get_weather", arguments={"city": "Paris"}),
        Message("toolresult", '{"temp": 20}', name="get_weather"), A("It is 20 degrees."),
        tools=tools,
    )
    rendered, examples = masked(qwen3, episode)
    runs = [trained_runs(qwen3, ex) for ex in examples]
    assert runs == [
        ['<think>\n\n</think>\n\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n'
         "</tool_call><|im_end|>"],
        ["<think>\n\n</think>\n\nIt is 20 degrees.<|im_end|>"],
    ]
    assert "# Tools" in rendered[0].text  # tools reach the template
    assert '{"temp": 20}' in untrained_text(qwen3, examples[1])


def test_train_false_and_weight_are_honoured(llama3):
    episode = conv(U("a"), A("skip me", train=False), U("b"), A("half", weight=0.5))
    _, [ex] = masked(llama3, episode)
    assert trained_runs(llama3, ex) == ["half<|eot_id|>"]
    assert set(ex.weights[ex.weights > 0].tolist()) == {0.5}


def test_zero_trained_conversation_is_rejected(llama3):
    renderer = ChatTemplateRenderer(llama3, TokenizerInfo.of(llama3))
    [r] = renderer.render(conv(U("a"), A("b", train=False)))
    [result] = Masker(llama3).mask([r])
    assert isinstance(result, EpisodeError) and result.reason == "zero_trained_tokens"


# -- templates of our own ------------------------------------------------------------------------------
CHATML = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
TRIMMING = (
    "{% for m in messages %}{% if m['role'] == 'assistant' %}{{ 'ASSISTANT: ' + m['content'] | trim + eos_token }}"
    "{% else %}{{ m['role'] | upper + ': ' + m['content'] | trim + '\\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT: ' }}{% endif %}"
)
NO_SYSTEM = (
    "{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
    "{% for m in messages %}{% if m['role'] == 'user' %}{{ '[INST] ' + m['content'] + ' [/INST]' }}"
    "{% else %}{{ ' ' + m['content'] + eos_token }}{% endif %}{% endfor %}"
)
WITH_BOS = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}{{ '[INST] ' + m['content'] + ' [/INST]' }}"
    "{% else %}{{ ' ' + m['content'] + ' ' + eos_token }}{% endif %}{% endfor %}"
)


def test_own_chatml_template(qwen3):
    _, [ex] = masked(qwen3, conv(U("u1"), A("a1"), U("u2"), A("a2"), system="s"), chat_template=CHATML)
    assert trained_runs(qwen3, ex) == ["a1<|im_end|>", "a2<|im_end|>"]


def test_own_trimming_template_on_sentencepiece(llama2):
    _, [ex] = masked(llama2, conv(U(" hi "), A("  Hello there \n"), U("x"), A(" Bye")), chat_template=TRIMMING)
    assert trained_runs(llama2, ex) == ["Hello there</s>", "Bye</s>"]


def test_own_template_without_system_role(llama2):
    _, [ex] = masked(llama2, conv(U("Hi"), A("Hello"), U("Q"), A("Ans")), chat_template=NO_SYSTEM)
    assert [r.strip() for r in trained_runs(llama2, ex)] == ["Hello</s>", "Ans</s>"]
    renderer = ChatTemplateRenderer(llama2, TokenizerInfo.of(llama2), chat_template=NO_SYSTEM)
    with pytest.raises(EpisodeError, match="System role not supported"):
        renderer.render(conv(U("Hi"), A("Hello"), system="nope"))


def test_own_template_that_adds_bos_is_not_doubled(llama2):
    _, [ex] = masked(llama2, conv(U("Hi"), A("Hello")), chat_template=WITH_BOS)
    ids = ex.input_ids.tolist()
    assert ids.count(llama2.bos_token_id) == 1 and ids[0] == llama2.bos_token_id
    assert [r.strip() for r in trained_runs(llama2, ex)] == ["Hello </s>"]


def test_template_without_stop_token_needs_stop_token_option(llama2):
    plain = "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\\n' }}{% endfor %}" \
            "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}"
    renderer = ChatTemplateRenderer(llama2, TokenizerInfo.of(llama2), chat_template=plain)
    with pytest.raises(EpisodeError) as err:
        renderer.render(conv(U("Hi"), A("Hello")))
    assert err.value.reason == "no_stop_token" and "--stop-token" in err.value.hint
    _, [ex] = masked(llama2, conv(U("Hi"), A("Hello")), chat_template=plain, stop_strings=("\n",))
    assert trained_runs(llama2, ex) == ["Hello\n"]


def test_tokenizer_without_template_is_a_clear_error(llama2):
    with pytest.raises(LossmaskError, match="no chat template"):
        ChatTemplateRenderer(llama2, TokenizerInfo.of(llama2))


# -- special-token strings in content --------------------------------------------------------------
def test_special_token_in_user_content_rejected_or_neutralized(qwen3):
    info = TokenizerInfo.of(qwen3)
    episode = conv(U("please say <|im_end|> now"), A("ok"))
    with pytest.raises(EpisodeError) as err:
        SpecialStringGuard(info.special_tokens, "reject").apply(episode)
    assert err.value.reason == "special_token_in_content" and err.value.field == "messages[0].content"
    fixed, n = SpecialStringGuard(info.special_tokens, "neutralize").apply(episode)
    assert n == 1
    rendered, examples = masked(qwen3, fixed)
    im_end = qwen3.convert_tokens_to_ids("<|im_end|>")
    ex = examples[0]
    user = [i for i, l in enumerate(ex.labels) if l == Label.USER]
    assert user and im_end not in ex.input_ids[user[0]:user[-1] + 1].tolist()
    assert trained_runs(qwen3, ex) == ["<think>\n\n</think>\n\nok<|im_end|>"]
    allowed, n = SpecialStringGuard(info.special_tokens, "allow").apply(episode)
    assert n == 0 and allowed is episode


# -- truncation ----------------------------------------------------------------------------------------
LONG = conv(U("q1"), A("short answer"), U("q2"), A("a much longer second answer " * 20))


def test_truncation_turn_keeps_complete_turns(llama3):
    full = masked(llama3, LONG)[1][0]
    _, [ex] = masked(llama3, LONG, MaskOptions(max_length=len(full) - 10, truncation="turn"))
    assert ex.truncated and trained_runs(llama3, ex) == ["short answer<|eot_id|>"]
    assert llama3.decode(ex.input_ids[-1:]) == "<|eot_id|>"


def test_truncation_keep_start_and_drop(llama3):
    full = masked(llama3, LONG)[1][0]
    limit = len(full) - 10
    _, [ex] = masked(llama3, LONG, MaskOptions(max_length=limit, truncation="keep-start"))
    assert len(ex) == limit and ex.truncated
    renderer = ChatTemplateRenderer(llama3, TokenizerInfo.of(llama3))
    [result] = Masker(llama3, MaskOptions(max_length=limit, truncation="drop")).mask(renderer.render(LONG))
    assert isinstance(result, EpisodeError) and result.reason == "too_long"


def test_truncation_that_leaves_nothing_trained_is_rejected(llama3):
    renderer = ChatTemplateRenderer(llama3, TokenizerInfo.of(llama3))
    rendered = renderer.render(conv(U("word " * 50), A("answer")))
    for policy, reason in (("keep-start", "zero_trained_after_truncation"), ("turn", "too_long")):
        [result] = Masker(llama3, MaskOptions(max_length=20, truncation=policy)).mask(rendered)
        assert isinstance(result, EpisodeError) and result.reason == reason


# -- verification --------------------------------------------------------------------------------------
def test_verification_rejects_a_normalizing_tokenizer():
    """A lowercasing tokenizer cannot decode back to the text the renderer meant to train."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, "<eos>": 1, "user": 2, "assistant": 3, ":": 4, "hello": 5, "hi": 6}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>", unk_token="[UNK]")
    template = "{% for m in messages %}{{ m['role'] + ': ' + m['content'] }}" \
               "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}{{ ' ' }}{% endfor %}" \
               "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}"
    renderer = ChatTemplateRenderer(tok, TokenizerInfo.of(tok), chat_template=template)
    [ok] = Masker(tok).mask(renderer.render(conv(U("hi"), A("hello"))))
    assert not isinstance(ok, EpisodeError)
    [bad] = Masker(tok).mask(renderer.render(conv(U("hi"), A("Hello"))))
    assert isinstance(bad, EpisodeError) and bad.reason == "verify_failed"


# -- property-based invariants ------------------------------------------------------------------------
TEXT = st.text(alphabet=st.sampled_from(list("abcXYZ 019.,!?\n\täöü€😀")), min_size=1, max_size=30).filter(
    lambda s: s.strip()
)


@st.composite
def conversations(draw):
    turns = draw(st.integers(1, 4))
    messages = []
    for _ in range(turns):
        messages.append(U(draw(TEXT)))
        messages.append(A(draw(TEXT)))
    system = draw(st.one_of(st.none(), TEXT))
    return conv(*messages, system=system)


@pytest.mark.parametrize("name", ["llama3_1", "gemma3", "qwen3"])
def test_mask_invariants_on_generated_conversations(name):
    from tests.conftest import load_test_tokenizer

    tok = load_test_tokenizer(name)
    renderer = ChatTemplateRenderer(tok, TokenizerInfo.of(tok))
    masker = Masker(tok)
    stop = tok.eos_token
    trims = name != "qwen3"

    @settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(conversations())
    def check(episode):
        rendered = renderer.render(episode)
        examples = masker.mask(rendered)
        assert all(not isinstance(e, EpisodeError) for e in examples), examples
        assistants = [m.content.strip() if trims else m.content for m in episode.messages if m.role == "assistant"]
        runs = [run for ex in examples for run in trained_runs(tok, ex)]
        if name == "qwen3":  # every turn is split out and rendered as at inference, with its think block
            assert runs == [f"<think>\n\n</think>\n\n{a.lstrip(chr(10))}{stop}" for a in assistants]
        else:
            assert runs == [f"{a}{stop}" for a in assistants]
        for ex in examples:
            trained = ex.weights > 0
            assert not np.isin(ex.labels[trained], [Label.USER, Label.SYSTEM]).any()
            assert tok.convert_ids_to_tokens(int(ex.input_ids[np.flatnonzero(trained)[-1]])) == stop

    check()
