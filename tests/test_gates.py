"""Phase 2-6 and 1b gates, the block parser, pattern checks, dual-stream, regression and OOD warnings.

Gates run against ``ScriptedModel``: for every prompt it finds the record's reference block (by rendering the
record independently with the myPT renderer) and returns ``script(reference, prompt)``: the reference for a
perfect model, an edited reference for each failure mode.
"""
from __future__ import annotations

import json
import re

import pytest
import torch
from rich.console import Console
from transformers import LlamaConfig, LlamaForCausalLM

from lossmask.episode import Source
from lossmask.errors import LossmaskError
from lossmask.gate import (
    CURRICULUM,
    Check,
    agentic_gate,
    answer_language,
    chat_gate,
    check_dual_stream,
    gate_phase,
    longctx_gate,
    multiturn_gate,
    operators_gate,
    parse_block,
    parse_call,
    print_gate_report,
    regression_phases,
    run_gate,
    run_regression,
    toolcall_gate,
)
from lossmask.gate.generation import special_strings
from lossmask.generate import generate_phase
from lossmask.render.mypt import MyptRenderer
from lossmask.sources import parse_record
from lossmask.tiny_tokenizer import build_tiny_tokenizer
from lossmask.tokenizer import TokenizerInfo

OPEN, CLOSE, EOT = "<myPT_assistant>", "</myPT_assistant>", "<myPT_eot>"
ENDING = CLOSE + EOT


def held_out(phase: str, n: int, seed: int = 3, languages=("en", "de"), **options) -> list[dict]:
    return [r for r in generate_phase(phase, n, seed, languages, held_out=True, **options) if not r.get("_replay")]


OPERATORS = held_out("2", 24)
CHAT = held_out("3", 40)
MULTITURN = held_out("4", 12)
TOOLCALL = held_out("5", 20)
AGENTIC = held_out("6", 20)
LONGCTX = held_out("1b", 6, target_tokens=150)


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    texts = []
    for phase in ("1", "2", "3", "4", "5", "6"):
        for record in generate_phase(phase, 60, 0):
            texts.append(record["system"])
            texts += [m.get("content") or json.dumps(m.get("arguments")) for m in record["messages"]]
    return build_tiny_tokenizer(texts, tmp_path_factory.mktemp("gates") / "tok", vocab_size=1024)


def reference_blocks(records: list[dict], tok) -> dict[str, tuple[str, dict]]:
    """prompt → (reference block, record) for every assistant block, cut from the rendered record."""
    info = TokenizerInfo.of(tok)
    table = {}
    for i, record in enumerate(records):
        text = MyptRenderer(info).render(parse_record(record, Source("t", i + 1)))[0].text
        at = 0
        while (k := text.find(OPEN, at)) != -1:
            start = k + len(OPEN)
            end = text.index(CLOSE, start) + len(CLOSE)
            end += len(EOT) if text.startswith(EOT, end) else 0
            table[text[:start]] = (text[start:end], record)
            at = end
    return table


class ScriptedModel(torch.nn.Module):
    """Continues every prompt with ``script(reference, record, prompt)``; the reference is None for a prompt
    no record renders (an agentic episode that left the reference path), the record then the one whose
    first prompt starts it (None for a prompt of no record). Like ``generate``: prompt + continuation, cut
    at max_new_tokens, right-padded."""

    def __init__(self, tok, records, script=lambda ref, record, prompt: ref):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.tok, self.script = tok, script
        self.table = reference_blocks(records, tok)
        self.calls = 0

    def generate(self, input_ids, attention_mask, max_new_tokens, eos_token_id, pad_token_id, do_sample, **kwargs):
        assert do_sample is False and not self.training
        self.calls += 1
        rows = []
        for ids, mask in zip(input_ids.tolist(), attention_mask.tolist()):
            start = mask.index(1)
            prompt = self.tok.decode(ids[start:])
            reference, record = self.table.get(prompt, (None, None))
            if record is None:
                starts = [(len(k), v[1]) for k, v in self.table.items() if prompt.startswith(k)]
                record = max(starts, key=lambda x: x[0])[1] if starts else None
            text = self.script(reference, record, prompt)
            rows.append(self.tok.encode(text, add_special_tokens=False)[:max_new_tokens])
        width = max(len(r) for r in rows)
        padded = [r + [pad_token_id] * (width - len(r)) for r in rows]
        return torch.cat([input_ids, torch.tensor(padded, dtype=torch.long)], dim=1)


