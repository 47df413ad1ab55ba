"""The tool gates: phase 5 (one tool call) and phase 6 (multi-step chains), against a real workspace.

Phase 5 generates three kinds of turns, each after its gold history:

- the *call* turn of a tool episode (``_meta.expected_tools`` not empty): its first tool call must parse as
  ``{"name": ..., "arguments": {...}}``, name ``expected_tools[0]`` and fit that tool's schema
  (``workspace.check_call``); the call is then run on the workspace (``Workspace.call``) and whether it
  comes back without ``{"error": ...}`` is reported;
- the *answer* turn of a tool episode, after the gold tool result (so a wrong call does not also fail the
  answer): it must be well formed, cite every ``_meta.cited_docs`` id in its cite block and contain every key
  fact (a pattern check on ``_meta.answer_contains``, or ``answer_fact``, when the record has them);
- the answer of a no-tool episode (``expected_tools`` = []): well formed, with no tool call (whether it
  also states ``answer_contains`` is reported).

A correction episode (``_meta.correction``: a wrong tool on purpose, then the right one) accepts either
tool as the first call.

Phase 6 runs each episode as the runtime would: from the first user message the model writes a block;
every tool call in it runs on the workspace and its result is appended as ``<myPT_toolresult>``, and the
model writes the next block; an answer block ends the episode. An episode fails on a malformed block, a
call that does not parse or fit the schema, a *loop* (a call with the same name and arguments as an
earlier one) or when it has not answered after ``len(expected_tools) + 1 + EXTRA_STEPS`` blocks. All
episodes step together: one batched generation per step.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from lossmask.errors import LossmaskError
from lossmask.gate.checks import Judged, contains_fact, names_docs, parse_block
from lossmask.gate.generation import OPEN
from lossmask.gate.phases import answer_reason, dual_stream, finish, judge
from lossmask.gate.report import Check, GateReport, Sample
from lossmask.gate.turns import (
    Record,
    Turn,
    TurnGenerator,
    assistant_blocks,
    parse_records,
    reference_content,
    turn,
)

EXTRA_STEPS = 2  # blocks an agentic episode may take beyond the reference's before it counts as stuck


def open_workspace(workspace: str | Path | None):
    """The workspace the tools run on: ``workspace``, or the shipped sample the generators use."""
    from lossmask.workspace import Workspace, sample_workspace

    return Workspace(Path(workspace) if workspace is not None else sample_workspace())


def parse_call(text: str) -> tuple[str | None, str | None, dict | None]:
    """(reason or None, name, arguments) of one tool-call text: JSON ``{"name", "arguments"}`` fitting a
    tool schema. Reasons: ``bad_json``, ``bad_call_shape``, ``unknown_tool``, ``bad_arguments``."""
    from lossmask.workspace import check_call

    try:
        call = json.loads(text)
    except (ValueError, RecursionError):
        return "bad_json", None, None
    if not isinstance(call, dict) or set(call) != {"name", "arguments"}:
        return "bad_call_shape", None, None
    name, arguments = call["name"], call["arguments"]
    problem = check_call(name, arguments)
    if problem is not None:
        return ("unknown_tool" if problem.startswith("unknown tool") else "bad_arguments"), None, None
    return None, name, arguments


def is_error(result: str) -> bool:
    """Whether a workspace result is an ``{"error": ...}`` object."""
    try:
        value = json.loads(result)
    except ValueError:
        return True
    return isinstance(value, dict) and "error" in value


def key_facts(meta: dict) -> list[str]:
    """The facts a grounded answer must state, all of them: ``answer_contains`` (a list, the tool
    generators), or ``answer_fact`` / ``key_fact`` (a string)."""
    contains = meta.get("answer_contains")
    if isinstance(contains, list):
        return [str(v) for v in contains if str(v).strip()]
    for key in ("answer_fact", "key_fact"):
        value = meta.get(key)
        if isinstance(value, str) and value.strip():
            return [value]
    return []


def states_facts(judged: Judged, meta: dict) -> bool:
    """Whether the answer contains every key fact (a pattern check; true when the record names none)."""
    return all(contains_fact(judged.block.content, [fact]) for fact in key_facts(meta))


def grounded(judged: Judged, meta: dict) -> bool:
    """An answer cites every expected document and states every key fact."""
    cited = list(meta.get("cited_docs") or [])
    return (not cited or names_docs(judged.block.cite, cited)) and states_facts(judged, meta)


def right_tools(record: Record, tools: list[str]) -> set[str]:
    """The tools a first call may name: the reference's first, and for a correction episode (a wrong tool
    on purpose, then the right one: ``_meta.correction``) also the tool it corrects to."""
    right = {tools[0]}
    if record.meta.get("correction") and len(tools) > 1:
        right.add(tools[1])
    return right


def _expected_tools(record: Record) -> list[str]:
    tools = record.meta.get("expected_tools")
    if not isinstance(tools, list) or not all(isinstance(t, str) for t in tools):
        raise LossmaskError(
            f"held-out prompt {record.index + 1}: _meta.expected_tools must be a list of tool names ([] for an "
            "episode that needs no tool); generate the prompts with the toolcall or agentic generator"
        )
    if tools and not any(m.role == "assistant_toolcall" for m in record.conversation.messages):
        raise LossmaskError(f"held-out prompt {record.index + 1}: expected_tools is {tools} but it has no tool call")
    return tools


def toolcall_gate(model, tokenizer, records: list[dict], *, workspace: str | Path | None = None,
                  batch_size: int = 32, max_new_tokens: int | None = None, n_samples: int = 8) -> GateReport:
    """Phase 5 (see the module docstring)."""
    generator = TurnGenerator(model, tokenizer, batch_size, max_new_tokens)
    parsed = parse_records(records)
    ws = open_workspace(workspace)
    right_call = Check("right tool with valid JSON arguments", 0.9, by_language=True, required=True)
    runs = Check("the model's call runs without a tool error", None)
    no_tool = Check("no tool call when none is needed", 0.8)
    answer = Check("grounded answer: cites the source, states the key fact (pattern check)", 0.8)
    direct = Check("no-tool answer states the expected fact (pattern check)", None)
    dual = Check("dual-stream format", 0.9)
    report = GateReport("5", "tool call", [right_call, no_tool, answer, runs, direct, dual], len(parsed))
    items: list[tuple[str, Turn, list[str]]] = []
    for r in parsed:
        tools = _expected_tools(r)
        if tools:
            items += [("call", turn(r, 0, generator.info), tools), ("answer", turn(r, -1, generator.info), tools)]
        else:
            items.append(("no_tool", turn(r, -1, generator.info), tools))
    try:
        for (kind, t, tools), (judged, generation) in zip(items, generator.turns([t for _, t, _ in items])):
            lang = t.record.language
            reasons: list[str] = []
            if kind == "call":
                reason, name, arguments = _first_call(judged)
                if reason is None and name not in right_tools(t.record, tools):
                    reason = "wrong_tool"
                judge(right_call, lang, reason is None, reason or "", reasons)
                if name is not None:
                    runs.add(lang, not is_error(ws.call(name, arguments)))
                expected = next(m for m in t.messages if m.role == "assistant_toolcall").name or ""
            else:
                structure = answer_reason(judged, t)
                if structure:
                    reasons.append(structure)
                if kind == "no_tool":
                    no_tool.add(lang, structure is None)
                    direct.add(lang, structure is None and states_facts(judged, t.record.meta))
                else:
                    judge(answer, lang, structure is None and grounded(judged, t.record.meta), "not_grounded", reasons)
                dual_stream(dual, t, judged, reasons)
                expected = reference_content(t)
            finish(report, t, expected, generation, reasons[0] if reasons else None, n_samples)
    finally:
        ws.close()
    return report


def _first_call(judged: Judged) -> tuple[str | None, str | None, dict | None]:
    if judged.reason is not None:
        return judged.reason, None, None
    if not judged.block.calls:
        return "no_tool_call", None, None
    return parse_call(judged.block.calls[0])


@dataclass
class _Episode:
    """One agentic episode in flight: the text so far, the calls made, and how it ended."""

    record: Record
    text: str
    budget: int
    max_blocks: int
    blocks: int = 0
    calls: list[tuple[str, str]] = field(default_factory=list)  # (name, arguments as sorted JSON)
    transcript: str = ""
    reason: str | None = None
    answer: Judged | None = None

    @property
    def done(self) -> bool:
        return self.reason is not None or self.answer is not None


def agentic_gate(model, tokenizer, records: list[dict], *, workspace: str | Path | None = None,
                 batch_size: int = 32, max_new_tokens: int | None = None, n_samples: int = 8) -> GateReport:
    """Phase 6 (see the module docstring)."""
    generator = TurnGenerator(model, tokenizer, batch_size, max_new_tokens)
    parsed = parse_records(records)
    episodes = []
    for r in parsed:
        tools = _expected_tools(r)
        turns = [turn(r, b, generator.info) for b in range(len(assistant_blocks(r.conversation.messages)))]
        budget = max(generator.budget(t.reference) for t in turns)
        episodes.append(_Episode(r, turns[0].prompt, budget, len(tools) + 1 + EXTRA_STEPS))
    ws = open_workspace(workspace)
    try:
        while running := [e for e in episodes if not e.done]:
            texts = generator.texts([e.text for e in running], [e.budget for e in running])
            for episode, text in zip(running, texts):
                _step(episode, parse_block(text, generator.specials), ws)
    finally:
        ws.close()
    completed = Check("chain completed: answered within the step limit, valid calls", 0.8, by_language=True,
                      required=True)
    no_loop = Check("no loop (the same call repeated)", 0.95)
    answer = Check("grounded final answer: cites the source, states the key fact (pattern check)", 0.8)
    as_expected = Check("tools called as in the reference", None)
    dual = Check("dual-stream format", 0.9)
    report = GateReport("6", "agentic", [completed, no_loop, answer, as_expected, dual], len(parsed))
    for e in episodes:
        lang, meta = e.record.language, e.record.meta
        reasons = [e.reason] if e.reason else []
        completed.add(lang, e.reason is None)
        no_loop.add(lang, e.reason != "loop")
        good_answer = e.reason is None and grounded(e.answer, meta)
        answer.add(lang, good_answer)
        if e.reason is None and not good_answer:
            reasons.append("not_grounded")
        as_expected.add(lang, [name for name, _ in e.calls] == _expected_tools(e.record))
        last = turn(e.record, -1, generator.info)
        if e.answer is not None:
            dual_stream(dual, last, e.answer, reasons)
        reason = reasons[0] if reasons else None
        if reason is not None:
            report.fail(reason)
        if len(report.samples) < n_samples:
            report.samples.append(Sample(lang, _first_question(e.record), reference_content(last), e.transcript,
                                         reason is None, reason))
    return report


def _step(episode: _Episode, judged: Judged, ws) -> None:
    """Advance one episode by one generated block: run its calls, or take it as the final answer."""
    episode.blocks += 1
    episode.transcript += OPEN + judged.block.text
    if judged.reason is not None:
        episode.reason = judged.reason
        return
    if not judged.block.calls:
        episode.answer = judged
        return
    results = []
    for text in judged.block.calls:
        reason, name, arguments = parse_call(text)
        if reason is not None:
            episode.reason = reason
            return
        key = (name, json.dumps(arguments, sort_keys=True, ensure_ascii=False))
        if key in episode.calls:
            episode.reason = "loop"
            return
        episode.calls.append(key)
        results.append(f"<myPT_toolresult>{ws.call(name, arguments)}</myPT_toolresult>")
    episode.transcript += "".join(results)
    episode.text += judged.block.text + "".join(results) + OPEN
    if episode.blocks >= episode.max_blocks:
        episode.reason = "max_steps"


def _first_question(record: Record) -> str:
    return next((m.content for m in record.conversation.messages if m.role == "user"), "")
