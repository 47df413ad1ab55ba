"""The generation gates of phases 2, 3, 4 and 1b (thresholds in ``lossmask.gate``'s docstring).

Every gate takes held-out records in the native schema with their ``_meta`` gate fields, generates each
assistant block greedily after its gold history (``turns``), and judges the block's structure
(``checks.parse_block``) and its content with the phase's checks. Content checks look at what the model
wrote even when the structure failed; the format check judges the structure on its own.
"""
from __future__ import annotations

import re

from lossmask.gate.checks import (
    Judged,
    answer_language,
    check_dual_stream,
    contains_fact,
    names_docs,
    normalize,
)
from lossmask.gate.report import Check, GateReport, Sample
from lossmask.gate.turns import (
    Turn,
    TurnGenerator,
    assistant_blocks,
    parse_records,
    reference_content,
    turn,
)

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def operators_gate(model, tokenizer, records: list[dict], *, batch_size: int = 32,
                   max_new_tokens: int | None = None, n_samples: int = 8) -> GateReport:
    """Phase 2: the answer equals ``_meta.expected`` (the operator applied to an unseen payload)."""
    generator = TurnGenerator(model, tokenizer, batch_size, max_new_tokens)
    turns = [turn(r, -1, generator.info) for r in parse_records(records)]
    exact = Check("exact match on held-out payloads", 0.8, by_language=True, required=True)
    form = Check("format: closed and stopped", None)
    operators: dict[str, Check] = {}
    report = GateReport("2", "operators", [exact, form], len(turns))
    for t, (judged, generation) in zip(turns, generator.turns(turns)):
        expected = str(t.record.meta.get("expected", reference_content(t)))
        structure = answer_reason(judged, t)
        reason = structure
        if reason is None and judged.block.content.strip() != expected.strip():
            reason = "wrong_answer"
        language = t.record.language
        exact.add(language, reason is None)
        form.add(language, structure is None)
        operator = str(t.record.meta.get("operator", "?"))
        operators.setdefault(operator, Check(f"exact match: {operator}", None)).add(language, reason is None)
        finish(report, t, expected, generation, reason, n_samples)
    report.checks += [operators[k] for k in sorted(operators)]
    return report


def chat_gate(model, tokenizer, records: list[dict], *, batch_size: int = 32,
              max_new_tokens: int | None = None, n_samples: int = 8) -> GateReport:
    """Phase 3: format, echo and anti-echo, the answer's language, system rules, citations with context."""
    generator = TurnGenerator(model, tokenizer, batch_size, max_new_tokens)
    turns = [turn(r, -1, generator.info) for r in parse_records(records)]
    form = Check("format: closed tags and stop", 0.9, by_language=True, required=True)
    echo = Check("echo: exact repeat", 0.8)
    anti = Check("anti-echo: question not repeated (pattern check)", 0.8)
    language = Check("answer language (stop-word pattern check)", 0.9, by_language=True)
    rule = Check("system rule: one sentence / required prefix (pattern check)", 0.8)
    cite = Check("citation names the context document", 0.8)
    fact = Check("context fact in the answer (pattern check)", None)
    dual = Check("dual-stream format", 0.9)
    report = GateReport("3", "chat", [form, echo, anti, language, rule, cite, fact, dual], len(turns))
    for t, (judged, generation) in zip(turns, generator.turns(turns)):
        meta, lang = t.record.meta, t.record.language
        answer = judged.block.content.strip()
        reasons = [r for r in (answer_reason(judged, t),) if r]
        form.add(lang, not reasons)
        pattern = meta.get("pattern")
        if pattern == "echo":
            judge(echo, lang, answer == reference_content(t).strip(), "not_echoed", reasons)
        if pattern == "anti_echo":
            asked = t.question.rpartition(": ")[2]
            judge(anti, lang, bool(answer) and normalize(asked) not in normalize(answer), "echoed_question", reasons)
        detected = answer_language(answer)
        if detected is not None:
            expected_language = meta.get("expected_language") or t.record.language
            judge(language, lang, detected == expected_language, "wrong_language", reasons)
        system_rule = meta.get("system_rule")
        if system_rule == "one_sentence":
            judge(rule, lang, len(_SENTENCE_END.split(answer)) == 1, "broke_system_rule", reasons)
        elif system_rule == "start_with" and meta.get("required_prefix"):
            judge(rule, lang, answer.startswith(meta["required_prefix"]), "broke_system_rule", reasons)
        if meta.get("has_context"):
            judge(cite, lang, names_docs(judged.block.cite, list(meta.get("cited_docs") or [])), "no_citation", reasons)
        if meta.get("answer_fact"):
            fact.add(lang, contains_fact(answer, [str(meta["answer_fact"])]))
        dual_stream(dual, t, judged, reasons)
        finish(report, t, reference_content(t), generation, reasons[0] if reasons else None, n_samples)
    return report