def first_block(record: dict, tok) -> str:
    table = reference_blocks([record], tok)
    return min(table.items(), key=lambda kv: len(kv[0]))[1][0]


# ---- the block parser and pattern checks -------------------------------------------------------------------


@pytest.mark.parametrize(
    "generation, reason",
    [
        ("Paris" + ENDING, None),
        ("<myPT_think>t</myPT_think>A<myPT_cite>doc:a</myPT_cite>" + ENDING, None),
        ('<myPT_toolcall>{"name": "x", "arguments": {}}</myPT_toolcall>' + CLOSE + "<myPT_toolresult>junk", None),
        ("Paris and more and more", "no_close"),
        ("Paris" + CLOSE, "no_eot"),
        ("Paris" + CLOSE + "<myPT_user>Next?</myPT_user>", "no_eot"),
        ("Paris" + EOT, "not_closed"),
        ("<myPT_think>t" + ENDING, "unclosed_tag"),
        ("<myPT_think>t", "no_close"),
        ("Paris<myPT_think>t</myPT_think>" + ENDING, "misplaced_tag"),
        ("Paris<myPT_user>Next?" + ENDING, "runaway"),
        ("Paris<myPT_assistant>Paris" + ENDING, "runaway"),
        ("Paris" + ENDING + "more", "after_eot"),
        (" \n" + ENDING, "empty_answer"),
        ("<myPT_think>only thinking</myPT_think>" + ENDING, "empty_answer"),
    ],
)
def test_parse_block_reasons(tok, generation, reason):
    assert parse_block(generation, special_strings(tok)).reason == reason


def test_parse_block_parts_and_the_text_up_to_the_end(tok):
    call = '{"name": "workspace.search", "arguments": {"query": "x"}}'
    text = f"<myPT_think>T</myPT_think>A<myPT_cite>doc:a</myPT_cite><myPT_toolcall>{call}</myPT_toolcall>{CLOSE}"
    judged = parse_block(text + "<myPT_toolresult>invented</myPT_toolresult>", special_strings(tok))
    block = judged.block
    assert (judged.reason, block.think, block.content, block.cite, block.calls) == (None, "T", "A", "doc:a", (call,))
    assert block.text == text
    answer = parse_block("A<myPT_cite>c</myPT_cite>" + ENDING, special_strings(tok)).block
    assert (answer.content, answer.cite, answer.calls) == ("A", "c", ())
    assert answer.text == "A<myPT_cite>c</myPT_cite>" + ENDING


@pytest.mark.parametrize(
    "text, reason",
    [
        ("<think>a</think><proof>b</proof><answer>c</answer>", None),
        ("<think>a</think>\n<proof>b</proof>\n<answer>c</answer>", None),
        ("<think>a</think><answer>c</answer>", "missing_proof"),
        ("<proof>b</proof><think>a</think><answer>c</answer>", "out_of_order"),
        ("<think>a<proof>b</proof></think><answer>c</answer>", "out_of_order"),
        ("<think>a</think><proof>b</proof><answer>c", "unclosed_answer"),
        ("<think>a</think><think>a</think><proof>b</proof><answer>c</answer>", "repeated_think"),
        ("<think>a</think><proof>b</proof><answer> </answer>", "empty_answer"),
        ("no tags at all", "missing_think"),
    ],
)
def test_dual_stream_checker(text, reason):
    assert check_dual_stream(text) == reason


def test_answer_language_is_a_stop_word_pattern_check():
    assert answer_language("The capital of France is Paris.") == "en"
    assert answer_language("Die Hauptstadt von Frankreich ist Paris.") == "de"
    assert answer_language("Eine Brücke über den Fluss.") == "de"
    assert answer_language("Paris") is None  # too short to tell
    assert answer_language("the der") is None  # a tie


