"""Curriculum gates: does a checkpoint do what its phase taught, on prompts it never saw?

Each gate renders held-out records in the myPT format up to an assistant block, generates greedily
(batched, left-padded, stopping at ``<myPT_eot>`` or at ``</myPT_assistant>`` after a tool call), and judges
the generated block: its structure (``checks.parse_block``: closed tags, a clean stop, nothing of the next
turn) and its content. A check passes at its threshold overall and, where marked *each*, in every language
(one language cannot carry another). A gate passes when all its thresholded checks do. Checks without an
item in the prompt set (no echo prompt drawn) are not judged, except a gate's main check, which fails.

| phase | gate | check | threshold |
|---|---|---|---|
| 1 | format lock | ends with ``</myPT_assistant><myPT_eot>`` within 20 tokens, no runaway, non-blank | ≥ 90% each |
| 1b | long context | answer states the fact from the one document that holds it | ≥ 80% each |
| | | format (closed tags, stop) | ≥ 90% each |
| | | cite block names that document | ≥ 80% |
| 2 | operators | exact match with ``_meta.expected`` on held-out payloads (format included) | ≥ 80% each |
| 3 | chat | format (closed tags, stop) | ≥ 90% each |
| | | echo: answer equals the sentence; anti-echo: answer does not contain the question | ≥ 80% |
| | | answer language = ``expected_language`` (stop-word pattern check, when it decides) | ≥ 90% each |
| | | system rule (one sentence, required prefix) | ≥ 80% |
| | | context given: cite block names every ``cited_docs`` id | ≥ 80% |
| 4 | multiturn | each turn, after its gold history: clean stop, no bleed-through | ≥ 90% each |
| 5 | tool call | first call: right tool, JSON that fits the tool schema | ≥ 90% each |
| | | no-tool episodes answer without a tool call | ≥ 80% |
| | | answer after the gold tool result cites the source and states the key fact | ≥ 80% |
| 6 | agentic | chain completed: answered within the step limit, every call valid, no loop | ≥ 80% each |
| | | no loop (the same call, same arguments, twice) | ≥ 95% |
| | | final answer cites the source and states the key fact | ≥ 80% |
| 3-6 | any | ``_meta.dual_stream`` records: ``<think>``, ``<proof>``, ``<answer>`` in order, closed | ≥ 90% |

"Pattern check" in a check's name marks a string heuristic (stop words, substrings), not a judgement of
meaning. Informational rates (exact match in phase 1, per-operator rates, carried-over facts, whether a
model's call runs without a tool error, tools as in the reference) are reported without a threshold.

``run_gate`` gates one phase (prompts: given, a JSONL file, or generated held-out records) and also runs
the phase's out-of-distribution prompts (``lossmask/data/ood``: novel phrasings), reported as warnings,
never failures. ``run_regression`` runs every phase's gate up to a phase on one checkpoint, in training
order (``CURRICULUM``: 1, 2, 3, 4, 1b, 5, 6; context extension comes right before the tool phases).
"""

from lossmask.gate.checks import (
    Block,
    Judged,
    answer_language,
    check_dual_stream,
    parse_block,
)
from lossmask.gate.format_lock import (
    GateResult,
    GateSample,
    Tally,
    format_lock_gate,
    passes,
    print_gate,
    render_prompt,
)
from lossmask.gate.phases import chat_gate, longctx_gate, multiturn_gate, operators_gate
from lossmask.gate.report import (
    Check,
    GateReport,
    Sample,
    print_gate_report,
    write_reports,
)
from lossmask.gate.run import (
    CURRICULUM,
    DEFAULT_PROMPTS,
    PHASE_KEYS,
    gate_checkpoint,
    gate_phase,
    held_out_prompts,
    load_prompts,
    ood_prompts,
    phase_key,
    print_regression,
    regression_phases,
    run_gate,
    run_regression,
)
from lossmask.gate.tools import agentic_gate, parse_call, toolcall_gate

__all__ = [
    "CURRICULUM",
    "DEFAULT_PROMPTS",
    "PHASE_KEYS",
    "Block",
    "Check",
    "GateReport",
    "GateResult",
    "GateSample",
    "Judged",
    "Sample",
    "Tally",
    "agentic_gate",
    "answer_language",
    "chat_gate",
    "check_dual_stream",
    "format_lock_gate",
    "gate_checkpoint",
    "gate_phase",
    "held_out_prompts",
    "load_prompts",
    "longctx_gate",
    "multiturn_gate",
    "ood_prompts",
    "operators_gate",
    "parse_block",
    "parse_call",
    "passes",
    "phase_key",
    "print_gate",
    "print_gate_report",
    "print_regression",
    "regression_phases",
    "render_prompt",
    "run_gate",
    "run_regression",
    "toolcall_gate",
    "write_reports",
]