def multiturn_gate(model, tokenizer, records: list[dict], *, batch_size: int = 32,
                   max_new_tokens: int | None = None, n_samples: int = 8) -> GateReport:
    """Phase 4: every assistant turn, after its gold history, stops cleanly without writing the next turn."""
    generator = TurnGenerator(model, tokenizer, batch_size, max_new_tokens)
    parsed = parse_records(records)
    turns = [turn(r, b, generator.info) for r in parsed for b in range(len(assistant_blocks(r.conversation.messages)))]
    clean = Check("clean stop after every turn, no bleed-through", 0.9, by_language=True, required=True)
    whole = Check("conversations with every turn clean", None)
    carry = Check("carried-over fact in the last answer (pattern check)", None)
    dual = Check("dual-stream format", 0.9)
    report = GateReport("4", "multiturn", [clean, whole, carry, dual], len(parsed))
    all_clean: dict[int, bool] = {}
    for t, (judged, generation) in zip(turns, generator.turns(turns)):
        meta, lang = t.record.meta, t.record.language
        reason = answer_reason(judged, t)
        reasons = [reason] if reason else []
        clean.add(lang, reason is None)
        all_clean[t.record.index] = all_clean.get(t.record.index, True) and reason is None
        last = t.block == len(assistant_blocks(t.record.conversation.messages)) - 1
        if last and meta.get("carry_fact"):
            carry.add(lang, contains_fact(judged.block.content, [str(meta["carry_fact"])]))
        dual_stream(dual, t, judged, reasons)
        finish(report, t, reference_content(t), generation, reasons[0] if reasons else None, n_samples)
    for r in parsed:
        whole.add(r.language, all_clean[r.index])
    return report


def longctx_gate(model, tokenizer, records: list[dict], *, batch_size: int = 8,
                 max_new_tokens: int | None = None, n_samples: int = 8) -> GateReport:
    """Phase 1b: after a long context, the answer states the fact of the one document that holds it."""
    generator = TurnGenerator(model, tokenizer, batch_size, max_new_tokens)
    turns = [turn(r, -1, generator.info) for r in parse_records(records)]
    found = Check("fact found in the long context (pattern check)", 0.8, by_language=True, required=True)
    form = Check("format: closed tags and stop", 0.9, by_language=True, required=True)
    cite = Check("citation names the document", 0.8)
    thirds = [Check(f"fact found, document in the {where} third", None) for where in ("first", "middle", "last")]
    report = GateReport("1b", "long context", [found, form, cite, *thirds], len(turns))
    for t, (judged, generation) in zip(turns, generator.turns(turns)):
        meta, lang = t.record.meta, t.record.language
        reasons = [r for r in (answer_reason(judged, t),) if r]
        form.add(lang, not reasons)
        facts = [str(meta["answer_fact"])] if meta.get("answer_fact") else [reference_content(t)]
        hit = contains_fact(judged.block.content, facts)
        judge(found, lang, hit, "fact_missing", reasons)
        if meta.get("cited_docs"):
            judge(cite, lang, names_docs(judged.block.cite, list(meta["cited_docs"])), "no_citation", reasons)
        position = meta.get("fact_position")
        if isinstance(position, (int, float)):
            thirds[min(2, int(float(position) * 3))].add(lang, hit)
        finish(report, t, reference_content(t), generation, reasons[0] if reasons else None, n_samples)
    return report


# ---- shared by the gates ---------------------------------------------------------------------------------


def answer_reason(judged: Judged, t: Turn) -> str | None:
    """Why a generated answer block fails structurally; a tool call where the reference answers fails too."""
    if judged.reason is not None:
        return judged.reason
    if judged.block.calls and not any(m.role == "assistant_toolcall" for m in t.messages):
        return "unexpected_tool_call"
    return None


def judge(check: Check, language: str, ok: bool, reason: str, reasons: list[str]) -> None:
    """Count one item of ``check``; a failure adds ``reason`` to the item's reasons."""
    check.add(language, ok)
    if not ok:
        reasons.append(reason)


def dual_stream(check: Check, t: Turn, judged: Judged, reasons: list[str]) -> None:
    """For records marked ``_meta.dual_stream``: the answer's think/proof/answer layout."""
    if t.record.meta.get("dual_stream"):
        problem = check_dual_stream(judged.block.content)
        judge(check, t.record.language, problem is None, f"dual_stream:{problem}", reasons)


def finish(report: GateReport, t: Turn, expected: str, generation: str, reason: str | None, n_samples: int) -> None:
    """Count the item's failure reason and keep it as a sample while there is room."""
    if reason is not None:
        report.fail(reason)
    if len(report.samples) < n_samples:
        report.samples.append(Sample(t.record.language, t.question, expected, generation, reason is None, reason))