def test_answer_language_agrees_with_every_generated_reference_answer():
    for record in held_out("3", 300, seed=9) + generate_phase("3", 300, 9):
        detected = answer_language(record["messages"][-1]["content"])
        assert detected in (None, record["_meta"]["expected_language"])


def test_parse_call_checks_json_shape_tool_and_schema():
    assert parse_call('{"name": "workspace.get_doc", "arguments": {"doc_id": "a/b"}}') == (
        None, "workspace.get_doc", {"doc_id": "a/b"})
    assert parse_call('{"name": "workspace.search", "arguments": {"query": "x"}')[0] == "bad_json"
    assert parse_call('{"name": "workspace.search"}')[0] == "bad_call_shape"
    assert parse_call('{"name": "web.search", "arguments": {"query": "x"}}')[0] == "unknown_tool"
    assert parse_call('{"name": "workspace.search", "arguments": {"q": "x"}}')[0] == "bad_arguments"
    assert parse_call('{"name": "workspace.search", "arguments": {"query": "x", "top_k": 99}}')[0] == "bad_arguments"


def test_generation_stops_a_row_at_the_end_of_a_tool_call_block():
    from lossmask.gate.generation import _stop_after_pair

    (criterion,) = _stop_after_pair(5, 7)
    rows = torch.tensor([[1, 5, 7], [5, 7, 1], [1, 7, 5]])
    assert criterion(rows, None).tolist() == [True, False, False]


def test_check_thresholds_overall_per_language_and_unjudged():
    check = Check("c", 0.8, by_language=True)
    for ok in [True] * 9 + [False]:
        check.add("en", ok)
    check.add("de", False)
    assert check.rate == 9 / 11 and not check.ok  # 81.8% overall, but German at 0%
    assert Check("c", 0.8, by_language=False, passed=9, total=11).ok
    assert Check("optional", 0.8).ok and not Check("main", 0.8, required=True).ok
    assert Check("info", None, passed=0, total=5).ok


# ---- phase 2 ---------------------------------------------------------------------------------------------


def test_operators_gate_passes_exact_answers(tok):
    model = ScriptedModel(tok, OPERATORS)
    report = operators_gate(model, tok, OPERATORS, batch_size=10)
    assert report.passed and report.failures == {} and report.prompts == 24 and model.calls == 3
    exact = report.check("exact match on held-out payloads")
    assert (exact.passed, exact.total) == (24, 24)
    assert {k: (t.passed, t.total) for k, t in exact.per_language.items()} == {"de": (12, 12), "en": (12, 12)}
    counts = {op: sum(r["_meta"]["operator"] == op for r in OPERATORS) for op in ("COPY", "WRAP", "EXTRACT")}
    assert {op: report.check(f"exact match: {op}").total for op in counts} == counts
    assert report.samples[0].generation == reference_blocks(OPERATORS[:1], tok).popitem()[1][0]


def test_operators_gate_fails_wrong_answers_and_bad_format(tok):
    wrong = operators_gate(ScriptedModel(tok, OPERATORS, lambda ref, r, p: "x" + ref), tok, OPERATORS)
    assert not wrong.passed and wrong.failures == {"wrong_answer": 24}
    assert wrong.check("format: closed and stopped").rate == 1.0
    unclosed = operators_gate(ScriptedModel(tok, OPERATORS, lambda ref, r, p: ref.replace(EOT, "")), tok, OPERATORS)
    assert unclosed.failures == {"no_eot": 24} and unclosed.check("format: closed and stopped").rate == 0.0


def test_operators_gate_needs_every_language_above_the_threshold(tok):
    records = held_out("2", 20, languages=("en",)) + held_out("2", 5, languages=("de",))
    report = operators_gate(ScriptedModel(tok, records, lambda ref, r, p: ref if r["language"] == "en" else "?" + ref),
                            tok, records)
    exact = report.check("exact match on held-out payloads")
    assert exact.rate == 0.8 and exact.per_language["de"].pass_rate == 0.0 and not report.passed


def test_turn_budget_is_relative_to_the_reference_unless_max_new_tokens(tok):
    record = OPERATORS[0]
    reference = reference_blocks([record], tok).popitem()[1][0]
    tokens = len(tok.encode(reference, add_special_tokens=False))
    budget = -(-3 * tokens // 2) + 16
    padding = "x" * (budget - tokens)  # "x" is one token here
    assert len(tok.encode(padding + reference, add_special_tokens=False)) == budget

    def gate(extra, **kw):
        return operators_gate(ScriptedModel(tok, [record], lambda ref, r, p: extra + ref), tok, [record], **kw)

    assert gate(padding).failures == {"wrong_answer": 1}  # ended within the budget
    assert gate(padding + "x").failures == {"no_eot": 1}  # the budget cuts off <myPT_eot>
    assert gate(padding + "x" * 3).failures == {"no_close": 1}
    assert gate("", max_new_tokens=tokens).passed and gate("", max_new_tokens=tokens - 1).failures == {"no_eot": 1}


# ---- phase 3 ---------------------------------------------------------------------------------------------


def count(records, **meta) -> int:
    return sum(all(r["_meta"].get(k) == v for k, v in meta.items()) for r in records)


def test_chat_gate_passes_the_reference_answers(tok):
    report = chat_gate(ScriptedModel(tok, CHAT), tok, CHAT)
    assert report.passed and report.failures == {}
    assert report.check("echo: exact repeat").total == count(CHAT, pattern="echo") > 0
    assert report.check("citation names the context document").total == count(CHAT, has_context=True) > 0
    assert report.check("answer language (stop-word pattern check)").total > 10


def test_chat_gate_failure_modes(tok):
    def run(script):
        return chat_gate(ScriptedModel(tok, CHAT, script), tok, CHAT)

    no_cite = run(lambda ref, r, p: re.sub(r"<myPT_cite>.*?</myPT_cite>", "", ref))
    assert no_cite.failures == {"no_citation": count(CHAT, has_context=True)} and not no_cite.passed
    other = {"en": "Das ist die Antwort und sie ist nicht richtig.", "de": "This is the answer and it is not right."}
    wrong_language = run(lambda ref, r, p: other[r["_meta"]["expected_language"]] + ENDING)
    language = wrong_language.check("answer language (stop-word pattern check)")
    assert (language.passed, language.total) == (0, len(CHAT)) and not wrong_language.passed
    echo = run(lambda ref, r, p: ("Something else entirely." + ENDING) if r["_meta"]["pattern"] == "echo" else ref)
    assert echo.check("echo: exact repeat").rate == 0.0 and echo.failures["not_echoed"] == count(CHAT, pattern="echo")

    def parrot(ref, record, prompt):
        question = record["messages"][0]["content"].rpartition(": ")[2]
        return (question + ENDING) if record["_meta"]["pattern"] == "anti_echo" else ref

    anti = run(parrot)
    assert anti.check("anti-echo: question not repeated (pattern check)").rate == 0.0
    assert anti.failures["echoed_question"] == count(CHAT, pattern="anti_echo")
    runaway = run(lambda ref, r, p: ref.replace(CLOSE, "<myPT_user>" + CLOSE))
    assert runaway.check("format: closed tags and stop").rate == 0.0 and runaway.failures["runaway"] == len(CHAT)


def dual_stream_record(language: str) -> dict:
    content = "<think>Add them.</think><proof>2 + 2 = 4</proof><answer>4</answer>"
    return {"system": "You are MyPT.", "language": language,
            "messages": [{"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": content}],
            "_meta": {"generator": "hand", "phase": "3", "pattern": "dual", "dual_stream": True,
                      "expected_language": language, "has_context": False, "cited_docs": []}}


def test_dual_stream_records_are_checked_in_the_gates(tok):
    records = [dual_stream_record("en"), dual_stream_record("de")]
    good = chat_gate(ScriptedModel(tok, records), tok, records)
    assert good.passed and good.check("dual-stream format").total == 2
    bad = chat_gate(ScriptedModel(tok, records, lambda ref, r, p: ref.replace("<proof>2 + 2 = 4</proof>", "")),
                    tok, records)
    assert bad.failures == {"dual_stream:missing_proof": 2} and not bad.passed


# ---- phase 4 ---------------------------------------------------------------------------------------------


def test_multiturn_gate_generates_every_turn_after_its_gold_history(tok):
    turns = sum(r["_meta"]["turns"] for r in MULTITURN)
    model = ScriptedModel(tok, MULTITURN)
    report = multiturn_gate(model, tok, MULTITURN)
    clean = report.check("clean stop after every turn, no bleed-through")
    assert report.passed and (clean.passed, clean.total) == (turns, turns)
    carried = report.check("carried-over fact in the last answer (pattern check)")
    assert carried.total == count(MULTITURN, pattern="carry_over") and carried.rate == 1.0


def test_multiturn_gate_catches_bleed_through_into_the_next_turn(tok):
    def bleed_on_turn_two(ref, record, prompt):
        second = prompt.count(OPEN) == 2
        return ref.replace(EOT, "<myPT_user>And then?</myPT_user>") if second else ref

    report = multiturn_gate(ScriptedModel(tok, MULTITURN, bleed_on_turn_two), tok, MULTITURN)
    turns = sum(r["_meta"]["turns"] for r in MULTITURN)
    clean = report.check("clean stop after every turn, no bleed-through")
    assert (clean.passed, clean.total) == (turns - len(MULTITURN), turns)
    assert report.failures == {"no_eot": len(MULTITURN)}
    assert report.check("conversations with every turn clean").rate == 0.0 and not report.passed
    inside = multiturn_gate(ScriptedModel(tok, MULTITURN, lambda ref, r, p: "<myPT_user>" + ref), tok, MULTITURN)
    assert inside.failures == {"runaway": turns}


# ---- phases 5 and 6 --------------------------------------------------------------------------------------


def single_searches() -> list[dict]:
    """The phase-5 episodes with one search (no correction episode)."""
    meta = [r["_meta"] for r in TOOLCALL]
    return [r for r, m in zip(TOOLCALL, meta) if m["expected_tools"] == ["workspace.search"] and not m["correction"]]


def test_toolcall_gate_passes_the_reference_calls_and_answers(tok):
    report = toolcall_gate(ScriptedModel(tok, TOOLCALL), tok, TOOLCALL)
    tools = [r for r in TOOLCALL if r["_meta"]["expected_tools"]]
    assert report.passed and report.failures == {}
    assert report.check("right tool with valid JSON arguments").total == len(tools) > 0
    assert report.check("no tool call when none is needed").total == len(TOOLCALL) - len(tools) > 0
    assert report.check("the model's call runs without a tool error").rate == 1.0


@pytest.mark.parametrize(
    "edit, reason",
    [
        (lambda ref: ref.replace('"workspace.search"', '"workspace.list_docs"'), "bad_arguments"),  # no query arg
        (lambda ref: ref.replace('"query"', '"q"'), "bad_arguments"),
        (lambda ref: ref.replace("}</myPT_toolcall>", "</myPT_toolcall>"), "bad_json"),
        (lambda ref: ref.replace('"workspace.', '"web.'), "unknown_tool"),
        (lambda ref: re.sub(r"<myPT_toolcall>.*</myPT_toolcall>", "I do not know.", ref) + EOT, "no_tool_call"),
    ],
)
def test_toolcall_gate_fails_bad_calls(tok, edit, reason):
    tools = single_searches()
    model = ScriptedModel(tok, tools, lambda ref, r, p: edit(ref) if "<myPT_toolcall>" in ref else ref)
    report = toolcall_gate(model, tok, tools)
    assert report.failures == {reason: len(tools)}
    assert report.check("right tool with valid JSON arguments").rate == 0.0 and not report.passed
    assert report.check("grounded answer: cites the source, states the key fact (pattern check)").rate == 1.0


def test_toolcall_gate_checks_the_tool_name_grounding_and_no_tool_answers(tok):
    tools = single_searches()
    other = '{"name": "workspace.get_doc", "arguments": {"doc_id": "no/such-doc"}}'
    wrong = toolcall_gate(ScriptedModel(tok, tools, lambda ref, r, p: re.sub(
        r"<myPT_toolcall>.*</myPT_toolcall>", f"<myPT_toolcall>{other}</myPT_toolcall>", ref)), tok, tools)
    assert wrong.failures == {"wrong_tool": len(tools)}
    assert wrong.check("the model's call runs without a tool error").rate == 0.0  # the real workspace said no

    def unsourced(ref, record, prompt):
        return re.sub(r"<myPT_cite>.*?</myPT_cite>", "", ref) if "<myPT_cite>" in ref else ref

    assert toolcall_gate(ScriptedModel(tok, tools, unsourced), tok, tools).failures == {"not_grounded": len(tools)}
    facts = toolcall_gate(ScriptedModel(tok, tools, lambda ref, r, p: re.sub(
        r"[^>]*(?=<myPT_cite>)", "Here is the answer.", ref)), tok, tools)
    assert facts.failures == {"not_grounded": len(tools)}

    no_tool = [r for r in TOOLCALL if not r["_meta"]["expected_tools"]]
    call = '<myPT_toolcall>{"name": "workspace.search", "arguments": {"query": "x"}}</myPT_toolcall>' + CLOSE
    report = toolcall_gate(ScriptedModel(tok, no_tool, lambda ref, r, p: call), tok, no_tool)
    assert report.failures == {"unexpected_tool_call": len(no_tool)}
    assert report.check("no tool call when none is needed").rate == 0.0 and not report.passed


def test_toolcall_records_need_expected_tools(tok):
    record = dict(OPERATORS[0])
    with pytest.raises(LossmaskError, match="expected_tools must be a list"):
        toolcall_gate(ScriptedModel(tok, [record]), tok, [record])


def test_agentic_gate_runs_the_models_calls_on_the_workspace(tok):
    model = ScriptedModel(tok, AGENTIC)
    report = agentic_gate(model, tok, AGENTIC, batch_size=64)
    steps = max(len(r["_meta"]["expected_tools"]) for r in AGENTIC) + 1
    assert model.calls == steps  # all episodes step together, one batch per step
    assert report.passed and report.failures == {}
    assert report.check("tools called as in the reference").rate == 1.0
    first = report.samples[0]
    assert first.generation.count("<myPT_toolresult>") == len(AGENTIC[0]["_meta"]["expected_tools"])


def test_agentic_gate_catches_loops_step_limits_and_ungrounded_answers(tok):
    chains = [r for r in AGENTIC if r["_meta"]["expected_tools"]]

    def repeat_first_call(ref, record, prompt):
        return first_block(record, tok)

    loops = agentic_gate(ScriptedModel(tok, chains, repeat_first_call), tok, chains)
    assert loops.failures == {"loop": len(chains)} and loops.check("no loop (the same call repeated)").rate == 0.0

    def new_search_every_time(ref, record, prompt):
        query = f"step {prompt.count(OPEN)}"
        call = json.dumps({"name": "workspace.search", "arguments": {"query": query}})
        return f"<myPT_toolcall>{call}</myPT_toolcall>{CLOSE}"

    stuck = agentic_gate(ScriptedModel(tok, chains, new_search_every_time), tok, chains)
    assert stuck.failures == {"max_steps": len(chains)} and stuck.check("no loop (the same call repeated)").rate == 1.0
    vague = agentic_gate(ScriptedModel(tok, chains, lambda ref, r, p: ref if "<myPT_toolcall>" in ref else
                                       "I found it." + ENDING), tok, chains)
    assert vague.failures == {"not_grounded": len(chains)}
    assert vague.check("chain completed: answered within the step limit, valid calls").rate == 1.0
    assert not vague.passed


# ---- phase 1b ----------------------------------------------------------------------------------------------


def test_longctx_gate_wants_the_fact_from_the_long_context(tok):
    assert longctx_gate(ScriptedModel(tok, LONGCTX), tok, LONGCTX).passed
    def unsure(ref, record, prompt):
        return "I could not find it." + ref[ref.index("<myPT_cite>") :]

    report = longctx_gate(ScriptedModel(tok, LONGCTX, unsure), tok, LONGCTX)
    assert report.failures == {"fact_missing": len(LONGCTX)} and not report.passed
    thirds = [c for c in report.checks if c.name.startswith("fact found, document in the")]
    assert sum(c.total for c in thirds) == len(LONGCTX)


# ---- running gates -----------------------------------------------------------------------------------------


def test_a_random_model_fails_and_batching_does_not_change_its_generations(tok):
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=512,
                         pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, tie_word_embeddings=False)
    model = LlamaForCausalLM(config)
    records = OPERATORS[:6]
    batched = operators_gate(model, tok, records, batch_size=6, n_samples=6)
    alone = operators_gate(model, tok, records, batch_size=1, n_samples=6)
    assert not batched.passed and batched.check("exact match on held-out payloads").passed == 0
    assert [s.generation for s in batched.samples] == [s.generation for s in alone.samples]


def test_run_gate_reads_prompt_files_and_reports_ood_shortfalls_as_warnings(tok, tmp_path):
    path = tmp_path / "held_out.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n\n" for r in OPERATORS), encoding="utf-8")
    model = ScriptedModel(tok, OPERATORS, lambda ref, r, p: ref if ref is not None else "?" + ENDING)
    report = run_gate("phase2", prompts=path, model=model, tokenizer=tok)
    assert report.passed and report.prompts == len(OPERATORS)
    assert report.ood is not None and report.ood.prompts > 0 and not report.ood.passed
    assert report.warnings and "out-of-distribution prompts: exact match" in report.warnings[0]
    assert run_gate(2, prompts=OPERATORS, model=model, tokenizer=tok, ood=False).ood is None
    path.write_text("{not json}\n")
    with pytest.raises(LossmaskError, match=r"held_out.jsonl:1: not valid JSON"):
        run_gate("2", prompts=path, model=model, tokenizer=tok)
    with pytest.raises(LossmaskError, match="unknown phase '7'"):
        run_gate("7", prompts=OPERATORS, model=model, tokenizer=tok)


def test_shipped_ood_prompts_pass_with_their_reference_answers(tok):
    from lossmask.gate import ood_prompts

    for phase in ("1", "2", "3", "4", "5", "6"):
        records = ood_prompts(phase)
        languages = {r["language"] for r in records}
        assert languages == {"en", "de"} and all(r["_meta"]["split"] == "ood" for r in records)
        report = gate_phase(phase, ScriptedModel(tok, records), tok, records)
        assert report.passed and report.failures == {}, phase


def test_regression_runs_every_earlier_phase_on_one_model(tok):
    assert CURRICULUM == ("1", "2", "3", "4", "1b", "5", "6")
    assert regression_phases("2") == ("1", "2") and regression_phases("5") == ("1", "2", "3", "4", "1b", "5")
    phase1 = held_out("1", 8)
    model = ScriptedModel(tok, phase1 + OPERATORS)
    reports = run_regression(up_to_phase="2", prompts={"1": phase1, "phase2": OPERATORS}, model=model,
                             tokenizer=tok, ood=False)
    assert [(r.phase, r.passed, r.prompts) for r in reports] == [("1", True, 8), ("2", True, 24)]


def test_print_gate_report_shows_checks_thresholds_samples_and_warnings(tok):
    records = OPERATORS[:4]
    report = operators_gate(ScriptedModel(tok, records, lambda ref, r, p: "x" + ref), tok, records)
    report.warnings.append("out-of-distribution prompts: something")
    console = Console(record=True, width=200)
    print_gate_report(report, console)
    text = console.export_text()
    assert "phase 2 gate: operators (4 prompts) FAIL" in text and "≥ 80% each" in text
    assert "wrong_answer 4" in text and "warning: out-of-distribution prompts: something" in text
    assert records[0]["messages"][0]["content"] in text


def test_bad_records_are_clear_errors(tok):
    with pytest.raises(LossmaskError, match="at least one held-out prompt"):
        chat_gate(ScriptedModel(tok, []), tok, [])
    no_answer = {"messages": [{"role": "user", "content": "Hi"}], "_meta": {}}
    with pytest.raises(LossmaskError, match="no_assistant|no assistant"):
        chat_gate(ScriptedModel(tok, []), tok, [no_answer])
